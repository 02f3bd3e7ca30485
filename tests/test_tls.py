"""
TLS options from certificate and key files.
"""

from twisted.trial import unittest

from relay.server import ConfigurationError
from relay.tls import loadCertificateOptions
from tests.certs import writeCertificate


class LoadTests(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()

    def test_valid(self):
        cert, key, _ = writeCertificate(self.dir)
        options = loadCertificateOptions(cert, key)
        self.assertIsNotNone(options.getContext())

    def test_expired(self):
        cert, key, _ = writeCertificate(self.dir, expired=True)
        e = self.assertRaises(ConfigurationError, loadCertificateOptions, cert, key)
        self.assertIn("expired", str(e))

    def test_mismatchedKey(self):
        cert, _, _ = writeCertificate(self.dir, name="one")
        _, key, _ = writeCertificate(self.dir, name="two")
        e = self.assertRaises(ConfigurationError, loadCertificateOptions, cert, key)
        self.assertIn("does not match", str(e))

    def test_missingFile(self):
        e = self.assertRaises(ConfigurationError, loadCertificateOptions, "/nonexistent.crt", "/nonexistent.key")
        self.assertIn("cannot read TLS certificate file", str(e))

    def test_notPEM(self):
        cert, key, _ = writeCertificate(self.dir)
        with open(cert, "w") as f:
            f.write("not a certificate")
        e = self.assertRaises(ConfigurationError, loadCertificateOptions, cert, key)
        self.assertIn("no PEM certificate", str(e))

    def test_keyNotShownInErrors(self):
        cert, key, _ = writeCertificate(self.dir)
        with open(key, "w") as f:
            f.write("-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n")
        e = self.assertRaises(ConfigurationError, loadCertificateOptions, cert, key)
        self.assertNotIn("c2VjcmV0", str(e))
