"""
TLS options from certificate and key files.
"""

import os

from OpenSSL import SSL
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from relay.relay import ConfigurationError
from relay.tls import ReloadableTLS, loadCertificateOptions
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
        e = self.assertRaises(
            ConfigurationError, loadCertificateOptions, "/nonexistent.crt", "/nonexistent.key"
        )
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


class HygieneTests(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()

    def test_modernCiphersOnly(self):
        cert, key, _ = writeCertificate(self.dir)
        context = loadCertificateOptions(cert, key).getContext()
        connection = SSL.Connection(context, None)
        ciphers = connection.get_cipher_list()
        self.assertTrue(ciphers)
        tls12 = [c for c in ciphers if not c.startswith("TLS_")]
        self.assertTrue(tls12)
        for cipher in tls12:
            self.assertTrue(cipher.startswith("ECDHE-"), cipher)
            self.assertTrue("GCM" in cipher or "CHACHA20" in cipher, cipher)

    def handshake(self, version):
        """
        An in-memory handshake with a client capped at C{version}.

        @return: the protocol version agreed, or None if it failed.
        """
        cert, key, _ = writeCertificate(self.dir)
        server = SSL.Connection(loadCertificateOptions(cert, key).getContext(), None)
        server.set_accept_state()
        clientContext = SSL.Context(SSL.TLS_METHOD)
        clientContext.set_min_proto_version(SSL.TLS1_VERSION)
        clientContext.set_max_proto_version(version)
        clientContext.set_cipher_list(b"ALL:@SECLEVEL=0")
        client = SSL.Connection(clientContext, None)
        client.set_connect_state()
        for _ in range(10):
            for side in (client, server):
                try:
                    side.do_handshake()
                except SSL.WantReadError:
                    pass
                except SSL.Error:
                    return None
            for source, sink in ((client, server), (server, client)):
                try:
                    sink.bio_write(source.bio_read(65536))
                except SSL.WantReadError:
                    pass
        return server.get_protocol_version_name()

    def test_tls12Accepted(self):
        self.assertEqual(self.handshake(SSL.TLS1_2_VERSION), "TLSv1.2")

    def test_tls11Refused(self):
        self.assertIsNone(self.handshake(SSL.TLS1_1_VERSION))

    def test_worldReadableKeyWarns(self):
        cert, key, _ = writeCertificate(self.dir)
        os.chmod(key, 0o644)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        loadCertificateOptions(cert, key)
        self.assertTrue(any("readable by group or others" in formatEvent(e) for e in events))

    def test_privateKeyQuiet(self):
        cert, key, _ = writeCertificate(self.dir)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        loadCertificateOptions(cert, key)
        self.assertFalse(any("readable" in formatEvent(e) for e in events))


class ReloadTests(unittest.TestCase):
    def test_reload(self):
        directory = self.mktemp()
        cert, key, first = writeCertificate(directory)
        tls = ReloadableTLS(loadCertificateOptions(cert, key), cert, key)
        before = tls.current
        _, _, second = writeCertificate(directory)
        self.assertNotEqual(first, second)
        self.assertTrue(tls.reload())
        self.assertIsNot(tls.current, before)

    def test_badFilesKeepOld(self):
        directory = self.mktemp()
        cert, key, _ = writeCertificate(directory)
        tls = ReloadableTLS(loadCertificateOptions(cert, key), cert, key)
        before = tls.current
        with open(cert, "w") as f:
            f.write("garbage")
        self.assertFalse(tls.reload())
        self.assertIs(tls.current, before)
