"""
Throwaway certificates for TLS tests.
"""

from tests.bench import relayproc


def writeCertificate(directory, name="localhost", days=30, expired=False):
    """
    A self-signed EC certificate for C{name} (and 127.0.0.1), written as
    C{<name>.crt} and C{<name>.key} in C{directory}; see
    L{tests.bench.relayproc.writeCertificate}.

    @return: C{(certificate path, key path, certificate PEM bytes)}.
    """
    certPath, keyPath = relayproc.writeCertificate(
        directory, name=name, days=days, expired=expired, prefix=""
    )
    with open(certPath, "rb") as f:
        pem = f.read()
    return certPath, keyPath, pem
