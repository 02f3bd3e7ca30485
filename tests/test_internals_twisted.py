"""
L{relay.internals.twisted} against the installed Twisted: each test names
the library, its version and the piece that is missing, so an upgrade that
takes one away fails here, not in production.
"""

import inspect
import signal
import socket

from twisted.internet import defer, reactor, udp
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

import twisted
from relay.internals.twisted import (
    BufferedReadPort,
    TLSProtocol,
    forgetExitSignal,
    listenUDPIntoBuffer,
)


def missing(piece, user):
    return (
        f"Twisted {twisted.__version__}: {piece} is gone or changed; "
        f"relay.internals.twisted.{user} relies on it (read its docstring)"
    )


class _Stub:
    """
    Just enough of a reactor for L{twisted.internet.base.ReactorBase}'s
    signal handlers: they stop the reactor through C{callFromThread}.
    """

    def __init__(self):
        self.calls = []

    def callFromThread(self, f, *args):
        self.calls.append(f)

    def stop(self):
        pass


class ExitSignalTests(SynchronousTestCase):
    """
    L{forgetExitSignal}: the reactor keeps the stopping signal in
    C{_exitSignal}, and twistd re-raises what it finds there.
    """

    def test_reactorRecordsTheSignal(self):
        from twisted.internet import base

        self.assertTrue(
            hasattr(base.ReactorBase, "_exitSignal"),
            missing("ReactorBase._exitSignal", "forgetExitSignal"),
        )
        stub = _Stub()
        base.ReactorBase.sigTerm(stub, signal.SIGTERM, None)
        self.assertEqual(
            getattr(stub, "_exitSignal", None),
            signal.SIGTERM,
            missing("ReactorBase.sigTerm recording _exitSignal", "forgetExitSignal"),
        )

    def test_globalReactorCaptures(self):
        from twisted.internet import interfaces, reactor

        capturing = getattr(interfaces, "_ISupportsExitSignalCapturing", None)
        self.assertIsNotNone(
            capturing,
            missing(
                "twisted.internet.interfaces._ISupportsExitSignalCapturing", "forgetExitSignal"
            ),
        )
        self.assertTrue(
            capturing.providedBy(reactor),
            missing("_ISupportsExitSignalCapturing on the default reactor", "forgetExitSignal"),
        )

    def test_twistdReadsIt(self):
        from twisted.application import app
        from twisted.scripts import twistd

        self.assertIn(
            "reactor._exitSignal",
            inspect.getsource(app.ApplicationRunner.startReactor),
            missing(
                "ApplicationRunner.startReactor reading reactor._exitSignal", "forgetExitSignal"
            ),
        )
        self.assertIn(
            "_exitWithSignal",
            inspect.getsource(twistd.runApp),
            missing("twistd.runApp re-raising the exit signal", "forgetExitSignal"),
        )

    def test_forgets(self):
        stub = _Stub()
        stub._exitSignal = signal.SIGTERM
        forgetExitSignal(stub)
        self.assertIsNone(stub._exitSignal)

    def test_noSignalLeftAlone(self):
        """
        A reactor without the attribute (a test clock) is not given one.
        """
        stub = _Stub()
        forgetExitSignal(stub)
        self.assertFalse(hasattr(stub, "_exitSignal"))


