"""
Peer protocol v1: the messages openZro / NetBird agents exchange with a relay.

Pure functions over C{bytes}; no I/O. The layouts are fixed by the Go
implementation that deployed agents run (docs/protocol.md): every message
is C{[version=1][type][body]}, ids are 36 bytes (C{b"sha-"} + a SHA-256
digest), and every size limit below is one the agents rely on.
"""

from base64 import b64encode
from hashlib import sha256

VERSION = 1

HELLO = 1
HELLO_RESPONSE = 2
TRANSPORT = 3
CLOSE = 4
HEALTH_CHECK = 5
AUTH = 6
AUTH_RESPONSE = 7
SUBSCRIBE_PEER_STATE = 8
UNSUBSCRIBE_PEER_STATE = 9
PEERS_ONLINE = 10
PEERS_WENT_OFFLINE = 11

NAMES = {
    HELLO: "hello",
    HELLO_RESPONSE: "hello response",
    TRANSPORT: "transport",
    CLOSE: "close",
    HEALTH_CHECK: "health check",
    AUTH: "auth",
    AUTH_RESPONSE: "auth response",
    SUBSCRIBE_PEER_STATE: "subscribe peer state",
    UNSUBSCRIBE_PEER_STATE: "unsubscribe peer state",
    PEERS_ONLINE: "peers online",
    PEERS_WENT_OFFLINE: "peers went offline",
}

CLIENT_TYPES = frozenset(
    {HELLO, TRANSPORT, CLOSE, HEALTH_CHECK, AUTH, SUBSCRIBE_PEER_STATE, UNSUBSCRIBE_PEER_STATE}
)

MAGIC = b"\x21\x12\xa4\x42"
ID_PREFIX = b"sha-"
ID_SIZE = 36
HEADER_SIZE = 2
AUTH_HEADER_SIZE = HEADER_SIZE + len(MAGIC) + ID_SIZE
TRANSPORT_HEADER_SIZE = HEADER_SIZE + ID_SIZE

MAX_HANDSHAKE_SIZE = 212
MAX_HANDSHAKE_RESPONSE_SIZE = 8192
MAX_MESSAGE_SIZE = 8820
MAX_IDS_PER_MESSAGE = 244

CLOSE_MESSAGE = bytes((VERSION, CLOSE))
HEALTH_CHECK_MESSAGE = bytes((VERSION, HEALTH_CHECK))


class MessageError(ValueError):
    """
    A message that does not follow peer protocol v1.

    @ivar reason: a short, stable, label-safe word for logs and metrics.
    """

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def peerID(name):
    """
    The 36-byte id of the peer whose public name is C{name} (a str).
    """
    return ID_PREFIX + sha256(name.encode("utf-8")).digest()


def humanID(pid):
    """
    The form peer ids take in logs: C{"sha-" + base64(digest)}.

    Both the peer side and the cluster fabric log ids that a stranger chose
    (an agent's Auth, a pod's WHO_HAS or FWD), so anything that is not a
    well-formed id is shown as the hex of at most its first 36 bytes: a log
    line never fails on hostile input, and never carries its control
    characters or its length.

    @param pid: any bytes-like object.
    """
    head = bytes(pid[:ID_SIZE])
    if len(pid) == ID_SIZE and head.startswith(ID_PREFIX):
        return "sha-" + b64encode(head[len(ID_PREFIX) :]).decode("ascii")
    return "invalid:" + head.hex()


def messageType(message):
    """
    Check the header of a message received from a client.

    @return: the message type.
    @raise MessageError: empty or short message, wrong version, or a type a
        client may not send.
    """
    if len(message) < HEADER_SIZE:
        raise MessageError("malformed", f"{len(message)}-byte message")
    if message[0] != VERSION:
        raise MessageError("bad_version", f"version {message[0]}")
    kind = message[1]
    if kind not in CLIENT_TYPES:
        raise MessageError("bad_type", f"type {kind} from a client")
    return kind


def encodeAuth(pid, token):
    """
    The Auth message a client sends first.
    """
    if len(pid) != ID_SIZE:
        raise MessageError("malformed", "peer id must be 36 bytes")
    return bytes((VERSION, AUTH)) + MAGIC + pid + token


def decodeAuth(message):
    """
    @return: C{(peer id, token)} of an Auth message.
    @raise MessageError: short message or wrong magic.
    """
    if len(message) < AUTH_HEADER_SIZE:
        raise MessageError("malformed", f"{len(message)}-byte auth message")
    if message[HEADER_SIZE : HEADER_SIZE + 4] != MAGIC:
        raise MessageError("bad_magic")
    return bytes(message[6:AUTH_HEADER_SIZE]), bytes(message[AUTH_HEADER_SIZE:])


def encodeAuthResponse(instanceURL):
    """
    The server's answer to a successful Auth: the instance URL.
    """
    message = bytes((VERSION, AUTH_RESPONSE)) + instanceURL.encode("utf-8")
    if len(message) > MAX_HANDSHAKE_RESPONSE_SIZE:
        raise MessageError("too_large", "instance URL too long for a handshake response")
    return message


def decodeAuthResponse(message):
    """
    @return: the instance URL in an AuthResponse.
    """
    if len(message) < HEADER_SIZE or message[0] != VERSION or message[1] != AUTH_RESPONSE:
        raise MessageError("malformed", "not an auth response")
    try:
        return bytes(message[HEADER_SIZE:]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise MessageError("malformed", "instance URL is not UTF-8") from e


def encodeTransport(pid, payload):
    """
    A Transport message: to C{pid} when a client sends it, from C{pid} when the
    relay delivers it.
    """
    if len(pid) != ID_SIZE:
        raise MessageError("malformed", "peer id must be 36 bytes")
    message = bytes((VERSION, TRANSPORT)) + pid + payload
    if len(message) > MAX_MESSAGE_SIZE:
        raise MessageError("too_large", f"{len(message)}-byte transport message")
    return message


def decodeTransport(message):
    """
    @return: C{(peer id, payload)} of a Transport message.
    """
    if len(message) < TRANSPORT_HEADER_SIZE:
        raise MessageError("malformed", f"{len(message)}-byte transport message")
    return bytes(message[HEADER_SIZE:TRANSPORT_HEADER_SIZE]), bytes(message[TRANSPORT_HEADER_SIZE:])


def encodeIDList(kind, ids, maxSize=MAX_MESSAGE_SIZE):
    """
    Messages of type C{kind} (subscribe, unsubscribe, online, offline) that
    carry C{ids}, each at most C{maxSize} bytes: 244 ids to a message at
    the default 8820, fewer for a link with smaller messages (a QUIC
    datagram), but always at least one.

    @return: a list of messages; empty when C{ids} is.
    """
    ids = list(ids)
    for pid in ids:
        if len(pid) != ID_SIZE:
            raise MessageError("malformed", "peer id must be 36 bytes")
    header = bytes((VERSION, kind))
    perMessage = max(1, min(MAX_IDS_PER_MESSAGE, (maxSize - HEADER_SIZE) // ID_SIZE))
    return [header + b"".join(ids[i : i + perMessage]) for i in range(0, len(ids), perMessage)]


def decodeIDList(message):
    """
    @return: the ids in a subscribe, unsubscribe, online or offline message.
    @raise MessageError: a body whose length is not a multiple of 36.
    """
    body = message[HEADER_SIZE:]
    if len(body) % ID_SIZE:
        raise MessageError("malformed", f"{len(body)}-byte id list")
    return [bytes(body[i : i + ID_SIZE]) for i in range(0, len(body), ID_SIZE)]
