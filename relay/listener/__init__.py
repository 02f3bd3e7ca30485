"""
The carriers that bring peers in: C{ws} serves peers over WebSocket at
C{/relay} (plain or TLS, on TCP), C{quic} serves them over QUIC on the same
port over UDP, with C{quiclean} its lean path for established connections.
Each accepts connections, enforces admission and framing, and hands whole
relay messages to the carrier-blind protocol of one peer (L{relay.peer}),
which talks to the L{relay.relay.Relay}; as in the Go original
(C{relay/server/listener/ws}, C{listener/quic}), nothing here knows the
routing and nothing in the peer's protocol knows the carrier.
"""
