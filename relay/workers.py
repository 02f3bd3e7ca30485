"""
Every core of one host: C{--workers N} relay processes sharing the peer port.

A Twisted reactor uses one core. On a VM with several, C{--workers N} runs N
relay processes that all listen on the peer port with C{SO_REUSEPORT}
(L{relay.endpoints.ReusePortEndpoint}; the kernel spreads new connections
across them) and are joined by the inter-pod fabric over loopback, exactly
as pods are: worker I{i} is a "pod" at C{127.0.1.<i+1>} on the cluster port,
so two peers that landed on different workers still reach each other. The
first process supervises the others
(L{twisted.runner.procmon.ProcessMonitor}: restarted with backoff if they die,
SIGTERM then SIGKILL when it stops); each worker also stops by itself if its
supervisor disappears.

The workers write their log lines themselves, to the standard output and
error they inherit from the first process (or to C{--log-file}), each line
marked with its worker's index. ProcessMonitor would otherwise read their
output through pipes and log every line again as a line of its own: a second
timestamp and prefix in text, a JSON line inside a JSON line's message.

On Kubernetes one worker per pod stays the right shape: pods are the unit of
scaling there.
"""

import os
import sys

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.runner.procmon import ProcessMonitor
from zope.interface import implementer

from relay.config import variableFor

SUPERVISOR_CHECK_INTERVAL = 1.0

# How often a stopping worker 0 looks whether the others have exited, and how
# long past the monitor's SIGKILL it waits for them.
WORKER_EXIT_POLL = 0.1
WORKER_EXIT_GRACE = 5.0

_log = Logger()


class SupervisorWatch(Service):
    """
    Stops a worker's reactor once the process that started it is gone (its
    parent process id changes), so no worker outlives its supervisor.
    """

    def __init__(self, reactor):
        self.reactor = reactor
        self.supervisorPID = os.getppid()
        self._loop = LoopingCall(self._check)
        self._loop.clock = reactor

    def startService(self):
        super().startService()
        self._loop.start(SUPERVISOR_CHECK_INTERVAL, now=False)

    def stopService(self):
        if self._loop.running:
            self._loop.stop()
        return super().stopService()

    def _check(self):
        if os.getppid() != self.supervisorPID:
            _log.warn("worker: supervisor {pid} is gone, stopping", pid=self.supervisorPID)
            self._loop.stop()
            self.reactor.stop()


def workerEnvironment(config, index):
    """
    The environment of worker C{index}: every option of C{config} (a
    L{relay.config.RelayConfig}) as its C{OZ_*} variable (secrets never
    appear on a command line), with the worker's own fabric address and
    metrics port.
    """
    env = dict(os.environ)
    for name, value in config.settings.items():
        if value is not None:
            env[variableFor(name)] = str(value)
    metricsPort = config.metricsPort
    env[variableFor("metrics-port")] = str(metricsPort + index if metricsPort else 0)
    env[variableFor("worker-index")] = str(index)
    return env


@implementer(IReactorProcess, IReactorTime)
class SharedOutput:
    """
    A reactor whose child processes inherit this process's standard output
    and error instead of writing to pipes read by the parent.

    L{ProcessMonitor} has no option for this; it spawns through the reactor
    it is given, so it is given this one.
    """

    # Standard input stays a pipe, as ProcessMonitor's children always had.
    CHILD_FDS = {0: "w", 1: 1, 2: 2}

    def __init__(self, reactor):
        self._reactor = reactor

    def __getattr__(self, name):
        return getattr(self._reactor, name)

    def spawnProcess(
        self,
        processProtocol,
        executable,
        args=(),
        env=None,
        path=None,
        uid=None,
        gid=None,
        usePTY=False,
        childFDs=None,
    ):
        return self._reactor.spawnProcess(
            processProtocol,
            executable,
            args,
            {} if env is None else env,
            path,
            uid,
            gid,
            usePTY,
            self.CHILD_FDS,
        )


def workersEnded(monitor, clock, interval=WORKER_EXIT_POLL):
    """
    Wait until every worker process of C{monitor} has exited.

    C{ProcessMonitor.stopService} sends SIGTERM and returns at once: worker 0
    exited while the others still drained their peers, and a service
    manager that kills what is left of the group (systemd's default) then
    cut those peers off without their Close. The monitor's own timer sends
    SIGKILL after its C{killTime}; this gives up a little after that.

    @return: a Deferred firing with the names of the workers still running
        when it gave up (an empty list once all have exited).
    """
    ended = defer.Deferred()
    deadline = clock.seconds() + monitor.killTime + WORKER_EXIT_GRACE

    def check():
        running = sorted(monitor.protocols)
        if not running or clock.seconds() >= deadline:
            loop.stop()
            ended.callback(running)

    loop = LoopingCall(check)
    loop.clock = clock
    loop.start(interval, now=True)
    return ended


def makeSupervisor(config, reactor):
    """
    A L{ProcessMonitor} running workers 1 … N-1 (this process is worker 0),
    which write their own output (L{SharedOutput}).
    """
    monitor = ProcessMonitor(SharedOutput(reactor))
    monitor.killTime = 35
    argv = [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        "relay",
    ]
    for index in range(1, config.workers):
        monitor.addProcess(
            f"relay-worker-{index}", argv, env=workerEnvironment(config, index), cwd=os.getcwd()
        )
    return monitor
