"""
L{relay.internals.openssl} against the installed pyOpenSSL: each test names
the library, its version and the piece that is missing, so an upgrade that
takes one away fails here, not as a slower relay (relay.listener.ws falls back to
pyOpenSSL's public API without them).
"""

from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from relay.internals import openssl
from tests.test_listener_ws_tls import _fakeTCP, _InMemory


def missing(piece, user):
    return (
        f"pyOpenSSL {openssl.VERSION}: {piece} is gone or changed; "
        f"relay.internals.openssl.{user} relies on it (read its comment)"
    )


class HandleTests(SynchronousTestCase):
    def test_connectionHandles(self):
        connection = _InMemory(self, _fakeTCP()).server.tlsConnection
        for name, user in (
            ("_ssl", "sslOf"),
            ("_into_ssl", "receiveBIOOf"),
            ("_from_ssl", "sendBIOOf"),
        ):
            self.assertTrue(hasattr(connection, name), missing(f"Connection.{name}", user))

    def test_raiseError(self):
        """
        pyOpenSSL raises its own exception for the result of an SSL_read
        that wants more bytes.
        """
        self.assertIsNotNone(openssl.sslRead, missing("OpenSSL._util.lib.SSL_read", "sslRead"))
        connection = _InMemory(self, _fakeTCP()).server.tlsConnection
        self.assertTrue(
            hasattr(connection, "_raise_ssl_error"),
            missing("Connection._raise_ssl_error", "raiseError"),
        )
        ssl = openssl.sslOf(connection)
        self.assertRaises(
            SSL.WantReadError,
            openssl.raiseError,
            connection,
            ssl,
            openssl.sslRead(ssl, openssl.receiveBuffer, 10),
        )


class BindingTests(SynchronousTestCase):
    def test_memoryBIOLength(self):
        self.assertIsNotNone(
            openssl.memoryBIOLength,
            missing("OpenSSL._util.lib.BIO_get_mem_data", "memoryBIOLength"),
        )
        pair = _InMemory(self, _fakeTCP())
        connection = pair.server.tlsConnection
        pair.handshake()
        pair.wire()
        length = openssl.memoryBIOLength
        self.assertEqual(length(openssl.sendBIOOf(connection), openssl.MEMORY_BIO_DATA), 0)
        connection.send(b"x" * 100)
        waiting = length(openssl.sendBIOOf(connection), openssl.MEMORY_BIO_DATA)
        self.assertEqual(len(connection.bio_read(2**16)), waiting)
        pair.client.send(b"y" * 100)
        incoming = pair.client.bio_read(2**16)
        connection.bio_write(incoming)
        self.assertEqual(
            length(openssl.receiveBIOOf(connection), openssl.MEMORY_BIO_DATA), len(incoming)
        )

    def test_readBinding(self):
        for name in (
            "sslRead",
            "sslGetError",
            "SSL_ERROR_WANT_READ",
            "SSL_ERROR_ZERO_RETURN",
            "receiveBuffer",
            "bufferOf",
        ):
            self.assertIsNotNone(
                getattr(openssl, name),
                missing("OpenSSL._util.lib.SSL_read, SSL_get_error or ffi.new", name),
            )

    def test_writeBinding(self):
        for name in ("sslWrite", "bioRead", "cleartextOf", "sendBuffer", "sendView"):
            self.assertIsNotNone(
                getattr(openssl, name),
                missing("OpenSSL._util.lib.SSL_write, BIO_read or ffi", name),
            )

    def test_bioWrite(self):
        """
        BIO_write takes the records from a bytes object into the receive
        BIO, and SSL_read decrypts them.
        """
        self.assertIsNotNone(openssl.bioWrite, missing("OpenSSL._util.lib.BIO_write", "bioWrite"))
        pair = _InMemory(self, _fakeTCP())
        pair.handshake()
        connection = pair.server.tlsConnection
        pair.client.send(b"in")
        records = pair.client.bio_read(2**16)
        self.assertEqual(
            openssl.bioWrite(openssl.receiveBIOOf(connection), records, len(records)),
            len(records),
        )
        self.assertEqual(connection.recv(100), b"in")

    def test_roundTrip(self):
        """
        Cleartext written with SSL_write from the caller's bytes and read out
        with BIO_read reaches the client; the client's records come back out
        of SSL_read.
        """
        pair = _InMemory(self, _fakeTCP())
        pair.handshake()
        pair.wire()
        connection = pair.server.tlsConnection
        ssl = openssl.sslOf(connection)
        data = b"relayed" * 100
        with openssl.cleartextOf(data) as cleartext:
            self.assertEqual(openssl.sslWrite(ssl, cleartext, len(data)), len(data))
        got = openssl.bioRead(
            openssl.sendBIOOf(connection), openssl.sendBuffer, openssl.SEND_BUFFER_SIZE
        )
        pair.client.bio_write(openssl.sendView[:got].tobytes())
        self.assertEqual(pair.clientReceived(), data)
        pair.client.send(b"back")
        connection.bio_write(pair.client.bio_read(2**16))
        n = openssl.sslRead(ssl, openssl.receiveBuffer, openssl.RECEIVE_BUFFER_SIZE)
        self.assertEqual(openssl.bufferOf(openssl.receiveBuffer, n)[:], b"back")
        self.assertEqual(
            openssl.sslGetError(ssl, openssl.sslRead(ssl, openssl.receiveBuffer, 10)),
            openssl.SSL_ERROR_WANT_READ,
        )
