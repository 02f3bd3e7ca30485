"""
A Twisted packet relay for WireGuard mesh VPNs, wire-compatible with the
openZro / NetBird relay server (peer protocol v1) and its inter-pod fabric
(ADR-0014; docs/cluster.md).
"""
