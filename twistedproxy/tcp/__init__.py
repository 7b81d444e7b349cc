"""
TCP forwarding.

  - L{twistedproxy.tcp.listener}: where a TCP listener starts (its service,
    its listening socket, its relays' factory).
  - L{twistedproxy.tcp.forwarder}: L{ITCPForwarder}, the one seam between a
    listener and what carries its clients' bytes, and the function that
    picks its implementation when the listener binds.
  - L{twistedproxy.tcp.relay}: where bytes are copied in Python (the
    L{Relay} protocol pair, its TLS kinds, the ending of unserved clients).
  - L{twistedproxy.tcp.engine}: the binding of the compiled splice engine
    (C{twistedproxy.tcp._engine}): adopting connections, its flows.
"""
