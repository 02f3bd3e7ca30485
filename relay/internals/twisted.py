"""
What the relay takes from Twisted beyond its public API (see
L{relay.internals}).
"""


def forgetExitSignal(reactor):
    """
    Let a relay that drained after SIGTERM or SIGINT exit with status 0.

    Relies on: C{ReactorBase._exitSignal}, where the reactor keeps the
    number of the signal that stopped it (C{ReactorBase.sigTerm}), and twistd
    reading it once the reactor is done (C{ApplicationRunner.startReactor},
    then C{twistd.runApp}) to kill itself with the same signal: exit status
    143 for SIGTERM.

    Why not the public API: twistd has no option for it, and the signal
    handlers that record the number are the reactor's own (replacing them
    would lose what they also do: stopping the reactor from a signal
    safely).

    Worth: Kubernetes and systemd record a planned stop (the relay told
    every peer Close and drained) as a success instead of a failure; an
    alert on non-zero exit then means a crash.

    A reactor that never recorded a signal (tests, a stop from inside the
    process) is left alone.
    """
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None
