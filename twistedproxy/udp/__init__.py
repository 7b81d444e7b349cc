"""
UDP forwarding.

  - L{twistedproxy.udp.listener}: where a UDP listener starts (its service,
    its session table, admission of new clients, expiry).
  - L{twistedproxy.udp.forwarder}: L{IUDPForwarder}, the one seam between a
    listener and what carries its datagrams, and the function that picks
    its implementation when the listener binds.
  - L{twistedproxy.udp.relay}: where datagrams are copied in Python (the
    listening and session sockets, L{Session}).
  - L{twistedproxy.udp.engine}: the binding of the compiled datagram engine
    (C{twistedproxy.udp._engine}) and its sessions.
"""
