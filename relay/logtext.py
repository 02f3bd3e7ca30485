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
    """

    def __init__(self):
        self._second = None
        self._stamp = ""

    def __call__(self, event):
        fmt = event.get("log_format")
        when = event.get("log_time")
        if type(fmt) is not str or "()" in fmt or "log_flattened" in event or "log_failure" in event or when is None:
            return formatEventAsClassicLogText(event)
        try:
            text = fmt.format_map(event)
        except Exception:
            return formatEventAsClassicLogText(event)
        if not text:
            return None
        second = int(when)
        if second != self._second:
            self._second = second
            self._stamp = formatTime(second)
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
        else:
            try:
                system = str(system)
            except Exception:
                system = "UNFORMATTABLE"
        return f"{self._stamp} [{system}] {text}".replace("\n", "\n\t") + "\n"


def classicFileLogObserver(stream):
    """
    L{twisted.logger.textFileLogObserver} with L{ClassicText}.
    """
    return FileLogObserver(stream, ClassicText())
