"""
portproxy: publish host ip:port endpoints to backend ip:port endpoints, TCP
and UDP, from one Twisted process driven by a YAML map.
"""

__version__ = "0.1.0"
