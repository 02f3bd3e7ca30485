"""
JSON lines for log shippers (C{--log-format json}).

Twisted's own C{jsonFileLogObserver} writes its internal event dictionary
for a machine to load back (C{log_logger}, C{log_source}, flattened formats)
after an RFC 7464 record separator. Loki, Fluent Bit, Vector and Elastic
want one plain object per line with a time, a level and a message, as the Go
relay's logrus writes. L{JSONLines} writes that: C{time} (RFC 3339, local
time zone, milliseconds), C{level}, C{msg} (the rendered text), C{logger}
(the namespace), the event's own fields as plain JSON values, and for a
failure its C{traceback}; Twisted's bookkeeping keys are left out.

Like L{relay.logtext.ClassicText}, it keeps per-event work small: the time
text is rebuilt once a second, and an ordinary event is rendered with one
C{str.format_map}.
"""

import json
import math
from datetime import datetime

from twisted.logger import FileLogObserver, LogLevel, formatEvent
from twisted.python.failure import Failure

# logrus's names, which shippers map to severities.
LEVELS = {
    LogLevel.debug: "debug",
    LogLevel.info: "info",
    LogLevel.warn: "warning",
    LogLevel.error: "error",
    LogLevel.critical: "critical",
}

# The keys of a line; an event field of the same name is written as
# "fields.<name>", as logrus does.
RESERVED = frozenset(("time", "level", "msg", "logger", "traceback", "worker"))

# What twisted.python.log's events carry besides their fields.
_LEGACY_KEYS = frozenset(
    ("message", "isError", "system", "time", "format", "why", "failure", "printed", "logLevel")
)

_encode = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode


def _plain(value, depth=0):
    """
    C{value} as something C{json} writes as itself: scalars as they are,
    lists and mappings element by element (two levels deep), anything else
    as its text.
    """
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        return value if math.isfinite(value) else str(value)
    if kind is bytes:
        return value.decode("utf-8", "backslashreplace")
    if depth < 2:
        if kind is list or kind is tuple or kind is set or kind is frozenset:
            return [_plain(item, depth + 1) for item in value]
        if kind is dict:
            return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    try:
        return str(value)
    except Exception:
        return f"<unprintable {kind.__name__}>"


class JSONLines:
    """
    A C{formatEvent} for L{FileLogObserver}: one JSON object and a newline
    per event.

    @param fields: keys and values added to every line (e.g. the worker's
        index with C{--workers}).
    """

    def __init__(self, fields=None):
        self._fields = dict(fields or {})
        self._second = None
        self._stamp = ""
        self._zone = ""

    def _time(self, when):
        second = math.floor(when)
        if second != self._second:
            local = datetime.fromtimestamp(second).astimezone()
            offset = local.strftime("%z")
            self._second = second
            self._stamp = local.strftime("%Y-%m-%dT%H:%M:%S")
            self._zone = f"{offset[:3]}:{offset[3:]}" if offset else "Z"
        return f"{self._stamp}.{int((when - second) * 1000):03d}{self._zone}"

    def __call__(self, event):
        failure = event.get("log_failure")
        legacyFailure = (
            failure is None and event.get("isError") and isinstance(event.get("failure"), Failure)
        )
        if legacyFailure:
            # twisted.python.log.err: the traceback goes in its own field,
            # not in the message.
            failure = event["failure"]
            text = event.get("why") or "Unhandled Error"
        else:
            fmt = event.get("log_format")
            text = None
            if type(fmt) is str and "()" not in fmt and "log_flattened" not in event:
                try:
                    text = fmt.format_map(event)
                except Exception:
                    pass
            if text is None:
                text = formatEvent(event)
        if not text and failure is None:
            return None
        when = event.get("log_time")
        line = {
            "time": self._time(when) if when is not None else None,
            "level": LEVELS.get(event.get("log_level"), "info"),
            "msg": text,
            "logger": event.get("log_namespace") or "-",
        }
        # The keys twisted.python.log adds (to its own events, and to others
        # when a legacy observer saw them first), only in events that have
        # them: a new-style event may well have a field named "message".
        legacy = _LEGACY_KEYS if "isError" in event else ()
        for key, value in event.items():
            if key.startswith(("log_", "__")) or key in legacy:
                continue
            line[f"fields.{key}" if key in RESERVED else key] = _plain(value)
        if failure is not None:
            try:
                line["traceback"] = failure.getTraceback()
            except Exception:
                line["traceback"] = "(the traceback could not be formatted)"
        if self._fields:
            line.update(self._fields)
        return _encode(line) + "\n"


def jsonLinesFileLogObserver(stream, fields=None):
    """
    A L{FileLogObserver} writing L{JSONLines} to C{stream}.
    """
    return FileLogObserver(stream, JSONLines(fields))
