"""
Conformance of a real relay process with the peer protocol v1.

The client here is built from /work/shared/PROTOCOL.md (sections 1, 2.1, 2.2
and the test vectors of section 4) and RFC 6455 only: it shares no code with
the relay.  Each test starts its own relay with `twistd -n relay` on a free
127.0.0.1 port and talks to it over real sockets with L{tests.wsraw}.

Waiting for the absence of a message uses a barrier instead of a sleep: a
message that must not arrive would have been written to the same connection
before a later message from another peer whose sending the server processed
afterwards; so when that later message arrives first, the other never will.
"""

import atexit
import hashlib
import hmac
import os
import signal
import socket
import subprocess
import sys
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests import wsraw
from tests.loopback import freePort

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SECRET = b"relay-secret"
# Tokens sent to the live relay expire a day after the run starts; the fixed
# 2030-01-01 expiry is only for the byte-exact section 4 vectors.
EXPIRY = int(time.time()) + 86400
VECTOR_EXPIRY = 1893456000
MAGIC = bytes.fromhex("2112a442")
MAX_MESSAGE = 8820
MAX_HANDSHAKE = 212
IDS_PER_MESSAGE = 244

# Section 4 vectors, as written in PROTOCOL.md.
VECTOR_ID_PEER_A = bytes.fromhex(
    "7368612dbdb94c73d53c44023a715a2970a10c4d54fa9550b70fd9d34cc4b0a2de5ddcbe"
)
VECTOR_ID_PEER_A_HUMAN = "sha-vblMc9U8RAI6cVopcKEMTVT6lVC3D9nTTMSwot5d3L4="
VECTOR_TOKEN = bytes.fromhex(
    "01171b78c230f8924ea423b2db791f90effa360b02a58889d318e4aba5bdfb2eff31383933343536303030"
)
VECTOR_AUTH_RESPONSE_33080 = bytes.fromhex("010772656c3a2f2f3132372e302e302e313a3333303830")

# Message types (section 2).
HELLO, HELLO_RESPONSE, TRANSPORT, CLOSE, HEALTH_CHECK, AUTH, AUTH_RESPONSE = range(1, 8)
SUBSCRIBE, UNSUBSCRIBE, PEERS_ONLINE, PEERS_WENT_OFFLINE = range(8, 12)


# -- an independent codec, from PROTOCOL.md -----------------------------------


def peerID(name):
    return b"sha-" + hashlib.sha256(name.encode()).digest()


def makeToken(expiry=EXPIRY, secret=SECRET, algo=1, payload=None):
    if payload is None:
        payload = str(expiry).encode("ascii")
    key = hashlib.sha256(secret).digest()
    sig = hmac.new(key, payload, hashlib.sha256).digest()
    return bytes([algo]) + sig + payload


def msg(kind, body=b"", version=1):
    return bytes([version, kind]) + body


def authMessage(peer, token=None):
    if token is None:
        token = makeToken()
    return msg(AUTH, MAGIC + peer + token)


def transportMessage(dst, payload):
    return msg(TRANSPORT, dst + payload)


def subscribeMessage(ids):
    return msg(SUBSCRIBE, b"".join(ids))


def unsubscribeMessage(ids):
    return msg(UNSUBSCRIBE, b"".join(ids))


def peersOnline(ids):
    return msg(PEERS_ONLINE, b"".join(ids))


def peersWentOffline(ids):
    return msg(PEERS_WENT_OFFLINE, b"".join(ids))


def splitIDs(body):
    assert len(body) % 36 == 0, len(body)
    return [body[i : i + 36] for i in range(0, len(body), 36)]


# -- the relay process ----------------------------------------------------------


