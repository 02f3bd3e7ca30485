"""
What the relay takes from its libraries beyond their public API, one module
per library (``twisted``, ``openssl`` for pyOpenSSL, ``autobahn``,
``aioquic``).

Every name in these modules says what it relies on, why the public API is not
enough, and what it is worth (the measurement). ``tests/test_internals_*.py``
check each one against the installed version and fail with a message naming
the library, the version and the missing piece, so that an upgrade that takes
one away is seen in CI, not in production.
"""
