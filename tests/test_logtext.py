"""
The relay's log text is Twisted's classic log text, byte for byte.
"""

from io import StringIO

from twisted.logger import LogLevel, eventAsJSON, eventFromJSON, formatEventAsClassicLogText
from twisted.python.failure import Failure
from twisted.trial import unittest

from relay import logtext
from relay.logtext import ClassicText, classicFileLogObserver

T = 1795823970.25


class Thing:
    value = 7

    def __repr__(self):
        return "<Thing 7>"


def event(fmt, **kw):
    e = {
        "log_format": fmt,
        "log_time": T,
        "log_level": LogLevel.info,
        "log_namespace": "relay.peer.PeerSession",
    }
    e.update(kw)
    return e


EVENTS = [
    event("{peer}: connected", peer=Thing()),
    event("{peer!r} and {peer.value} and {n:05d}", peer=Thing(), n=42),
    event("two\nlines\n", log_level=LogLevel.warn),
    event("unicode: \u00e9\u2603"),
    event("from a system", log_system="cluster"),
    event("no level", log_level=None),
    event("no namespace", log_namespace=None),
    event(""),
    event(None),
    event(b"bytes format"),
    event("missing {key}"),
    event("call syntax {thing.__repr__()}", thing=Thing()),
    event("{{literal braces}}"),
    event("next second", log_time=T + 1),
    event("same second again", log_time=T + 1.5),
    event("an hour on", log_time=T + 3600),
]


class ClassicTextTests(unittest.TestCase):
    def test_sameAsTwisted(self):
        format = ClassicText()
        for e in EVENTS:
            self.assertEqual(format(e), formatEventAsClassicLogText(e), e["log_format"])

    def test_failureSameAsTwisted(self):
        try:
            1 / 0  # noqa: B018 raises the ZeroDivisionError whose traceback is logged
        except ZeroDivisionError:
            e = event("it broke", log_failure=Failure())
        self.assertIn("ZeroDivisionError", ClassicText()(e))
        self.assertEqual(ClassicText()(e), formatEventAsClassicLogText(e))

    def test_flattenedSameAsTwisted(self):
        """
        An event that went through a JSON round trip (flattened) is
        formatted the same way.
        """
        e = eventFromJSON(eventAsJSON(event("{peer}: connected", peer="p")))
        self.assertIn("log_flattened", e)
        self.assertEqual(ClassicText()(e), formatEventAsClassicLogText(e))

    def test_plainEventsSkipTwistedsFormatter(self):
        """
        An ordinary event never reaches Twisted's formatter, and the time
        is converted once per second.
        """
        stamps = []

        def formatTime(when):
            stamps.append(when)
            return f"<{when}>"

        def forbidden(event):
            raise AssertionError("the slow path was taken")

        self.patch(logtext, "formatTime", formatTime)
        self.patch(logtext, "formatEventAsClassicLogText", forbidden)
        format = ClassicText()
        lines = [
            format(event("a {n}", n=1)),
            format(event("b", log_time=T + 0.5)),
            format(event("c", log_time=T + 1)),
        ]
        self.assertEqual(
            lines,
            [
                f"<{int(T)}> [relay.peer.PeerSession#info] a 1\n",
                f"<{int(T)}> [relay.peer.PeerSession#info] b\n",
                f"<{int(T) + 1}> [relay.peer.PeerSession#info] c\n",
            ],
        )
        self.assertEqual(stamps, [int(T), int(T) + 1])

    def test_observerWrites(self):
        stream = StringIO()
        classicFileLogObserver(stream)(EVENTS[0])
        self.assertEqual(stream.getvalue(), formatEventAsClassicLogText(EVENTS[0]))
        self.assertTrue(stream.getvalue().endswith("] <Thing 7>: connected\n"))

    def test_tag(self):
        """
        A tag goes before the system of every line, on the fast path and
        through Twisted's formatter alike.
        """
        format = ClassicText("worker-1")
        for e in EVENTS:
            plain = formatEventAsClassicLogText(e)
            if plain is None:
                self.assertIsNone(format(e))
                continue
            stamp, system = plain.split(" [", 1)
            if "Unable to format event" in plain:
                # The text quotes the whole event.
                system = system.split("]", 1)[0]
                self.assertTrue(
                    format(e).startswith(f"{stamp} [worker-1 {system}] Unable to format event")
                )
            else:
                self.assertEqual(format(e), f"{stamp} [worker-1 {system}")


class QuotedTests(unittest.TestCase):
    def test_escapedAndCut(self):
        self.assertEqual(logtext.quoted("a\nb\x1b[2J'\\"), repr("a\nb\x1b[2J'\\"))
        self.assertEqual(logtext.quoted("x" * 101), "'" + "x" * 100 + "'...")
        self.assertEqual(logtext.quoted("x" * 100), "'" + "x" * 100 + "'")
        self.assertEqual(logtext.quoted("abc", 2), "'ab'...")
        self.assertEqual(logtext.quoted(None), "''")
        for control in "\n\r\t\x00\u2028":
            self.assertNotIn(control, logtext.quoted(control))
