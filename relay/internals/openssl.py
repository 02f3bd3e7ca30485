"""
What the relay takes from pyOpenSSL beyond its public API (see
L{relay.internals}).

L{relay.listener.ws.PeerTLSProtocol} calls OpenSSL through pyOpenSSL's own cffi
binding (C{OpenSSL._util.lib} and C{ffi}) on the handles a
C{OpenSSL.SSL.Connection} keeps (C{_ssl}, and its memory BIOs C{_into_ssl}
and C{_from_ssl}). Why not the public API: C{Connection.recv}, C{send} and
C{bio_read} wrap every call in Python (a buffer allocated per call, the
error check, one or two copies), and the only way they tell that a memory
BIO is empty is an exception; a relay that forwards one small TLS record
per message pays that per message.

Each group of names below is None when the installed pyOpenSSL lacks a
piece of it; relay.listener.ws then goes through the public API, slower, not
wrong. C{tests/test_internals_openssl.py} says which piece went missing.

Figures: in process, a relayed 1,400-byte message over TLS 1.3 on this
project's 2-core machine (from the change that introduced each, pyOpenSSL
26.4.0).
"""

from operator import attrgetter

import OpenSSL

VERSION = OpenSSL.__version__

try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError:  # pragma: no cover - a pyOpenSSL that moved it
    _ffi = _lib = None

# The OpenSSL handles of a Connection: C{sslOf(connection)} is its C{SSL *},
# C{receiveBIOOf} the memory BIO its records come in through, C{sendBIOOf}
# the one they leave by. attrgetter: no Python frame on the hot path.
sslOf = attrgetter("_ssl")
receiveBIOOf = attrgetter("_into_ssl")
sendBIOOf = attrgetter("_from_ssl")


def raiseError(connection, ssl, result):
    """
    Raise pyOpenSSL's own exception (C{WantReadError}, C{ZeroReturnError},
    C{SSL.Error}, ...) for the C{result} of an C{SSL_read} / C{SSL_write} on
    C{ssl}, as its C{recv} / C{send} would; return if it was no error
    (C{SSL_ERROR_NONE}). Relies on C{Connection._raise_ssl_error}. Why: the
    relay's error handling stays pyOpenSSL's, with no table of OpenSSL
    errors of its own.
    """
    connection._raise_ssl_error(ssl, result)


# How many bytes a memory BIO holds: C{memoryBIOLength(bio, MEMORY_BIO_DATA)}
# (OpenSSL's BIO_get_mem_data; BIO_ctrl_pending is not in the binding).
# Worth: 0.2 us, where asking pyOpenSSL for data that is not there costs a
# WantReadError, 2 us, twice per read of a single message (once for the
# records received, once for the records to send).
try:
    memoryBIOLength = _lib.BIO_get_mem_data
    MEMORY_BIO_DATA = _ffi.new("char **")
except AttributeError:
    memoryBIOLength = MEMORY_BIO_DATA = None

# Records decrypted with OpenSSL's SSL_read into one shared buffer, until it
# wants more bytes (C{sslRead(ssl, receiveBuffer + offset, room)}, then
# C{sslGetError}): a Go agent sends one record per message, and
# pyOpenSSL's recv costs about 1 us of Python per record on top of the
# decryption (a 32 KiB buffer allocated, the error check, a copy). Worth:
# 16 messages per read, one record each, 3.8 -> 2.3 us of relay CPU per
# relayed message (plain WebSocket: 1.3). The buffer is shared: the reactor
# is one thread and what was read is copied out
# (C{bufferOf(receiveBuffer, n)[:]}) before it is delivered.
RECEIVE_BUFFER_SIZE = 2**18
try:
    sslRead = _lib.SSL_read
    sslGetError = _lib.SSL_get_error
    SSL_ERROR_WANT_READ = _lib.SSL_ERROR_WANT_READ
    SSL_ERROR_ZERO_RETURN = _lib.SSL_ERROR_ZERO_RETURN
    receiveBuffer = _ffi.new("char[]", RECEIVE_BUFFER_SIZE)
    bufferOf = _ffi.buffer
except AttributeError:
    sslRead = sslGetError = SSL_ERROR_WANT_READ = SSL_ERROR_ZERO_RETURN = receiveBuffer = (
        bufferOf
    ) = None

# The other way: cleartext encrypted with SSL_write straight from the
# caller's bytes (C{with cleartextOf(data) as p: sslWrite(ssl, p, n)}), and
# the records read out of the send BIO with BIO_read into one shared buffer
# (C{bioRead(bio, sendBuffer, n)}, then C{sendView[:n]}), copied only if
# the socket does not take them all. pyOpenSSL's send wraps each call in
# Python, and its bio_read allocates a buffer of its own and copies twice.
# Worth: 16 messages per read, 2.15 -> 1.92 us per relayed message; one
# message per read 8.3 -> 7.7 us.
SEND_BUFFER_SIZE = 2**18
try:
    sslWrite = _lib.SSL_write
    bioRead = _lib.BIO_read
    cleartextOf = _ffi.from_buffer
    sendBuffer = _ffi.new("char[]", SEND_BUFFER_SIZE)
    sendView = memoryview(_ffi.buffer(sendBuffer))
except AttributeError:
    sslWrite = bioRead = cleartextOf = sendBuffer = sendView = None

# The records a read brought, written into the receive BIO with BIO_write
# straight from the bytes the socket gave (C{bioWrite(bio, data, n)}, cffi
# passes a bytes object's own buffer to a C{void *}): pyOpenSSL's bio_write
# costs about 0.5 us of Python per read on top of the copy into the BIO (a
# text check, C{from_buffer} and its context, the error check), once per
# message for a Go agent in ping-pong. Worth (with L{relay.listener.ws.PeerTLSProtocol}'s
# one-record SSL_write from the bytes, no C{from_buffer}): one message per
# read, in process, 7.75 -> 7.2 us of relay CPU per relayed message.
try:
    bioWrite = _lib.BIO_write
except AttributeError:
    bioWrite = None

# How much cleartext of its record SSL_read keeps for the next call
# (C{sslPending(ssl)}): with the receive BIO empty (C{memoryBIOLength}) and
# nothing kept, a read is all decrypted, without one more C{SSL_read}
# returning WANT_READ and the C{SSL_get_error} that says so (OpenSSL's
# record layer and its error queue walked once more per read; with
# read-ahead off, as pyOpenSSL leaves it, OpenSSL takes no byte of the next
# record from the BIO). None without C{memoryBIOLength}: both are needed.
# Worth: one message per read, in process, 7.2 -> 6.8 us of relay CPU per
# relayed message.
try:
    sslPending = _lib.SSL_pending if memoryBIOLength is not None else None
except AttributeError:
    sslPending = None
