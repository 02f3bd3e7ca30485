"""
Twisted's classic log text, at a fraction of its cost.

A relay logs a line when a peer connects and when it leaves, so formatting
is part of every handshake. L{twisted.logger.formatEventAsClassicLogText}
spends most of its time on things that do not change from line to line: it
builds C{Optional[Union[str, bytes]]} (a typing cache lookup) for every
event, and converts the timestamp with a time zone lookup although the text
only changes once a second. L{ClassicText} produces the same text byte for
byte (C{tests.test_logtext} checks it against Twisted's) and hands anything
unusual (flattened events, tracebacks, call syntax in the format, a format
that fails) to Twisted's own formatter.
"""

from twisted.logger import FileLogObserver, formatEventAsClassicLogText, formatTime


class ClassicText:
    """
    A C{formatEvent} for L{FileLogObserver}: C{formatEventAsClassicLogText}
    with the timestamp cached per second.

    @param tag: put before the system of every line (e.g. C{worker-1} with
        C{--workers}, whose processes share one output).
    """

    def __init__(self, tag=None):
        self._second = None
        self._stamp = ""
        self._tag = f"{tag} " if tag else ""

    def __call__(self, event):
        fmt = event.get("log_format")
        when = event.get("log_time")
        if (
            type(fmt) is not str
            or "()" in fmt
            or "log_flattened" in event
            or "log_failure" in event
            or when is None
        ):
            return self._twisted(event)
        try:
            text = fmt.format_map(event)
        except Exception:
            return self._twisted(event)
        if not text:
            return None
        second = int(when)
        if second != self._second:
            self._second = second
            self._stamp = formatTime(second)
        return f"{self._stamp} [{self._tag}{_system(event)}] {text}".replace("\n", "\n\t") + "\n"

    def _twisted(self, event):
        if self._tag:
            event = dict(event, log_system=self._tag + _system(event))
        return formatEventAsClassicLogText(event)


def _system(event):
    """
    The system part of a classic line, as Twisted writes it.
    """
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        return f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
    try:
        return str(system)
    except Exception:
        return "UNFORMATTABLE"


def classicFileLogObserver(stream, tag=None):
    """
    L{twisted.logger.textFileLogObserver} with L{ClassicText}.
    """
    return FileLogObserver(stream, ClassicText(tag))


def quoted(text, limit=100):
    """
    Text a stranger sent (a Close reason, a header), fit for one log line:
    its first C{limit} characters, quoted, with control characters, quotes
    and backslashes escaped (C{repr}), and C{...} after it when cut.
    """
    if text is None:
        return "''"
    if len(text) > limit:
        return repr(text[:limit]) + "..."
    return repr(text)
