"""
HMAC v2 tokens: how a peer proves the management server let it in.

The management server and the relay share C{auth_secret}; the management
server hands each agent a token C{[algo][signature][payload]} where payload is
the ASCII unix time the token expires and the signature is
HMAC-SHA256(sha256(auth_secret), payload). The relay only checks it: it never
learns who the peer is beyond its id.
"""

import hmac
import re
from hashlib import sha256

ALGO_HMAC_SHA256 = 1
SIGNATURE_SIZE = 32
MIN_PAYLOAD_SIZE = 10
# Go's strconv.ParseInt(payload, 10, 64): optional sign, decimal digits
# (leading zeros allowed, so no length limit), within int64.
_EXPIRY = re.compile(rb"[+-]?[0-9]+\Z")
INT64_MAX = 2**63 - 1


class AuthError(Exception):
    """
    A token that does not let its bearer in.

    @ivar reason: a short label-safe word for logs and metrics
        (C{malformed}, C{unknown_algo}, C{bad_signature}, C{expired}).
    """

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def tokenKey(secret):
    """
    The HMAC key both sides derive from the shared secret: its SHA-256.
    """
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    return sha256(secret).digest()


def generateToken(secret, expiresAt):
    """
    A token valid until the unix time C{expiresAt}, as the management server
    makes them (used by our client, tests and benchmark).
    """
    payload = str(int(expiresAt)).encode("ascii")
    signature = hmac.new(tokenKey(secret), payload, sha256).digest()
    return bytes((ALGO_HMAC_SHA256,)) + signature + payload


class TokenValidator:
    """
    Validates HMAC v2 tokens against one secret.

    @param secret: the relay's C{--auth-secret} (str or bytes); only its
        SHA-256 is kept.
    @param clock: an L{IReactorTime} whose C{seconds()} is unix time.
    """

    def __init__(self, secret, clock):
        self._key = tokenKey(secret)
        self._clock = clock

    def __repr__(self):
        return "<TokenValidator>"

    def validate(self, token):
        """
        @raise AuthError: unless C{token} is signed with our key and unexpired.
        """
        if len(token) < 1:
            raise AuthError("malformed")
        if token[0] != ALGO_HMAC_SHA256:
            raise AuthError("unknown_algo")
        payload = token[1 + SIGNATURE_SIZE :]
        if len(payload) < MIN_PAYLOAD_SIZE:
            raise AuthError("malformed")
        expected = hmac.new(self._key, payload, sha256).digest()
        if not hmac.compare_digest(token[1 : 1 + SIGNATURE_SIZE], expected):
            raise AuthError("bad_signature")
        if not _EXPIRY.match(payload):
            raise AuthError("malformed")
        expiry = int(payload)
        if abs(expiry) > INT64_MAX:
            raise AuthError("malformed")
        # Whole seconds, as Go compares time.Now().Unix() with the expiry.
        if int(self._clock.seconds()) > expiry:
            raise AuthError("expired")
