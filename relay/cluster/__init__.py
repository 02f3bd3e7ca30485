"""
The inter-pod fabric (ADR-0014): relay pods behind one headless service
forward Transport messages to peers connected to a sibling pod.

frames (codecs), streams (one per pod pair), locator (WHO_HAS / I_HAVE), forwarder
(FWD, presence push), discovery (headless name) and service (all of them as
one Twisted service). docs/cluster.md describes it.
"""
