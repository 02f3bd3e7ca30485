"""
What L{relay.listener.ws} takes from Autobahn beyond its public API.

Autobahn's public server API (C{onConnect}, C{onOpen}, C{onMessage},
C{onClose}, C{sendMessage}, C{setProtocolOptions}) runs every frame through
its own parser. relay.listener.ws parses the frames that make up nearly all traffic
itself (its lean path) and leaves the rest to Autobahn, which takes knowing
the moment the opening handshake is done, knowing when Autobahn's parser is
between frames, and taking back what it holds; a few hooks Autobahn only
has under private names do the rest. Each of those is a name here, with why
and what it is worth; C{tests/test_internals_autobahn.py} checks each one
against the installed Autobahn and names the version and the missing piece
when one is gone.

Figures: this project's 2-core machine, shared with other work (so given as
the range over two sessions, each the best of 5), Autobahn 26.11.1, a
L{relay.listener.ws.PeerWebSocketProtocol} over a StringTransport.
"""

from pprint import pformat

import autobahn
import autobahn.websocket.protocol as _protocol
import txaio
from autobahn.twisted.websocket import WebSocketServerProtocol

VERSION = autobahn.__version__

# The beginnings of the reasons Autobahn gives C{failHandshake} for an Origin
# header it refuses itself (unparsable, or "null"), before C{onConnect}.
ORIGIN_REFUSALS = ("HTTP Origin header invalid", "WebSocket connection denied: origin")


def _pformatForDebug(value):
    """
    Autobahn's C{pformat}, which it only calls for the arguments of debug
    lines: the text is built only when txaio passes debug lines on at all
    (it does not unless its global level is lowered).
    """
    if txaio.get_global_log_level() in ("debug", "trace"):
        return pformat(value)
    return ""


def formatOnlyForDebug():
    """
    Make Autobahn build the text of its debug lines only when they are
    logged, by replacing the C{pformat} its protocol module imported.

    Autobahn pretty-prints its ~30 options for a debug line on every new
    connection, whether the line is logged or not. Worth: 84 us of
    pure-Python C{pformat} per connection; accept and upgrade take 71-157
    us with this, 170-205 us without.
    """
    _protocol.pformat = _pformatForDebug


class ServerProtocol(WebSocketServerProtocol):
    """
    Autobahn's server protocol, with the private parts relay.listener.ws uses
    under names of ours.

    Worth of the lean path that L{opened}, L{betweenFrames} and
    L{takeBuffered} make possible: a relayed 1,400-byte message (16 per
    read) costs 1.2-1.7 us there, 8.7-17.7 us through Autobahn's parser.
    """

    def opened(self):
        """
        Called once the opening handshake is done (the 101 answer written),
        before Autobahn parses anything that followed the request in the
        same read. A hook of ours, from Autobahn's C{_onOpen}: its C{onOpen}
        is called at the same point, but is the application's to override.
        """

    def _onOpen(self):
        super()._onOpen()
        self.opened()

    def betweenFrames(self):
        """
        Whether the connection is open and Autobahn's frame parser is between
        frames: no frame header read whose payload is still to come
        (C{current_frame}), no fragmented message under way
        (C{inside_message}). Bytes from here on may be parsed elsewhere.
        """
        return (
            self.state == self.STATE_OPEN and self.current_frame is None and not self.inside_message
        )

    def insideMessage(self):
        """
        Whether Autobahn is within a fragmented message (C{inside_message}):
        a control frame now sits between its fragments.
        """
        return self.inside_message

    def takeBuffered(self):
        """
        Empty Autobahn's receive buffer (C{data}), which holds what it has
        not parsed yet, between frames an incomplete frame header.

        @return: those bytes.
        """
        data, self.data = self.data, b""
        return data

    def stopParsing(self):
        """
        Make Autobahn ignore everything that arrives from now on: its
        C{dataReceived} parses nothing once C{state} is C{STATE_CLOSED}.
        Worth: a refused connection's answer, then a close, without
        Autobahn answering what follows the refused bytes.
        """
        self.state = self.STATE_CLOSED

    def messageTooLarge(self, size, limit, reason):
        """
        Called for a frame or message over C{maxFramePayloadSize} /
        C{maxMessagePayloadSize}, instead of Autobahn failing the connection
        itself. A hook of ours, from Autobahn's C{_max_message_size_exceeded}:
        with C{failByDrop} Autobahn closes without a Close frame, so no
        public callback ever sees code 1009, and the relay counts these.
        """
        super()._max_message_size_exceeded(size, limit, reason)

    def _max_message_size_exceeded(self, size, limit, reason):
        self.messageTooLarge(size, limit, reason)
