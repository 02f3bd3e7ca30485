"""
C{--log-format json}: one plain JSON object per line, as log shippers read.
"""

import io
import json
from datetime import datetime

from twisted.logger import Logger, LogLevel
from twisted.logger._legacy import publishToNewObserver
from twisted.python.failure import Failure
from twisted.python.log import textFromEventDict
from twisted.trial import unittest

from relay.logjson import JSONLines, jsonLinesFileLogObserver
from relay.service import makeLogObserver
from tests.test_service import REQUIRED, config

T = 1795823970.25

# What Twisted's own JSON observer wrote: none of it may appear.
TWISTED_KEYS = (
    "log_logger",
    "log_source",
    "log_format",
    "log_flattened",
    "log_namespace",
    "log_level",
    "log_time",
    "__class_uuid__",
    "unpersistable",
)


class Thing:
    def __str__(self):
        return "thing-7"


class Unprintable:
    def __str__(self):
        raise ValueError("no")


def event(fmt, **kw):
    e = {
        "log_format": fmt,
        "log_time": T,
        "log_level": LogLevel.info,
        "log_namespace": "relay.peer.PeerSession",
        "log_source": object(),
        "log_logger": Logger(),
    }
    e.update(kw)
    return e


def parsed(line):
    """
    The one JSON object of C{line}, which must be a whole plain line.
    """
    assert line.endswith("\n") and line.count("\n") == 1, repr(line)
    assert "\x1e" not in line
    return json.loads(line)


