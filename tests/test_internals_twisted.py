"""
L{relay.internals.twisted} against the installed Twisted: each test names
the library, its version and the piece that is missing, so an upgrade that
takes one away fails here, not in production.
"""

import inspect
import signal

import twisted
from twisted.trial.unittest import SynchronousTestCase

from relay.internals.twisted import forgetExitSignal


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
