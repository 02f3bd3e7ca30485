"""
L{relay.addresses}: the one C{host:port} parser, for addresses to dial or
announce and for addresses to listen on.
"""

from twisted.trial.unittest import SynchronousTestCase

from relay.addresses import joinAddress, splitAddress


class SplitTests(SynchronousTestCase):
    def test_dialed(self):
        self.assertEqual(splitAddress("10.0.0.1:7090"), ("10.0.0.1", 7090))
        self.assertEqual(splitAddress("[fd00::1]:7090"), ("fd00::1", 7090))
        self.assertEqual(splitAddress("relay-0.relay:7090"), ("relay-0.relay", 7090))

    def test_dialedNeedsHostAndPort(self):
        for bad in ("10.0.0.1", ":7090", "h:0", "h:65536", "h:x", "h:"):
            self.assertRaises(ValueError, splitAddress, bad)

    def test_listening(self):
        """
        An address to listen on may leave the host empty (every interface)
        and ask for port 0 (any free one).
        """
        self.assertEqual(splitAddress(":443", listening=True), ("", 443))
        self.assertEqual(splitAddress("127.0.0.1:0", listening=True), ("127.0.0.1", 0))
        self.assertEqual(splitAddress("[::]:7090", listening=True), ("::", 7090))
        self.assertEqual(splitAddress("0.0.0.0:65535", listening=True), ("0.0.0.0", 65535))

    def test_listeningStillNeedsAPort(self):
        for bad in ("443", ":", ":x", ":65536", ":-1"):
            self.assertRaises(ValueError, splitAddress, bad, listening=True)

    def test_roundTrip(self):
        for host in ("10.0.0.1", "fd00::1", "relay-0.relay"):
            self.assertEqual(splitAddress(joinAddress(host, 7090)), (host, 7090))

    def test_join(self):
        self.assertEqual(joinAddress("10.0.0.1", 7090), "10.0.0.1:7090")
        self.assertEqual(joinAddress("fd00::1", 7090), "[fd00::1]:7090")
