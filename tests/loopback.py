"""
Free ports on loopback, for the tools that start relays of their own (the
benchmark, the live fuzzer, the soak) and for the tests.
"""

import socket


def freePort(host="127.0.0.1"):
    """
    A TCP port that was free on C{host} a moment ago.
    """
    return commonPort([host])


def commonPort(hosts):
    """
    A TCP port free on every one of C{hosts} a moment ago (pods on
    127.0.0.2-4 share one cluster port).
    """
    while True:
        with socket.socket() as first:
            first.bind((hosts[0], 0))
            port = first.getsockname()[1]
            try:
                for host in hosts[1:]:
                    with socket.socket() as other:
                        other.bind((host, port))
                return port
            except OSError:
                continue