class BufferedReadPortTests(TestCase):
    """
    L{BufferedReadPort}: C{udp.Port.doRead} with C{recvfrom_into} one
    buffer; what its C{doRead} mirrors is still what C{udp.Port} does.
    """

    timeout = 10

    def test_mirrorsPortDoRead(self):
        """
        C{udp.Port.doRead} still reads with C{recvfrom(self.maxPacketSize)}
        in a C{maxThroughput} loop, and the names the copy uses are there.
        """
        source = inspect.getsource(udp.Port.doRead)
        for piece in (
            "self.socket.recvfrom(self.maxPacketSize)",
            "while read < self.maxThroughput",
            "_sockErrReadIgnore",
            "_sockErrReadRefuse",
            "self._connectedAddr",
            "self.protocol.connectionRefused()",
            "addr = addr[:2]",
            "self.protocol.datagramReceived(data, addr)",
        ):
            self.assertIn(
                piece, source, missing(f"udp.Port.doRead's {piece!r}", "BufferedReadPort")
            )
        for name in ("_sockErrReadIgnore", "_sockErrReadRefuse"):
            self.assertTrue(
                hasattr(udp, name), missing(f"twisted.internet.udp.{name}", "BufferedReadPort")
            )
        self.assertIn(
            "udp.Port(port, protocol, interface, maxPacketSize, self)",
            inspect.getsource(type(reactor).listenUDP),
            missing("PosixReactorBase.listenUDP building udp.Port", "listenUDPIntoBuffer"),
        )

    @defer.inlineCallbacks
    def test_delivers(self):
        """
        Datagrams arrive whole and in order as views of one buffer; each is
        right during its call (the next read overwrites it), a longer one
        than the buffer is cut as C{recvfrom} cuts it.
        """
        got = []
        views = set()
        done = defer.Deferred()
        sent = [b"first datagram" * 10, b"2", b"third", bytes(range(256)) * 2]

        class Recorder(DatagramProtocol):
            def datagramReceived(self, data, addr):
                views.add(type(data))
                got.append((bytes(data), addr))
                if len(got) == len(sent) + 1:
                    done.callback(None)

        port = listenUDPIntoBuffer(reactor, 0, Recorder(), interface="127.0.0.1", maxPacketSize=700)
        self.addCleanup(port.stopListening)
        self.assertIsInstance(port, BufferedReadPort)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sender.close)
        sender.bind(("127.0.0.1", 0))
        target = ("127.0.0.1", port.getHost().port)
        for data in sent:
            sender.sendto(data, target)
        sender.sendto(b"x" * 1000, target)
        yield done
        source = sender.getsockname()
        self.assertEqual(got, [(data, source) for data in sent] + [(b"x" * 700, source)])
        self.assertEqual(views, {memoryview})

    def test_clockGetsListenUDP(self):
        """
        A reactor that is not a POSIX one gets its own C{listenUDP}.
        """
        calls = []

        class Fake(Clock):
            def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
                calls.append((port, protocol, interface, maxPacketSize))
                return "port"

        protocol = DatagramProtocol()
        self.assertEqual(
            listenUDPIntoBuffer(Fake(), 5, protocol, interface="::1", maxPacketSize=9), "port"
        )
        self.assertEqual(calls, [(5, protocol, "::1", 9)])


class WriteNowTests(SynchronousTestCase):
    """
    L{writeNow} reads C{dataBuffer} and C{_tempDataLen} of Twisted's
    C{FileDescriptor} and calls C{writeSomeData} (its behaviour is tested in
    tests/test_listener_ws.py).
    """

    def test_tcpServerState(self):
        from twisted.internet import tcp
        from twisted.internet.abstract import FileDescriptor
        from twisted.internet.task import Clock

        t = tcp.Server.__new__(tcp.Server)
        FileDescriptor.__init__(t, Clock())
        for name in ("dataBuffer", "_tempDataLen", "writeSomeData", "connected", "disconnecting"):
            self.assertTrue(
                hasattr(t, name), missing(f"twisted.internet.tcp.Server.{name}", "writeNow")
            )

    def test_writeQueuesInThoseBuffers(self):
        """
        What C{write} queues shows in C{dataBuffer} or C{_tempDataLen}, the
        two that say something is ahead of a direct send.
        """
        from twisted.internet import tcp
        from twisted.internet.abstract import FileDescriptor
        from twisted.internet.task import Clock

        t = tcp.Server.__new__(tcp.Server)
        FileDescriptor.__init__(t, Clock())
        t.connected = True
        t.startWriting = lambda: None
        t.write(b"queued")
        self.assertTrue(
            t.dataBuffer or t._tempDataLen,
            missing("FileDescriptor.write queueing in dataBuffer / _tempDataLen", "writeNow"),
        )