class JSONLinesTests(unittest.TestCase):
    def test_plainObject(self):
        line = parsed(
            JSONLines()(
                event(
                    "{peer}: connected after {ms} ms", peer=Thing(), ms=12, log_level=LogLevel.warn
                )
            )
        )
        self.assertEqual(line["msg"], "thing-7: connected after 12 ms")
        self.assertEqual(line["level"], "warning")
        self.assertEqual(line["logger"], "relay.peer.PeerSession")
        self.assertEqual(line["peer"], "thing-7")
        self.assertEqual(line["ms"], 12)
        for key in TWISTED_KEYS:
            self.assertNotIn(key, line)
        self.assertEqual(set(line), {"time", "level", "msg", "logger", "peer", "ms"})

    def test_rfc3339Time(self):
        stamp = parsed(JSONLines()(event("x")))["time"]
        self.assertRegex(stamp, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}([+-]\d\d:\d\d|Z)$")
        self.assertEqual(datetime.fromisoformat(stamp).timestamp(), T)

    def test_timeEachSecond(self):
        format = JSONLines()
        stamps = [
            parsed(format(event("x", log_time=T + d)))["time"]
            for d in (0, 0.5, 0.625, 1.0, 3600.125)
        ]
        self.assertEqual(
            [datetime.fromisoformat(s).timestamp() for s in stamps],
            [T, T + 0.5, T + 0.625, T + 1, T + 3600.125],
        )

    def test_levels(self):
        names = [
            parsed(JSONLines()(event("x", log_level=level)))["level"]
            for level in LogLevel.iterconstants()
        ]
        self.assertEqual(names, ["debug", "info", "warning", "error", "critical"])

    def test_valuesArePlainJSON(self):
        line = parsed(
            JSONLines()(
                event(
                    "values",
                    flag=True,
                    none=None,
                    ratio=0.5,
                    inf=float("inf"),
                    nan=float("nan"),
                    raw=b"\xff\x00ab",
                    ids=("a", 1, Thing()),
                    table={1: Thing()},
                    thing=Thing(),
                    broken=Unprintable(),
                    text="\x1b[31mred\nline\u2603",
                )
            )
        )
        self.assertEqual(line["flag"], True)
        self.assertIsNone(line["none"])
        self.assertEqual(line["ratio"], 0.5)
        self.assertEqual(line["inf"], "inf")
        self.assertEqual(line["nan"], "nan")
        self.assertEqual(line["raw"], "\\xff\x00ab")
        self.assertEqual(line["ids"], ["a", 1, "thing-7"])
        self.assertEqual(line["table"], {"1": "thing-7"})
        self.assertEqual(line["thing"], "thing-7")
        self.assertEqual(line["broken"], "<unprintable Unprintable>")
        self.assertEqual(line["text"], "\x1b[31mred\nline\u2603")

    def test_asciiOnly(self):
        """
        Every line is ASCII: control characters, non-ASCII text and lone
        surrogates (undecodable bytes) are escaped, so no output encoding
        can fail on it.
        """
        line = JSONLines()(event("{who}", who="\udcff\u00e9\x00"))
        line.encode("ascii")
        self.assertEqual(parsed(line)["msg"], "\udcff\u00e9\x00")

    def test_reservedFieldNames(self):
        line = parsed(
            JSONLines({"worker": 2})(
                event(
                    "{time} {level} {msg}",
                    time=1,
                    level="x",
                    msg="m",
                    logger="l",
                    worker=9,
                    message="kept",
                    system="kept",
                )
            )
        )
        self.assertEqual((line["message"], line["system"]), ("kept", "kept"))
        self.assertEqual(line["msg"], "1 x m")
        self.assertEqual(
            (
                line["fields.time"],
                line["fields.level"],
                line["fields.msg"],
                line["fields.logger"],
                line["fields.worker"],
            ),
            (1, "x", "m", "l", 9),
        )
        self.assertEqual(line["worker"], 2)
        self.assertEqual(line["level"], "info")

    def test_failureTraceback(self):
        try:
            1 / 0  # noqa: B018 raises the ZeroDivisionError whose traceback is logged
        except ZeroDivisionError:
            failure = Failure()
        line = parsed(
            JSONLines()(
                event(
                    "handling {name} failed",
                    name="x",
                    log_failure=failure,
                    log_level=LogLevel.critical,
                )
            )
        )
        self.assertEqual(line["msg"], "handling x failed")
        self.assertIn("Traceback", line["traceback"])
        self.assertIn("ZeroDivisionError", line["traceback"])

    def test_legacyError(self):
        """
        C{twisted.python.log.err} (what Twisted itself uses for an unhandled
        error): its message, and the traceback in its own field.
        """
        try:
            1 / 0  # noqa: B018 raises the ZeroDivisionError whose traceback is logged
        except ZeroDivisionError:
            failure = Failure()
        lines = []
        legacy = {
            "message": (),
            "isError": 1,
            "failure": failure,
            "why": "Unhandled Error",
            "time": T,
            "system": "-",
            "printed": 0,
        }
        publishToNewObserver(lambda e: lines.append(JSONLines()(e)), legacy, textFromEventDict)
        line = parsed(lines[0])
        self.assertEqual(line["msg"], "Unhandled Error")
        self.assertEqual(line["level"], "critical")
        self.assertEqual(line["logger"], "log_legacy")
        self.assertIn("ZeroDivisionError", line["traceback"])
        self.assertEqual(set(line), {"time", "level", "msg", "logger", "traceback"})

    def test_legacyMessage(self):
        lines = []
        publishToNewObserver(
            lambda e: lines.append(JSONLines()(e)),
            {"message": ("Main loop terminated.",), "isError": 0, "time": T, "system": "-"},
            textFromEventDict,
        )
        self.assertEqual(
            parsed(lines[0]),
            {
                "time": parsed(lines[0])["time"],
                "level": "info",
                "msg": "Main loop terminated.",
                "logger": "log_legacy",
            },
        )

    def test_unusualFormats(self):
        """
        What the text format hands to Twisted's formatter is rendered the
        same way here, and every line is still JSON.
        """
        self.assertIn("Unable to format event", parsed(JSONLines()(event("missing {key}")))["msg"])
        self.assertEqual(
            parsed(JSONLines()(event("{thing.__str__()}", thing=Thing())))["msg"], "thing-7"
        )
        self.assertEqual(parsed(JSONLines()(event("{{braces}}")))["msg"], "{braces}")
        self.assertIsNone(JSONLines()(event("")))
        self.assertIsNone(JSONLines()(event(None)))

    def test_noTime(self):
        line = event("x")
        del line["log_time"]
        self.assertIsNone(parsed(JSONLines()(line))["time"])

    def test_observerWrites(self):
        stream = io.StringIO()
        observer = jsonLinesFileLogObserver(stream)
        observer(event("a"))
        observer(event("b"))
        self.assertEqual(
            [parsed(line + "\n")["msg"] for line in stream.getvalue().splitlines()], ["a", "b"]
        )


class OptionTests(unittest.TestCase):
    def lines(self, argv, env=None):
        stream = io.StringIO()
        options = config(REQUIRED + argv, env) if env is not None else config(REQUIRED + argv)
        Logger(observer=makeLogObserver(options, stream), namespace="relay.test").info(
            "hello {who}", who="peer"
        )
        return stream.getvalue()

    def test_jsonFormat(self):
        line = parsed(self.lines(["--log-format", "json"]))
        self.assertEqual(
            (line["msg"], line["who"], line["logger"], line["level"]),
            ("hello peer", "peer", "relay.test", "info"),
        )
        self.assertNotIn("worker", line)

    def test_workerIndex(self):
        """
        With C{--workers}, every line says which worker wrote it.
        """
        self.assertEqual(
            parsed(self.lines(["--log-format", "json", "--workers", "2"]))["worker"], 0
        )
        self.assertIn(" [worker-0 relay.test#info] hello peer\n", self.lines(["--workers", "2"]))
        self.assertIn(" [relay.test#info] hello peer\n", self.lines([]))
