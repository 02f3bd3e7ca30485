"""
C{host:port} text, the one form every address of the relay takes: the
command line's listen addresses, the fabric's announced pod addresses, the
log lines.

One parser for all of them, so that C{--listen-address}, C{--cluster-listen-
address} and a HELLO's announced address cannot drift apart in what they
take (an IPv6 literal in brackets, a port in range).
"""


def splitAddress(address, listening=False):
    """
    Split C{host:port} (C{[v6]:port} for IPv6) into C{(host, port)}.

    @param listening: whether C{address} is one to listen on, where an
        empty host (C{:443}) means every interface and port 0 any free port;
        an address to dial or announce needs both.

    @raise ValueError: if it is not that.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not (host or listening):
        raise ValueError(f"not host:port: {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        portNumber = int(port)
    except ValueError:
        raise ValueError(f"not host:port: {address!r}") from None
    if not (0 if listening else 1) <= portNumber <= 65535:
        raise ValueError(f"bad port in {address!r}")
    return host, portNumber


def joinAddress(host, port):
    """
    The C{host:port} form of an address, brackets around an IPv6 literal.
    """
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


# With --workers, worker i is a pod of a fabric on this host at 127.0.1.<i+1>
# (relay.workers).
WORKER_NETWORK = "127.0.1."


def workerAddress(index):
    """
    The loopback address worker C{index} (0-based) announces on the fabric.
    """
    return f"{WORKER_NETWORK}{index + 1}"


def workerAddresses(count):
    """
    The fabric's pod list of C{count} workers (C{--cluster-headless}'s form).
    """
    return ",".join(workerAddress(i) for i in range(count))
