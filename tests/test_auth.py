"""
HMAC v2 tokens.
"""

import hmac
from hashlib import sha256

from twisted.internet.task import Clock
from twisted.trial import unittest

from relay.auth import AuthError, TokenValidator, generateToken, tokenKey

EXPIRY = 1893456000


class TokenTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(EXPIRY - 100)
        self.validator = TokenValidator("relay-secret", self.clock)

    def reason(self, token):
        return self.assertRaises(AuthError, self.validator.validate, token).reason

    def test_keyIsHashOfSecret(self):
        self.assertEqual(tokenKey("relay-secret"), sha256(b"relay-secret").digest())
        payload = str(EXPIRY).encode()
        token = generateToken("relay-secret", EXPIRY)
        self.assertEqual(
            token[1:33], hmac.new(sha256(b"relay-secret").digest(), payload, sha256).digest()
        )

    def test_valid(self):
        self.validator.validate(generateToken("relay-secret", EXPIRY))

    def test_validUntilExpiryInclusive(self):
        self.clock.advance(100)
        self.validator.validate(generateToken("relay-secret", EXPIRY))
        self.clock.advance(1)
        self.assertEqual(self.reason(generateToken("relay-secret", EXPIRY)), "expired")

    def test_wrongSecret(self):
        self.assertEqual(self.reason(generateToken("other", EXPIRY)), "bad_signature")

    def test_signedWithRawSecret(self):
        payload = str(EXPIRY).encode()
        token = b"\x01" + hmac.new(b"relay-secret", payload, sha256).digest() + payload
        self.assertEqual(self.reason(token), "bad_signature")

    def test_tamperedPayload(self):
        token = bytearray(generateToken("relay-secret", EXPIRY))
        token[-1] ^= 1
        self.assertEqual(self.reason(bytes(token)), "bad_signature")

    def test_unknownAlgo(self):
        self.assertEqual(
            self.reason(b"\x02" + generateToken("relay-secret", EXPIRY)[1:]), "unknown_algo"
        )
        self.assertEqual(
            self.reason(b"\x00" + generateToken("relay-secret", EXPIRY)[1:]), "unknown_algo"
        )

    def test_empty(self):
        self.assertEqual(self.reason(b""), "malformed")

    def test_shortPayload(self):
        self.assertEqual(self.reason(generateToken("relay-secret", 123456789)), "malformed")

    def test_truncatedSignature(self):
        self.assertEqual(self.reason(b"\x01" + b"\x00" * 20), "malformed")

    def test_nonDecimalPayloadSigned(self):
        payload = b"18934560x0"
        token = b"\x01" + hmac.new(tokenKey("relay-secret"), payload, sha256).digest() + payload
        self.assertEqual(self.reason(token), "malformed")

    def signed(self, payload):
        return b"\x01" + hmac.new(tokenKey("relay-secret"), payload, sha256).digest() + payload

    def test_leadingZerosAsGoParseInt(self):
        self.validator.validate(self.signed(b"0" * 100 + str(EXPIRY).encode()))

    def test_signedPlus(self):
        self.validator.validate(self.signed(b"+" + str(EXPIRY).encode()))

    def test_negativeIsExpired(self):
        self.assertEqual(self.reason(self.signed(b"-" + str(EXPIRY).encode())), "expired")

    def test_beyondInt64(self):
        self.assertEqual(self.reason(self.signed(str(2**63).encode())), "malformed")

    def test_secretNotInRepr(self):
        self.assertNotIn("relay-secret", repr(self.validator))
        self.assertNotIn("relay-secret", repr(vars(self.validator)))
