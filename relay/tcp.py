"""
TCP options shared by the relay's WebSocket server (L{relay.listener.ws}) and its
client library (L{relay.client}).
"""


def noDelay(transport):
    """
    Turn Nagle's algorithm off on C{transport}: relayed WireGuard packets are
    small and latency-bound, and Go's C{net.Conn} (the agents' and the Go
    relay's) never waits for Nagle either.

    Transports without a socket option to set (a test's string transport)
    and sockets already closed are left as they are: there is nothing to
    speed up.
    """
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError):
        pass
