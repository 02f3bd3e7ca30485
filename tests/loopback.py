"""
Free ports on loopback, for the tools that start relays of their own (the
benchmark, the live fuzzer, the soak) and for the tests.
"""

import random
import socket

# Below the kernel's ephemeral range a port is never given to an outgoing
# connection as its source: a port picked there stays free until the relay
# binds it. A port from bind(0) is in that range, and under a loaded test run
# another test's connection took one between the pick and the relay's bind
# (the relay then ran without its metrics port: connection refused).
_LOWEST = 10000


def _pickable():
    """
    The ports to pick from: those from L{_LOWEST} to the start of the
    ephemeral range, or None where that range cannot be read.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            first = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return range(_LOWEST, first) if first - _LOWEST >= 1000 else None


_PICKABLE = _pickable()


def freePort(host="127.0.0.1"):
    """
    A TCP (and UDP) port that was free on C{host} a moment ago.
    """
    return commonPort([host])


def commonPort(hosts):
    """
    A TCP and UDP port free on every one of C{hosts} a moment ago (pods on
    127.0.0.2-4 share one cluster port; a relay with a certificate serves
    QUIC on its peer port's number).
    """
    while True:
        port = random.choice(_PICKABLE) if _PICKABLE else _ephemeral(hosts[0])
        if all(_free(host, port) for host in hosts):
            return port


def _ephemeral(host):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _free(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(family, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True
