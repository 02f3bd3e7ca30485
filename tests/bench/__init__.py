"""
The relay benchmark: C{python -m tests.bench}.

Starts the relay under test as a separate process and measures it from raw
sockets (throughput, latency, handshakes/s, memory per idle peer, a stalled
receiver, cross-pod latency); see L{tests.bench.__main__}.
"""