class TLSProtocolTests(SynchronousTestCase):
    """
    L{TLSProtocol}: the private methods of C{TLSMemoryBIOProtocol} it
    replaces or calls, and the state it reads.
    """

    def test_hooksAndCalls(self):
        from twisted.protocols.tls import TLSMemoryBIOProtocol

        for name in (
            "_write",
            "_flushSendBIO",
            "_flushReceiveBIO",
            "_bufferedWrite",
            "_shutdownTLS",
            "_tlsShutdownFinished",
        ):
            self.assertTrue(
                callable(getattr(TLSMemoryBIOProtocol, name, None)),
                missing(f"TLSMemoryBIOProtocol.{name}", "TLSProtocol"),
            )

    def test_twistedCallsTheHooks(self):
        """
        Twisted's C{write} and C{dataReceived} reach C{encrypt} and
        C{receiveRecords} (through C{_write} and C{_flushReceiveBIO}), and
        C{sendRecords} (C{_flushSendBIO}) sends the handshake.
        """
        from tests.test_listener_ws_tls import _fakeTCP, _InMemory

        calls = []

        class Spy(TLSProtocol):
            def encrypt(self, data):
                calls.append("encrypt")
                TLSMemoryBIOProtocol._write(self, data)

            def sendRecords(self):
                calls.append("sendRecords")
                TLSMemoryBIOProtocol._flushSendBIO(self)

            def receiveRecords(self):
                calls.append("receiveRecords")
                TLSMemoryBIOProtocol._flushReceiveBIO(self)

        pair = _InMemory(self, _fakeTCP(), tlsProtocol=Spy)
        pair.handshake()
        pair.server.write(b"x")
        pair.toClient()
        self.assertEqual(pair.clientReceived(), b"x")
        for hook, private in (
            ("encrypt", "write() calling self._write"),
            ("sendRecords", "self._flushSendBIO"),
            ("receiveRecords", "dataReceived() calling self._flushReceiveBIO"),
        ):
            self.assertIn(
                hook, calls, missing(f"TLSMemoryBIOProtocol.{private}", f"TLSProtocol.{hook}")
            )

    def test_state(self):
        from tests.test_listener_ws_tls import _fakeTCP, _InMemory

        pair = _InMemory(self, _fakeTCP())
        for name in (
            "_tlsConnection",
            "_lostTLSConnection",
            "_aborted",
            "_producer",
            "_handshakeDone",
            "_appSendBuffer",
        ):
            self.assertTrue(
                hasattr(pair.server, name), missing(f"TLSMemoryBIOProtocol.{name}", "TLSProtocol")
            )
        self.assertIsNotNone(pair.server.tlsConnection)
        self.assertFalse(pair.server.tlsLost)
        self.assertFalse(pair.server.aborted)
        self.assertIsNone(pair.server.producer)
        self.assertFalse(pair.server.handshakeDone)
        self.assertEqual(pair.server.cleartextWaiting, [])
        # Written before the handshake: Twisted keeps it in _appSendBuffer.
        pair.server.write(b"early")
        self.assertEqual(pair.server.cleartextWaiting, [b"early"])
        pair.handshake()
        self.assertTrue(pair.server.handshakeDone)
        self.assertEqual(pair.server.cleartextWaiting, [])

    def test_tlsEnded(self):
        """
        C{tlsEnded} answers the peer's close_notify and closes.
        """
        from tests.test_listener_ws_tls import _fakeTCP, _InMemory

        pair = _InMemory(self, _fakeTCP())
        pair.handshake()
        pair.server.tlsEnded()
        self.assertTrue(
            pair.server.tlsLost,
            missing(
                "TLSMemoryBIOProtocol._tlsShutdownFinished setting _lostTLSConnection",
                "TLSProtocol.tlsEnded",
            ),
        )
        self.assertIn("lose", pair.transport.lost)
