"""
L{relay.internals.twisted} against the installed Twisted: each test names
the library, its version and the piece that is missing, so an upgrade that
takes one away fails here, not in production.
"""

import inspect
import signal

import twisted
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase

from relay.internals.twisted import TLSProtocol, forgetExitSignal


def missing(piece, user):
    return f"Twisted {twisted.__version__}: {piece} is gone or changed; relay.internals.twisted.{user} relies on it (read its docstring)"


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

        self.assertTrue(hasattr(base.ReactorBase, "_exitSignal"), missing("ReactorBase._exitSignal", "forgetExitSignal"))
        stub = _Stub()
        base.ReactorBase.sigTerm(stub, signal.SIGTERM, None)
        self.assertEqual(getattr(stub, "_exitSignal", None), signal.SIGTERM, missing("ReactorBase.sigTerm recording _exitSignal", "forgetExitSignal"))

    def test_globalReactorCaptures(self):
        from twisted.internet import interfaces, reactor

        capturing = getattr(interfaces, "_ISupportsExitSignalCapturing", None)
        self.assertIsNotNone(capturing, missing("twisted.internet.interfaces._ISupportsExitSignalCapturing", "forgetExitSignal"))
        self.assertTrue(capturing.providedBy(reactor), missing("_ISupportsExitSignalCapturing on the default reactor", "forgetExitSignal"))

    def test_twistdReadsIt(self):
        from twisted.application import app
        from twisted.scripts import twistd

        self.assertIn("reactor._exitSignal", inspect.getsource(app.ApplicationRunner.startReactor), missing("ApplicationRunner.startReactor reading reactor._exitSignal", "forgetExitSignal"))
        self.assertIn("_exitWithSignal", inspect.getsource(twistd.runApp), missing("twistd.runApp re-raising the exit signal", "forgetExitSignal"))

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


class WriteNowTests(SynchronousTestCase):
    """
    L{writeNow} reads C{dataBuffer} and C{_tempDataLen} of Twisted's
    C{FileDescriptor} and calls C{writeSomeData} (its behaviour is tested in
    tests/test_peer.py).
    """

    def test_tcpServerState(self):
        from twisted.internet import tcp
        from twisted.internet.abstract import FileDescriptor
        from twisted.internet.task import Clock

        t = tcp.Server.__new__(tcp.Server)
        FileDescriptor.__init__(t, Clock())
        for name in ("dataBuffer", "_tempDataLen", "writeSomeData", "connected", "disconnecting"):
            self.assertTrue(hasattr(t, name), missing(f"twisted.internet.tcp.Server.{name}", "writeNow"))

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
        self.assertTrue(t.dataBuffer or t._tempDataLen, missing("FileDescriptor.write queueing in dataBuffer / _tempDataLen", "writeNow"))


class TLSProtocolTests(SynchronousTestCase):
    """
    L{TLSProtocol}: the private methods of C{TLSMemoryBIOProtocol} it
    replaces or calls, and the state it reads.
    """

    def test_hooksAndCalls(self):
        from twisted.protocols.tls import TLSMemoryBIOProtocol

        for name in ("_write", "_flushSendBIO", "_flushReceiveBIO", "_bufferedWrite", "_shutdownTLS", "_tlsShutdownFinished"):
            self.assertTrue(callable(getattr(TLSMemoryBIOProtocol, name, None)), missing(f"TLSMemoryBIOProtocol.{name}", "TLSProtocol"))

    def test_twistedCallsTheHooks(self):
        """
        Twisted's C{write} and C{dataReceived} reach C{encrypt} and
        C{receiveRecords} (through C{_write} and C{_flushReceiveBIO}), and
        C{sendRecords} (C{_flushSendBIO}) sends the handshake.
        """
        from tests.test_peer_tls import _fakeTCP, _InMemory

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
        for hook, private in (("encrypt", "write() calling self._write"), ("sendRecords", "self._flushSendBIO"),
                              ("receiveRecords", "dataReceived() calling self._flushReceiveBIO")):
            self.assertIn(hook, calls, missing(f"TLSMemoryBIOProtocol.{private}", f"TLSProtocol.{hook}"))

    def test_state(self):
        from tests.test_peer_tls import _fakeTCP, _InMemory

        pair = _InMemory(self, _fakeTCP())
        for name in ("_tlsConnection", "_lostTLSConnection", "_aborted", "_producer"):
            self.assertTrue(hasattr(pair.server, name), missing(f"TLSMemoryBIOProtocol.{name}", "TLSProtocol"))
        self.assertIsNotNone(pair.server.tlsConnection)
        self.assertFalse(pair.server.tlsLost)
        self.assertFalse(pair.server.aborted)
        self.assertIsNone(pair.server.producer)

    def test_tlsEnded(self):
        """
        C{tlsEnded} answers the peer's close_notify and closes.
        """
        from tests.test_peer_tls import _fakeTCP, _InMemory

        pair = _InMemory(self, _fakeTCP())
        pair.handshake()
        pair.server.tlsEnded()
        self.assertTrue(pair.server.tlsLost, missing("TLSMemoryBIOProtocol._tlsShutdownFinished setting _lostTLSConnection", "TLSProtocol.tlsEnded"))
        self.assertIn("lose", pair.transport.lost)
