"""
The relay's log budget for lines the libraries write.

The relay's own lines about what strangers send go through its
L{relay.limits.LogBudget}; Autobahn and Twisted write lines of their own for
the same traffic: Autobahn one or two per failed upgrade, protocol violation,
unclean drop or failed TLS handshake, Twisted's TCP port several per accept
that fails for want of file descriptors (C{EMFILE}), which repeats as long as
connections keep arriving. L{StrangerLines} puts those under the same budget,
as a predicate of the log observer: that is the one place all of them pass.
"""

from twisted.logger import ILogFilterPredicate, PredicateResult
from zope.interface import implementer

# Namespaces whose every line is caused by what a connection sent or did.
NOISY_NAMESPACES = (
    "autobahn.",
    # Port._logger: only the accept loop logs through it.
    "twisted.internet.tcp.Port",
)

# The line Twisted logs for each connection it accepts and closes at once
# because the process is out of file descriptors.
EMFILE_CLOSED = "EMFILE recovery: Closed socket from {address}"


@implementer(ILogFilterPredicate)
class StrangerLines:
    """
    Lets library lines about peer traffic through while the budget allows.

    @param budget: the L{relay.limits.LogBudget} (its calls are
        C{budget(emit, format, **fields)}; C{emit} runs if the line is
        within budget, else the line is counted in its summary).
    @param counters: the L{relay.counters.RelayCounters} for L{count}.
    """

    def __init__(self, budget, counters=None):
        self.budget = budget
        self.counters = counters

    def __call__(self, event):
        namespace = event.get("log_namespace")
        if type(namespace) is not str or not namespace.startswith(NOISY_NAMESPACES):
            return PredicateResult.maybe
        allowed = []
        self.budget(lambda format: allowed.append(True), None)
        return PredicateResult.yes if allowed else PredicateResult.no

    def count(self, event):
        """
        A predicate that only counts, to run before the level filter: a
        connection Twisted closes at once for want of descriptors is a
        refused handshake (C{no_descriptors}), and Twisted reports it only
        as a log line.
        """
        if self.counters is not None and event.get("log_format") == EMFILE_CLOSED:
            self.counters.handshakeRejects["no_descriptors"] += 1
        return PredicateResult.maybe