class RelayProcess:
    """
    One `twistd -n relay` child process listening on 127.0.0.1:port.
    """

    def __init__(self, logPath, exposedAddress=None):
        self.logPath = logPath
        self.exposedAddress = exposedAddress
        self.port = None
        self.process = None

    def spawn(self):
        self.port = freePort()
        address = f"127.0.0.1:{self.port}"
        exposed = self.exposedAddress if self.exposedAddress is not None else address
        self._log = open(self.logPath, "wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "relay",
                "--listen-address",
                address,
                "--exposed-address",
                exposed,
                "--auth-secret",
                SECRET.decode(),
                "--metrics-port",
                "0",
                # The protocol, not the per-address limits (tests/test_limits.py):
                # some tests open hundreds of connections from 127.0.0.1 at once.
                "--connection-rate-per-ip",
                "0",
            ],
            cwd=REPO,
            env=os.environ.copy(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def start(self, timeout=15.0):
        self.spawn()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"relay exited with {self.process.returncode}:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("relay did not listen in time:\n" + self.log()) from None
                time.sleep(0.02)  # polling for startup only

    def terminate(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self):
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def log(self):
        try:
            with open(self.logPath, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""


# -- tests -----------------------------------------------------------------------


class VectorTests(unittest.SynchronousTestCase):
    """
    The test client's own codec reproduces the vectors of section 4 (so a
    failure elsewhere is the relay's, not the client's).
    """

    def test_peerID(self):
        self.assertEqual(peerID("peer-a"), VECTOR_ID_PEER_A)
        import base64

        human = "sha-" + base64.b64encode(VECTOR_ID_PEER_A[4:]).decode()
        self.assertEqual(human, VECTOR_ID_PEER_A_HUMAN)

    def test_token(self):
        self.assertEqual(makeToken(VECTOR_EXPIRY), VECTOR_TOKEN)

    def test_authMessage(self):
        auth = authMessage(peerID("peer-a"), makeToken(VECTOR_EXPIRY))
        self.assertEqual(len(auth), 85)
        self.assertEqual(auth, bytes.fromhex("01062112a442") + VECTOR_ID_PEER_A + VECTOR_TOKEN)

    def test_authResponse(self):
        self.assertEqual(msg(AUTH_RESPONSE, b"rel://127.0.0.1:33080"), VECTOR_AUTH_RESPONSE_33080)

    def test_chunkSize(self):
        # 244 ids fit one message, 245 do not.
        self.assertLessEqual(2 + IDS_PER_MESSAGE * 36, MAX_MESSAGE)
        self.assertGreater(2 + (IDS_PER_MESSAGE + 1) * 36, MAX_MESSAGE)


class RelayTestCase(unittest.TestCase):
    """
    Base: a fresh relay per test, clients cleaned up before it stops.

    With C{shareRelay}, the tests of a class share one relay (restarted if
    it died) to save startup time; each test then gets its own peer-id
    namespace (L{pid}) so that tests cannot see each other's peers.
    """

    timeout = 45
    shareRelay = False

    def setUp(self):
        if self.shareRelay:
            cls = type(self)
            relay = cls.__dict__.get("_sharedRelay")
            if relay is None or relay.process.poll() is not None:
                relay = RelayProcess(os.path.abspath(f"relay-{cls.__name__}.log"))
                relay.start()
                cls._sharedRelay = relay
                atexit.register(relay.stop)
            self.relay = relay
            self.namespace = hashlib.sha256(self.id().encode()).hexdigest()[:12] + "/"
        else:
            self.relay = RelayProcess(os.path.abspath(self.mktemp() + ".log"))
            self.relay.start()
            self.addCleanup(self._stopRelay)
            self.namespace = ""
        self.clients = []
        self.addCleanup(self._dropClients)
        self.instanceURL = b"rel://127.0.0.1:%d" % (self.relay.port,)
        self.authResponse = msg(AUTH_RESPONSE, self.instanceURL)
        self._serial = 0

    def _stopRelay(self):
        self.relay.stop()

    def pid(self, name):
        """
        The id of C{name} in this test's namespace.
        """
        return peerID(self.namespace + name)

    def _dropClients(self):
        return defer.DeferredList([c.abort() for c in self.clients], consumeErrors=True)

    # -- helpers ------------------------------------------------------------

    @defer.inlineCallbacks
    def open(self, path="/relay", extraHeaders=(), hostHeader=None):
        """
        A TCP connection with the upgrade request sent; waits for the response.
        """
        client = yield wsraw.connect(reactor, self.relay.port, path, extraHeaders, hostHeader)
        self.clients.append(client)
        yield client.handshake.addTimeout(5, reactor)
        return client

    @defer.inlineCallbacks
    def upgraded(self):
        client = yield self.open()
        self.assertEqual(client.status, 101, client.headers)
        return client

    @defer.inlineCallbacks
    def peer(self, name):
        """
        An authenticated peer: asserts the AuthResponse byte for byte.
        """
        client = yield self.upgraded()
        client.sendMessage(authMessage(self.pid(name)))
        response = yield client.nextMessage()
        self.assertEqual(response, self.authResponse)
        client.name = name
        client.id = self.pid(name)
        return client

    def unique(self, label=b"x"):
        self._serial += 1
        return label + b"-%d-" % (self._serial,) + os.urandom(8)

    @defer.inlineCallbacks
    def assertDelivered(self, sender, receiver, payload=None):
        """
        C{sender} sends a transport to C{receiver}; C{receiver}'s next message
        must be exactly that transport with the sender's id.  Also serves as a
        barrier for C{receiver}.
        """
        if payload is None:
            payload = self.unique(b"probe")
        sender.sendMessage(transportMessage(receiver.id, payload))
        got = yield receiver.nextMessage()
        self.assertEqual(got, transportMessage(sender.id, payload))

    @defer.inlineCallbacks
    def assertAlive(self, a, b):
        """
        Both connections still carry traffic both ways, and neither had any
        message pending before the probes.
        """
        yield self.assertDelivered(a, b)
        yield self.assertDelivered(b, a)

    @defer.inlineCallbacks
    def assertClosedSilently(self, client, since=0):
        """
        The server closes C{client} without sending it any data message
        after the first C{since} ones.
        """
        yield client.whenClosed(timeout=5)
        self.assertEqual(client.messages[since:], [], "data messages before close")
        self.assertEqual(client.violations, [])


class HandshakeTests(RelayTestCase):
    @defer.inlineCallbacks
    def test_vectorTokenAccepted(self):
        """
        The Auth of section 4 (peer-a, the vector token) is accepted and the
        AuthResponse is exactly [1][7] + instance URL, the only message.
        """
        client = yield self.upgraded()
        auth = bytes.fromhex("01062112a442") + VECTOR_ID_PEER_A + VECTOR_TOKEN
        if time.time() >= VECTOR_EXPIRY - 3600:
            # The vector token expires on 2030-01-01 and is then rightly
            # refused; from then on the same Auth with a live token.
            auth = authMessage(VECTOR_ID_PEER_A, makeToken(EXPIRY))
        client.sendMessage(auth)
        response = yield client.nextMessage()
        self.assertEqual(response, b"\x01\x07" + self.instanceURL)
        self.assertEqual(response, b"\x01\x07rel://127.0.0.1:" + str(self.relay.port).encode())
        client.id = VECTOR_ID_PEER_A
        other = yield self.peer("peer-b")
        yield self.assertAlive(client, other)
        self.assertEqual(client.violations, [])

    @defer.inlineCallbacks
    def test_authResponseFirst(self):
        """
        The AuthResponse is the first message a new peer receives even when
        traffic for it is already in flight.
        """
        a = yield self.peer("peer-a")
        b = yield self.upgraded()
        b.sendMessage(authMessage(peerID("peer-b")))
        # Flood peer-b from peer-a while its handshake runs: whatever
        # arrives, the AuthResponse comes first.
        for i in range(50):
            a.sendMessage(transportMessage(peerID("peer-b"), b"early-%d" % i))
        first = yield b.nextMessage()
        self.assertEqual(first, self.authResponse)

    @defer.inlineCallbacks
    def test_fragmentedAuthAccepted(self):
        """
        An Auth split over several WebSocket frames (with a ping between
        them, RFC 6455 5.4) is one message.
        """
        client = yield self.upgraded()
        auth = authMessage(peerID("peer-a"))
        client.sendFrame(wsraw.OP_BINARY, auth[:10], fin=False)
        client.sendPing(b"mid")
        client.sendFrame(wsraw.OP_CONTINUATION, auth[10:50], fin=False)
        client.sendFrame(wsraw.OP_CONTINUATION, auth[50:], fin=True)
        self.assertEqual((yield client.nextMessage()), self.authResponse)

    @defer.inlineCallbacks
    def test_authAndTransportInOneWrite(self):
        """
        A Transport written right behind the Auth (same TCP segment, before
        the AuthResponse) is handled after the handshake and delivered.
        """
        b = yield self.peer("peer-b")
        a = yield self.upgraded()
        a.sendRaw(
            wsraw.encodeFrame(wsraw.OP_BINARY, authMessage(peerID("peer-a")))
            + wsraw.encodeFrame(wsraw.OP_BINARY, transportMessage(peerID("peer-b"), b"right away"))
        )
        self.assertEqual((yield a.nextMessage()), self.authResponse)
        self.assertEqual((yield b.nextMessage()), transportMessage(peerID("peer-a"), b"right away"))

    @defer.inlineCallbacks
    def test_handshakeAt212BytesAccepted(self):
        """
        A 212-byte Auth is within the handshake limit.  The only way to make
        an Auth that long with a valid token is a longer expiry payload:
        PROTOCOL.md 2.1 asks for an ASCII decimal unix time of at least 10
        characters and sets no upper bound (the Go validator parses it with
        strconv.ParseInt, which takes leading zeros), so a correctly signed,
        zero-padded, unexpired expiry must be accepted.
        """
        pad = MAX_HANDSHAKE - (2 + 4 + 36 + 1 + 32) - len(str(EXPIRY))
        token = makeToken(payload=b"0" * pad + str(EXPIRY).encode())
        auth = authMessage(peerID("peer-a"), token)
        self.assertEqual(len(auth), MAX_HANDSHAKE)
        client = yield self.upgraded()
        client.sendMessage(auth)
        response = yield client.nextMessage()
        self.assertEqual(response, self.authResponse)


class HandshakeFailureTests(RelayTestCase):
    """
    Each bad first message closes that connection with no response while two
    other authenticated peers keep exchanging traffic.
    """

    shareRelay = True

    @defer.inlineCallbacks
    def _failedHandshake(self, first, frames=None):
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        victim = yield self.upgraded()
        if frames is None:
            victim.sendMessage(first)
        else:
            frames(victim)
        yield self.assertClosedSilently(victim)
        yield self.assertAlive(a, b)
        # The victim's id was never registered: traffic to it goes nowhere,
        # and a subscription to it reports nothing online.
        a.sendMessage(subscribeMessage([self.pid("victim")]))
        yield self.assertDelivered(b, a)
        return victim

    def test_wrongVersion(self):
        return self._failedHandshake(msg(AUTH, MAGIC + self.pid("victim") + makeToken(), version=2))

    def test_versionZero(self):
        return self._failedHandshake(msg(AUTH, MAGIC + self.pid("victim") + makeToken(), version=0))

    def test_wrongFirstTypeTransport(self):
        return self._failedHandshake(transportMessage(self.pid("peer-a"), b"hello"))

    def test_wrongFirstTypeHealthCheck(self):
        return self._failedHandshake(msg(HEALTH_CHECK))

    def test_wrongFirstTypeSubscribe(self):
        return self._failedHandshake(subscribeMessage([self.pid("peer-a")]))

    def test_shortOnlyHeader(self):
        return self._failedHandshake(msg(AUTH))

    def test_shortOneByte(self):
        return self._failedHandshake(b"\x01")

    def test_shortMagicOnly(self):
        return self._failedHandshake(msg(AUTH, MAGIC))

    def test_shortTruncatedID(self):
        return self._failedHandshake(msg(AUTH, MAGIC + self.pid("victim")[:20]))

    def test_shortNoToken(self):
        return self._failedHandshake(msg(AUTH, MAGIC + self.pid("victim")))

    def test_shortTruncatedToken(self):
        return self._failedHandshake(msg(AUTH, MAGIC + self.pid("victim") + makeToken()[:20]))

    def test_emptyFirstMessage(self):
        return self._failedHandshake(b"")

    def test_wrongMagic(self):
        return self._failedHandshake(
            msg(AUTH, b"\x21\x12\xa4\x43" + self.pid("victim") + makeToken())
        )

    def test_badSignature(self):
        token = bytearray(makeToken())
        token[5] ^= 0x01
        return self._failedHandshake(authMessage(self.pid("victim"), bytes(token)))

    def test_wrongSecret(self):
        return self._failedHandshake(
            authMessage(self.pid("victim"), makeToken(secret=b"other-secret"))
        )

    def test_keyIsHashedSecret(self):
        """
        A token signed with the raw secret (not its sha256) is refused.
        """
        payload = str(EXPIRY).encode()
        sig = hmac.new(SECRET, payload, hashlib.sha256).digest()
        return self._failedHandshake(authMessage(self.pid("victim"), b"\x01" + sig + payload))

    def test_expiredToken(self):
        return self._failedHandshake(
            authMessage(self.pid("victim"), makeToken(expiry=int(time.time()) - 60))
        )

    def test_unknownAlgo(self):
        return self._failedHandshake(authMessage(self.pid("victim"), makeToken(algo=2)))

    def test_algoZero(self):
        return self._failedHandshake(authMessage(self.pid("victim"), makeToken(algo=0)))

    def test_legacyHello(self):
        # magic, id, then something shaped like gob-encoded auth data.
        gob = bytes.fromhex("1aff8103010108417574684d736701ff8200") + os.urandom(20)
        return self._failedHandshake(msg(HELLO, MAGIC + self.pid("victim") + gob))

    def test_firstMessageOver212Bytes(self):
        """
        A 213-byte Auth whose token would be valid in full: the server reads
        at most 212 bytes of it, so it fails.
        """
        pad = MAX_HANDSHAKE + 1 - (2 + 4 + 36 + 1 + 32) - len(str(EXPIRY))
        token = makeToken(payload=b"0" * pad + str(EXPIRY).encode())
        auth = authMessage(self.pid("victim"), token)
        self.assertEqual(len(auth), MAX_HANDSHAKE + 1)
        return self._failedHandshake(auth)

    def test_firstMessageHuge(self):
        return self._failedHandshake(
            authMessage(self.pid("victim")) + b"\x00" * (MAX_MESSAGE + 100)
        )

    def test_firstMessageOver212BytesFragmented(self):
        """
        The 212-byte limit is on the message, not on a frame.
        """
        pad = MAX_HANDSHAKE + 1 - (2 + 4 + 36 + 1 + 32) - len(str(EXPIRY))
        token = makeToken(payload=b"0" * pad + str(EXPIRY).encode())
        auth = authMessage(self.pid("victim"), token)
        return self._failedHandshake(None, frames=lambda v: v.sendFragmented(auth, [100, 100]))

    @defer.inlineCallbacks
    def test_failedHandshakeSendsNoBytes(self):
        """
        "closes the connection with no response": not a single byte (not
        even a WebSocket close frame) after the 101.
        """
        victim = yield self._failedHandshake(authMessage(self.pid("victim"), makeToken(algo=2)))
        self.assertEqual(victim.bytesAfterUpgrade, 0, victim.closeFrames)


class TransportTests(RelayTestCase):
    @defer.inlineCallbacks
    def test_helloVector(self):
        """
        Section 4: peer-a sends 0103+id(peer-b)+"hello"; peer-b receives
        0103+id(peer-a)+"hello".
        """
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        a.sendMessage(bytes.fromhex("0103") + peerID("peer-b") + bytes.fromhex("68656c6c6f"))
        got = yield b.nextMessage()
        self.assertEqual(
            got, bytes.fromhex("0103") + VECTOR_ID_PEER_A + bytes.fromhex("68656c6c6f")
        )
        # Nothing came back to the sender.
        yield self.assertDelivered(b, a)

    @defer.inlineCallbacks
    def test_orderKept(self):
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        payloads = [b"m%03d" % i + os.urandom(i) for i in range(100)]
        for p in payloads:
            a.sendMessage(transportMessage(b.id, p))
        for p in payloads:
            got = yield b.nextMessage()
            self.assertEqual(got, transportMessage(a.id, p))

    @defer.inlineCallbacks
    def test_maximumSizeDelivered(self):
        """
        A Transport of exactly 8820 bytes (16-bit frame length both ways) is
        delivered whole.
        """
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        payload = os.urandom(MAX_MESSAGE - 38)
        a.sendMessage(transportMessage(b.id, payload))
        got = yield b.nextMessage()
        self.assertEqual(len(got), MAX_MESSAGE)
        self.assertEqual(got, transportMessage(a.id, payload))
        yield self.assertAlive(a, b)

    @defer.inlineCallbacks
    def test_minimumTransportDelivered(self):
        """
        38 bytes (id, empty payload) is a Transport.
        """
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        a.sendMessage(transportMessage(b.id, b""))
        got = yield b.nextMessage()
        self.assertEqual(got, transportMessage(a.id, b""))

    @defer.inlineCallbacks
    def test_shortTransportIgnored(self):
        """
        A Transport shorter than 38 bytes is ignored; the connection stays.
        """
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        a.sendMessage(msg(TRANSPORT))
        a.sendMessage(msg(TRANSPORT, b.id[:1]))
        a.sendMessage(msg(TRANSPORT, b.id[:35]))
        yield self.assertAlive(a, b)
        self.assertFalse(a.isClosed)

    @defer.inlineCallbacks
    def test_unknownDestinationDropped(self):
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        a.sendMessage(transportMessage(peerID("nobody"), b"lost"))
        yield self.assertAlive(a, b)

    @defer.inlineCallbacks
    def test_fragmentedMessage(self):
        """
        One relay message sent as several WebSocket frames is one message.
        """
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        payload = os.urandom(300)
        a.sendFragmented(transportMessage(b.id, payload), [1, 37, 100])
        got = yield b.nextMessage()
        self.assertEqual(got, transportMessage(a.id, payload))

    @defer.inlineCallbacks
    def test_pingAnswered(self):
        """
        A WebSocket ping gets a pong with the same payload (RFC 6455 5.5.2).
        """
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        a.sendPing(b"are you there")
        yield self.assertAlive(a, b)
        self.assertEqual(a.pongs, [b"are you there"])

    @defer.inlineCallbacks
    def test_healthCheckAnswerKeepsSession(self):
        """
        A client's [1][5] (its answer to the server's HealthCheck) is taken
        quietly; the session stays.
        """
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        for _ in range(3):
            a.sendMessage(msg(HEALTH_CHECK))
        yield self.assertAlive(a, b)

    @defer.inlineCallbacks
    def test_secondAuthIgnored(self):
        """
        A second Auth (even for another id) is ignored: no reply, the
        connection keeps its first id, the other id stays unknown.
        """
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        a.sendMessage(authMessage(peerID("peer-a")))
        a.sendMessage(authMessage(peerID("peer-c")))
        yield self.assertAlive(a, b)
        b.sendMessage(transportMessage(peerID("peer-c"), b"to c"))
        b.sendMessage(subscribeMessage([peerID("peer-c")]))
        yield self.assertDelivered(b, a)
        yield self.assertDelivered(a, b)

    @defer.inlineCallbacks
    def test_closeMessage(self):
        """
        [1][4]: the server closes that connection; a subscriber learns the
        peer went offline.
        """
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        a.sendMessage(subscribeMessage([b.id]))
        self.assertEqual((yield a.nextMessage()), peersOnline([b.id]))
        b.sendMessage(msg(CLOSE))
        yield b.whenClosed()
        self.assertEqual((yield a.nextMessage()), peersWentOffline([b.id]))

    @defer.inlineCallbacks
    def test_shutdownSendsClose(self):
        """
        On shutdown the server sends Close ([1][4]) to every peer, then
        closes.
        """
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        self.relay.terminate()
        for client in (a, b):
            got = yield client.nextMessage()
            self.assertEqual(got, msg(CLOSE))
            yield client.whenClosed()


class SubscriptionTests(RelayTestCase):
    @defer.inlineCallbacks
    def test_onlineAtOnce(self):
        """
        Subscribe to an online and an offline id: PeersOnline lists the
        online one only.
        """
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        a.sendMessage(subscribeMessage([b.id, peerID("peer-c")]))
        got = yield a.nextMessage()
        self.assertEqual(got, peersOnline([b.id]))
        self.assertEqual(got, bytes.fromhex("010a") + peerID("peer-b"))

    @defer.inlineCallbacks
    def test_noneOnlineNoReply(self):
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        a.sendMessage(subscribeMessage([peerID("peer-c"), peerID("peer-d")]))
        a.sendMessage(subscribeMessage([]))
        yield self.assertAlive(a, b)

    @defer.inlineCallbacks
    def test_lifecycle(self):
        """
        Subscribe while offline; online → PeersOnline once; offline →
        PeersWentOffline; online again → nothing (online interest consumed);
        offline again → PeersWentOffline (offline interest kept).
        """
        a = yield self.peer("peer-a")
        c = yield self.peer("peer-c")
        a.sendMessage(subscribeMessage([peerID("peer-b")]))
        yield self.assertAlive(a, c)

        b = yield self.peer("peer-b")
        self.assertEqual((yield a.nextMessage()), peersOnline([b.id]))
        yield b.abort()
        self.assertEqual((yield a.nextMessage()), peersWentOffline([b.id]))

        b2 = yield self.peer("peer-b")
        yield self.assertDelivered(b2, a)  # and no PeersOnline before it
        yield b2.abort()
        self.assertEqual((yield a.nextMessage()), peersWentOffline([b2.id]))
        yield self.assertAlive(a, c)

    @defer.inlineCallbacks
    def test_subscribedWhileOnline(self):
        """
        The immediate reply to a subscription does not consume the online
        interest (it is not a "later" coming online): after going offline
        the id's first return is still reported, once; later returns are
        not, going offline always is.  (Go: the reply path never touches
        interestedPeersForOnline.)
        """
        a = yield self.peer("peer-a")
        c = yield self.peer("peer-c")
        b = yield self.peer("peer-b")
        a.sendMessage(subscribeMessage([b.id]))
        self.assertEqual((yield a.nextMessage()), peersOnline([b.id]))
        yield b.abort()
        self.assertEqual((yield a.nextMessage()), peersWentOffline([b.id]))
        b = yield self.peer("peer-b")
        self.assertEqual((yield a.nextMessage()), peersOnline([b.id]))
        yield b.abort()
        self.assertEqual((yield a.nextMessage()), peersWentOffline([b.id]))
        b = yield self.peer("peer-b")
        yield self.assertDelivered(b, a)
        yield b.abort()
        self.assertEqual((yield a.nextMessage()), peersWentOffline([b.id]))
        yield self.assertAlive(a, c)

    @defer.inlineCallbacks
    def test_wentOfflineOnWebSocketClose(self):
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        a.sendMessage(subscribeMessage([b.id]))
        self.assertEqual((yield a.nextMessage()), peersOnline([b.id]))
        b.sendClose(1000)
        yield b.whenClosed()
        self.assertEqual((yield a.nextMessage()), bytes.fromhex("010b") + peerID("peer-b"))

    @defer.inlineCallbacks
    def test_unsubscribe(self):
        a = yield self.peer("peer-a")
        c = yield self.peer("peer-c")
        a.sendMessage(subscribeMessage([peerID("peer-b")]))
        a.sendMessage(unsubscribeMessage([peerID("peer-b")]))
        b = yield self.peer("peer-b")
        yield self.assertDelivered(b, a)  # no PeersOnline before it
        yield b.abort()
        yield self.assertDelivered(c, a)  # no PeersWentOffline before it

    @defer.inlineCallbacks
    def test_unsubscribeOnlineKeepsNoOfflineInterest(self):
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        c = yield self.peer("peer-c")
        a.sendMessage(subscribeMessage([b.id]))
        self.assertEqual((yield a.nextMessage()), peersOnline([b.id]))
        a.sendMessage(unsubscribeMessage([b.id]))
        yield self.assertAlive(a, c)
        yield b.abort()
        yield self.assertDelivered(c, a)

    @defer.inlineCallbacks
    def test_subscribeBodyNotMultipleOf36Ignored(self):
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        a.sendMessage(msg(SUBSCRIBE, b.id[:35]))
        a.sendMessage(msg(SUBSCRIBE, b.id + b"x"))
        yield self.assertAlive(a, b)  # no PeersOnline for b before it
        a.sendMessage(subscribeMessage([b.id]))
        self.assertEqual((yield a.nextMessage()), peersOnline([b.id]))

    @defer.inlineCallbacks
    def test_unsubscribeBodyNotMultipleOf36Ignored(self):
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        a.sendMessage(subscribeMessage([peerID("peer-c")]))
        a.sendMessage(msg(UNSUBSCRIBE, peerID("peer-c") + b"\x00"))
        yield self.assertAlive(a, b)
        c = yield self.peer("peer-c")
        # The malformed unsubscribe dropped nothing.
        self.assertEqual((yield a.nextMessage()), peersOnline([c.id]))

    @defer.inlineCallbacks
    def test_subscriberLeaves(self):
        """
        A subscriber that leaves is forgotten: the peer it watched comes and
        goes without trouble for anyone, and a new connection of the
        subscriber's id starts with no interest.
        """
        s = yield self.peer("subscriber")
        c = yield self.peer("peer-c")
        s.sendMessage(subscribeMessage([peerID("peer-b")]))
        yield self.assertAlive(s, c)
        yield s.abort()
        b = yield self.peer("peer-b")
        yield self.assertAlive(b, c)
        s2 = yield self.peer("subscriber")
        yield b.abort()
        yield self.assertAlive(s2, c)  # no PeersWentOffline for s2

    @defer.inlineCallbacks
    def _connectMany(self, count):
        names = [f"many-{i:03d}" for i in range(count)]
        peers = yield defer.gatherResults([self.peer(n) for n in names])
        return peers

    @defer.inlineCallbacks
    def test_244OnlineInOneMessage(self):
        """
        A subscription of 244 online ids (the most one message carries) is
        answered by one 8786-byte PeersOnline listing all of them; a 245th
        id, subscribed in a second message, comes in a second PeersOnline.
        """
        peers = yield self._connectMany(IDS_PER_MESSAGE + 1)
        ids = [p.id for p in peers]
        a = yield self.peer("subscriber")
        sub = subscribeMessage(ids[:IDS_PER_MESSAGE])
        self.assertEqual(len(sub), 2 + 244 * 36)
        a.sendMessage(sub)
        first = yield a.nextMessage()
        self.assertEqual(len(first), 2 + 244 * 36)
        self.assertEqual(first[:2], b"\x01\x0a")
        self.assertEqual(sorted(splitIDs(first[2:])), sorted(ids[:IDS_PER_MESSAGE]))
        a.sendMessage(subscribeMessage(ids[IDS_PER_MESSAGE:]))
        second = yield a.nextMessage()
        self.assertEqual(second, peersOnline(ids[IDS_PER_MESSAGE:]))
        yield self.assertAlive(a, peers[0])

    @defer.inlineCallbacks
    def test_245IDSubscriptionIsOversize(self):
        """
        245 ids make an 8822-byte SubscribePeerState, over the 8820-byte
        message limit: a protocol error (a client must split it).
        """
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        c = yield self.peer("peer-c")
        ids = [peerID(f"x-{i}") for i in range(244)] + [b.id]
        sub = subscribeMessage(ids)
        self.assertEqual(len(sub), 8822)
        seen = len(a.messages)
        a.sendMessage(sub)
        yield self.assertClosedSilently(a, since=seen)
        yield self.assertAlive(b, c)


class ProtocolErrorTests(RelayTestCase):
    """
    After the handshake, each bad message closes that peer's connection only:
    the other peers keep exchanging traffic and a subscriber of the victim
    learns it went offline.
    """

    shareRelay = True

    @defer.inlineCallbacks
    def _protocolError(self, send):
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        victim = yield self.peer("victim")
        a.sendMessage(subscribeMessage([victim.id]))
        self.assertEqual((yield a.nextMessage()), peersOnline([victim.id]))
        yield self.assertAlive(victim, b)
        seen = len(victim.messages)
        send(victim)
        yield self.assertClosedSilently(victim, since=seen)
        self.assertEqual((yield a.nextMessage()), peersWentOffline([victim.id]))
        yield self.assertAlive(a, b)
        return victim

    def test_textFrame(self):
        return self._protocolError(lambda v: v.sendText("\x01\x03" + "x" * 40))

    def test_oversizeMessage(self):
        return self._protocolError(
            lambda v: v.sendMessage(
                transportMessage(self.pid("peer-b"), os.urandom(MAX_MESSAGE - 38 + 1))
            )
        )

    def test_oversizeFragmented(self):
        return self._protocolError(
            lambda v: v.sendFragmented(
                transportMessage(self.pid("peer-b"), os.urandom(MAX_MESSAGE)),
                [4000, 4000],
            )
        )

    def test_oversize64BitLength(self):
        """
        A 70000-byte message (64-bit frame length) is refused, not buffered.
        """
        return self._protocolError(
            lambda v: v.sendMessage(transportMessage(self.pid("peer-b"), os.urandom(70000)))
        )

    def test_unmaskedClientFrame(self):
        """
        RFC 6455 5.1: a server closes on an unmasked client frame.
        """
        return self._protocolError(
            lambda v: v.sendFrame(
                wsraw.OP_BINARY, transportMessage(self.pid("peer-b"), b"x"), mask=False
            )
        )

    def test_reservedBitsSet(self):
        """
        RFC 6455 5.2: RSV bits without a negotiated extension fail the
        connection.
        """
        return self._protocolError(
            lambda v: v.sendFrame(
                wsraw.OP_BINARY, transportMessage(self.pid("peer-b"), b"x"), rsv=4
            )
        )

    def test_wrongVersion(self):
        return self._protocolError(
            lambda v: v.sendMessage(msg(TRANSPORT, self.pid("peer-b") + b"hello", version=2))
        )

    def test_versionZero(self):
        return self._protocolError(lambda v: v.sendMessage(msg(HEALTH_CHECK, version=0)))

    def test_type0(self):
        return self._protocolError(lambda v: v.sendMessage(msg(0)))

    def test_type2HelloResponse(self):
        return self._protocolError(lambda v: v.sendMessage(msg(HELLO_RESPONSE)))

    def test_type7AuthResponse(self):
        return self._protocolError(lambda v: v.sendMessage(msg(AUTH_RESPONSE, b"rel://x")))

    def test_type10PeersOnline(self):
        return self._protocolError(lambda v: v.sendMessage(peersOnline([self.pid("peer-b")])))

    def test_type11PeersWentOffline(self):
        return self._protocolError(lambda v: v.sendMessage(peersWentOffline([self.pid("peer-b")])))

    def test_type12(self):
        return self._protocolError(lambda v: v.sendMessage(msg(12)))

    def test_type255(self):
        return self._protocolError(lambda v: v.sendMessage(msg(255)))

    def test_emptyMessage(self):
        return self._protocolError(lambda v: v.sendMessage(b""))

    def test_versionOnly(self):
        return self._protocolError(lambda v: v.sendMessage(b"\x01"))

    @defer.inlineCallbacks
    def test_noCloseHandshake(self):
        """
        "closes that peer's connection ... without a close handshake": no
        WebSocket close frame reaches the peer.
        """
        victim = yield self._protocolError(lambda v: v.sendMessage(msg(HEALTH_CHECK, version=2)))
        self.assertEqual(victim.closeFrames, [])


class WireTests(RelayTestCase):
    """
    RFC 6455 framing as a relay peer meets it: frame boundaries anywhere,
    fragments, control frames between them, length encodings.
    """

    shareRelay = True

    @defer.inlineCallbacks
    def pair(self):
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        return a, b

    @defer.inlineCallbacks
    def test_lengthEncodingBoundaries(self):
        """
        Messages of 0..2 around the 7-bit/16-bit length boundary (125, 126,
        127 bytes) and the largest (8820) cross the relay both ways intact.
        """
        a, b = yield self.pair()
        for size in [38, 39, 124, 125, 126, 127, 128, 4000, 8819, 8820]:
            payload = os.urandom(size - 38)
            a.sendMessage(transportMessage(b.id, payload))
            self.assertEqual((yield b.nextMessage()), transportMessage(a.id, payload))
            b.sendMessage(transportMessage(a.id, payload))
            self.assertEqual((yield a.nextMessage()), transportMessage(b.id, payload))
        self.assertEqual(a.violations + b.violations, [])

    @defer.inlineCallbacks
    def test_manyFramesInOneWrite(self):
        a, b = yield self.pair()
        payloads = [os.urandom(i * 37 % 600) for i in range(200)]
        a.sendRaw(
            b"".join(
                wsraw.encodeFrame(wsraw.OP_BINARY, transportMessage(b.id, p)) for p in payloads
            )
        )
        for p in payloads:
            self.assertEqual((yield b.nextMessage()), transportMessage(a.id, p))

    @defer.inlineCallbacks
    def test_framesSplitAtEveryByte(self):
        """
        Frames arriving a byte at a time (7-bit, 16-bit lengths, and a
        fragmented message with a ping inside) are reassembled.
        """
        a, b = yield self.pair()
        small = transportMessage(b.id, b"tiny")
        large = transportMessage(b.id, os.urandom(300))
        frag = transportMessage(b.id, os.urandom(50))
        data = (
            wsraw.encodeFrame(wsraw.OP_BINARY, small)
            + wsraw.encodeFrame(wsraw.OP_BINARY, large)
            + wsraw.encodeFrame(wsraw.OP_BINARY, frag[:20], fin=False)
            + wsraw.encodeFrame(wsraw.OP_PING, b"p")
            + wsraw.encodeFrame(wsraw.OP_CONTINUATION, frag[20:], fin=True)
        )
        yield a.sendSlowly(data, 1)
        for m in (small, large, frag):
            self.assertEqual((yield b.nextMessage()), a.id.join([m[:2], m[38:]]))
        yield self.assertAlive(a, b)
        self.assertEqual(a.pongs, [b"p"])

    @defer.inlineCallbacks
    def test_fragmentsWithControlFramesBetween(self):
        a, b = yield self.pair()
        m = transportMessage(b.id, os.urandom(1000))
        a.sendFrame(wsraw.OP_BINARY, m[:1], fin=False)
        a.sendPing(b"1")
        a.sendFrame(wsraw.OP_CONTINUATION, m[1:500], fin=False)
        a.sendFrame(wsraw.OP_PONG, b"unsolicited")
        a.sendFrame(wsraw.OP_CONTINUATION, b"", fin=False)
        a.sendPing(b"2")
        a.sendFrame(wsraw.OP_CONTINUATION, m[500:], fin=True)
        self.assertEqual((yield b.nextMessage()), transportMessage(a.id, m[38:]))
        yield self.assertAlive(a, b)
        self.assertEqual(a.pongs, [b"1", b"2"])

    @defer.inlineCallbacks
    def test_slowReceiverDoesNotStallOthers(self):
        """
        While peer-b does not read, peer-a can still reach peer-c, and what
        peer-b gets afterwards is whole messages, in the order sent (some
        may be dropped: never truncated, never reordered).
        """
        a, b = yield self.pair()
        c = yield self.peer("peer-c")
        b.transport.pauseProducing()
        count = 2000
        body = os.urandom(8000)
        for i in range(count):
            a.sendMessage(transportMessage(b.id, b"%06d" % i + body))
        yield self.assertDelivered(a, c)
        yield self.assertDelivered(c, a)
        b.transport.resumeProducing()
        # peer-c sends a marker for every message peer-b reads: once peer-b
        # has drained its queue a marker gets through and ends the loop.
        marker = transportMessage(c.id, b"marker")
        c.sendMessage(transportMessage(b.id, b"marker"))
        last, received = -1, 0
        while True:
            m = yield b.nextMessage()
            if m == marker:
                break
            self.assertEqual(m[:38], transportMessage(a.id, b""))
            self.assertEqual(len(m), 38 + 6 + len(body))
            self.assertEqual(m[44:], body)
            seq = int(m[38:44])
            self.assertGreater(seq, last)
            last, received = seq, received + 1
            c.sendMessage(transportMessage(b.id, b"marker"))
        self.assertGreater(received, 0)
        self.assertEqual(b.violations, [])

    @defer.inlineCallbacks
    def test_pingMaximumPayload(self):
        a, b = yield self.pair()
        payload = os.urandom(125)
        a.sendPing(payload)
        yield self.assertAlive(a, b)
        self.assertEqual(a.pongs, [payload])

    @defer.inlineCallbacks
    def test_closeFrameAnswered(self):
        """
        RFC 6455 5.5.1: a client's close frame is answered with a close frame,
        then the server closes the TCP connection.
        """
        a, b = yield self.pair()
        a.sendClose(1000)
        yield a.whenClosed()
        self.assertEqual(len(a.closeFrames), 1)
        self.assertIn(a.closeFrames[0][:2], (b"", b"\x03\xe8"))

    @defer.inlineCallbacks
    def _wireError(self, send):
        a = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        victim = yield self.peer("victim")
        a.sendMessage(subscribeMessage([victim.id]))
        self.assertEqual((yield a.nextMessage()), peersOnline([victim.id]))
        seen = len(victim.messages)
        send(victim, b)
        yield self.assertClosedSilently(victim, since=seen)
        self.assertEqual((yield a.nextMessage()), peersWentOffline([victim.id]))
        yield self.assertAlive(a, b)

    def test_continuationWithoutStart(self):
        return self._wireError(
            lambda v, b: v.sendFrame(wsraw.OP_CONTINUATION, transportMessage(b.id, b"x"), fin=True)
        )

    def test_newMessageInsideFragmentedOne(self):
        def send(v, b):
            m = transportMessage(b.id, b"0123456789")
            v.sendFrame(wsraw.OP_BINARY, m[:10], fin=False)
            v.sendFrame(wsraw.OP_BINARY, m, fin=True)

        return self._wireError(send)

    def test_textContinuation(self):
        """
        A fragmented text message is still a text message: protocol error.
        """

        def send(v, b):
            v.sendFrame(wsraw.OP_TEXT, b"\x01\x03", fin=False)
            v.sendFrame(wsraw.OP_CONTINUATION, b.id + b"hi", fin=True)

        return self._wireError(send)

    def test_fragmentedControlFrame(self):
        return self._wireError(lambda v, b: v.sendFrame(wsraw.OP_PING, b"x", fin=False))

    def test_controlFrameTooLong(self):
        return self._wireError(lambda v, b: v.sendPing(b"x" * 126))

    def test_reservedOpcode(self):
        return self._wireError(lambda v, b: v.sendFrame(0x3, transportMessage(b.id, b"x")))

    def test_oversizeSplitAtEveryByte(self):
        """
        An over-limit message sent slowly is refused as soon as its header
        shows the length (the relay does not wait for the whole of it).
        """
        return self._wireError(
            lambda v, b: v.sendSlowly(
                wsraw.encodeFrame(wsraw.OP_BINARY, transportMessage(b.id, b"\x00" * 9000))[:64],
                1,
            )
        )


class InstanceURLTests(unittest.TestCase):
    """
    PROTOCOL.md 2.1: the instance URL from --exposed-address, and startup
    failing with a clear error on a bad one.
    """

    timeout = 45

    def relay(self, exposed):
        relay = RelayProcess(os.path.abspath(self.mktemp() + ".log"), exposed)
        self.addCleanup(relay.stop)
        return relay

    @defer.inlineCallbacks
    def _authResponse(self, exposed):
        relay = self.relay(exposed)
        relay.start()
        client = yield wsraw.connect(reactor, relay.port)
        self.addCleanup(client.abort)
        yield client.handshake.addTimeout(5, reactor)
        client.sendMessage(authMessage(peerID("peer-a")))
        response = yield client.nextMessage()
        return response

    @defer.inlineCallbacks
    def test_explicitRel(self):
        response = yield self._authResponse("rel://relay.example:8080")
        self.assertEqual(response, b"\x01\x07rel://relay.example:8080")

    @defer.inlineCallbacks
    def test_explicitRels(self):
        response = yield self._authResponse("rels://relay.example:443")
        self.assertEqual(response, b"\x01\x07rels://relay.example:443")

    @defer.inlineCallbacks
    def test_noSchemeHostname(self):
        response = yield self._authResponse("relay.example:33080")
        self.assertEqual(response, b"\x01\x07rel://relay.example:33080")

    def _startupFails(self, exposed):
        relay = self.relay(exposed)
        relay.spawn()
        try:
            code = relay.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.fail(f"relay started with --exposed-address {exposed!r}")
        self.assertNotEqual(code, 0, relay.log())
        log = relay.log()
        self.assertTrue(
            "exposed" in log.lower() or exposed in log,
            "no clear error naming the exposed address:\n" + log,
        )
        self.assertNotIn("Traceback", log)

    def test_otherScheme(self):
        self._startupFails("http://relay.example:80")

    def test_wsScheme(self):
        self._startupFails("ws://relay.example:80")

    def test_twoSchemes(self):
        self._startupFails("rel://rels://relay.example:80")

    def test_notAURL(self):
        self._startupFails("rel://[::1")


class HTTPTests(RelayTestCase):
    @defer.inlineCallbacks
    def test_otherPathsRefused(self):
        refused = {}
        for path in ["/", "/relay/", "/relayx", "/Relay", "/relay/x", "/x/relay"]:
            client = yield self.open(path=path)
            refused[path] = client.status
        self.assertEqual({p: s for p, s in refused.items() if s == 101}, {}, refused)
        # and /relay itself is upgraded
        yield self.peer("peer-a")

    @defer.inlineCallbacks
    def test_originMismatch403(self):
        client = yield self.open(extraHeaders=[("Origin", "http://evil.example")])
        self.assertEqual(client.status, 403)

    @defer.inlineCallbacks
    def test_originOtherPort403(self):
        client = yield self.open(
            extraHeaders=[("Origin", f"http://127.0.0.1:{self.relay.port + 1}")]
        )
        self.assertEqual(client.status, 403)

    @defer.inlineCallbacks
    def test_originNull403(self):
        client = yield self.open(extraHeaders=[("Origin", "null")])
        self.assertEqual(client.status, 403)

    @defer.inlineCallbacks
    def test_originHostMatchesWhateverTheScheme(self):
        """
        Only the Origin's host[:port] is compared with Host (Go's
        coder/websocket: strings.EqualFold(r.Host, originURL.Host)).
        """
        statuses = {}
        for origin in [
            f"https://127.0.0.1:{self.relay.port}",
            f"HTTP://127.0.0.1:{self.relay.port}",
            f"chrome-extension://127.0.0.1:{self.relay.port}",
            f"http://127.0.0.1:{self.relay.port}/some/path",
        ]:
            client = yield self.open(extraHeaders=[("Origin", origin)])
            statuses[origin] = client.status
        self.assertEqual(set(statuses.values()), {101}, statuses)

    @defer.inlineCallbacks
    def test_originComparedCaseInsensitively(self):
        """
        Host and Origin host compared case-insensitively (strings.EqualFold).
        """
        port = self.relay.port
        client = yield self.open(
            extraHeaders=[("Origin", f"http://relay.example:{port}")],
            hostHeader=f"Relay.EXAMPLE:{port}",
        )
        self.assertEqual(client.status, 101)
        other = yield self.open(
            extraHeaders=[("Origin", f"http://relay.example:{port}")],
            hostHeader=f"other.example:{port}",
        )
        self.assertEqual(other.status, 403)

    @defer.inlineCallbacks
    def test_originMatchingHostAccepted(self):
        client = yield self.open(extraHeaders=[("Origin", f"http://127.0.0.1:{self.relay.port}")])
        self.assertEqual(client.status, 101)
        client.sendMessage(authMessage(peerID("peer-a")))
        self.assertEqual((yield client.nextMessage()), self.authResponse)


class ReconnectionTests(RelayTestCase):
    @defer.inlineCallbacks
    def test_sameIDReplacesOldConnection(self):
        """
        A second connection authenticating as peer-a replaces the first: the
        first is closed, the new one receives traffic, and the subscriber gets
        neither PeersWentOffline nor a second PeersOnline.
        """
        s = yield self.peer("subscriber")
        b = yield self.peer("peer-b")
        s.sendMessage(subscribeMessage([peerID("peer-a")]))
        yield self.assertAlive(s, b)

        a1 = yield self.peer("peer-a")
        self.assertEqual((yield s.nextMessage()), peersOnline([a1.id]))
        yield self.assertDelivered(b, a1)

        a2 = yield self.peer("peer-a")
        yield a1.whenClosed()
        # Closed with at most a Close message, no stray traffic.
        self.assertIn(a1.pending(), ([], [(wsraw.OP_BINARY, msg(CLOSE))]))
        yield self.assertDelivered(b, a2)
        yield self.assertDelivered(a2, b)
        yield self.assertDelivered(b, s)  # nothing for s before it

        # a2 is the registered connection: its leaving is reported.
        yield a2.abort()
        self.assertEqual((yield s.nextMessage()), peersWentOffline([a2.id]))

    @defer.inlineCallbacks
    def test_concurrentSameID(self):
        """
        Five connections authenticate as peer-a at once: exactly one stays
        (the one that gets traffic for peer-a), the four others are closed,
        and a subscriber never hears peer-a went offline.
        """
        b = yield self.peer("peer-b")
        s = yield self.peer("subscriber")
        s.sendMessage(subscribeMessage([peerID("peer-a")]))
        yield self.assertAlive(s, b)
        clients = yield defer.gatherResults([self.upgraded() for _ in range(5)])
        for c in clients:
            c.sendMessage(authMessage(peerID("peer-a")))
        # A connection replaced in the same instant may be closed before its
        # AuthResponse reaches it; the others get exactly the AuthResponse.
        first = yield defer.DeferredList([c.nextMessage() for c in clients], consumeErrors=True)
        accepted = []
        for c, (ok, value) in zip(clients, first):
            if ok:
                self.assertEqual(value, self.authResponse)
                accepted.append(c)
            else:
                value.trap(wsraw.ConnectionClosed)
            c.id = peerID("peer-a")
        self.assertTrue(accepted)
        b.sendMessage(transportMessage(peerID("peer-a"), b"who?"))
        # Whoever gets it is the survivor; the rest must close.
        got = yield defer.DeferredList(
            [c.nextMessage(timeout=5) for c in accepted], consumeErrors=True
        )
        receivers = [
            c
            for c, (ok, value) in zip(accepted, got)
            if ok and value == transportMessage(b.id, b"who?")
        ]
        self.assertEqual(len(receivers), 1, got)
        survivor = receivers[0]
        for c in clients:
            if c is not survivor:
                yield c.whenClosed()
        self.assertFalse(survivor.isClosed)
        yield self.assertAlive(survivor, b)
        # One PeersOnline (online interest consumed once), no offline.
        self.assertEqual((yield s.nextMessage()), peersOnline([peerID("peer-a")]))
        yield self.assertDelivered(b, s)

    @defer.inlineCallbacks
    def test_replacementCountsAsComingOnline(self):
        """
        With online interest still pending (subscribed while peer-a was
        online), a replacing connection of peer-a is a successful handshake
        of peer-a, which the Go relay announces as coming online: the
        subscriber gets PeersOnline once, and no PeersWentOffline for the
        replaced connection.
        """
        a1 = yield self.peer("peer-a")
        b = yield self.peer("peer-b")
        s = yield self.peer("subscriber")
        s.sendMessage(subscribeMessage([a1.id]))
        self.assertEqual((yield s.nextMessage()), peersOnline([a1.id]))
        a2 = yield self.peer("peer-a")
        yield a1.whenClosed()
        self.assertEqual((yield s.nextMessage()), peersOnline([a2.id]))
        yield self.assertDelivered(b, s)
        yield self.assertDelivered(a2, s)
