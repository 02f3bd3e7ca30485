"""
The relay under test as a separate process, and what /proc tells about it.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from tests.loopback import commonPort, freePort

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLK_TCK = os.sysconf("SC_CLK_TCK")
PODS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def processTree(pid):
    """
    C{pid} and its descendants (a relay with worker processes counts as
    all of them).
    """
    out = [pid]
    i = 0
    while i < len(out):
        p = out[i]
        i += 1
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    out.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def _rssOne(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def rssKiB(pid, tree=True):
    """
    VmRSS of C{pid} in KiB (summed over its descendants unless C{tree} is
    false).
    """
    total = _rssOne(pid)
    if tree:
        for p in processTree(pid)[1:]:
            try:
                total += _rssOne(p)
            except (OSError, RuntimeError):
                pass
    return total


def _cpuOne(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # fields[0] is the state (field 3); utime and stime are fields 14, 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpuSeconds(pid, tree=True):
    """
    User + system CPU seconds used so far by C{pid} (all its threads, and
    its live descendants unless C{tree} is false).
    """
    total = _cpuOne(pid)
    if tree:
        for p in processTree(pid)[1:]:
            try:
                total += _cpuOne(p)
            except OSError:
                pass
    return total


def listenOverflows():
    """
    The kernel's count of connections dropped because a listen queue was
    full (system-wide TcpExt ListenOverflows), or None.
    """
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return int(table["ListenOverflows"]) if "ListenOverflows" in table else None
    return None


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def raiseFileLimit(want=65536):
    """
    Raise the soft RLIMIT_NOFILE towards C{want}, or to the hard limit if
    C{want} is None (children inherit it).

    @return: the soft limit now.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if want is None:
        target = hard
    else:
        target = min(want, hard) if hard != resource.RLIM_INFINITY else want
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class RelayProcess:
    """
    C{twistd -n --pidfile= relay ...} started from the repository root.
    """

    def __init__(
        self, secret, host="127.0.0.1", port=None, extra=(), logDir=None, name="relay", root=None
    ):
        self.root = root or ROOT
        self.host = host
        self.port = port or freePort(host)
        self.secret = secret
        self.extra = list(extra)
        self.logDir = logDir or tempfile.mkdtemp(prefix="relay-bench-")
        self.logPath = os.path.join(self.logDir, f"{name}-{self.port}.log")
        self.proc = None

    @property
    def pid(self):
        return self.proc.pid

    @property
    def argv(self):
        address = f"{self.host}:{self.port}"
        return [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "relay",
            "--listen-address",
            address,
            "--exposed-address",
            address,
            "--auth-secret",
            self.secret,
            "--metrics-port",
            "0",
        ] + self.extra

    def start(self, timeout=20.0):
        """
        Start and wait until the peer port accepts connections.

        @raise RuntimeError: the relay exited or did not listen in time
            (the message holds the end of its output).
        """
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.root != ROOT:
            # another checkout (e.g. a git worktree of an older commit): its
            # relay package and twistd plugin come first
            env["PYTHONPATH"] = os.pathsep.join(
                [self.root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
            )
        self._log = open(self.logPath, "ab")
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"relay exited with status {self.proc.returncode} at start-up:\n"
                    f"{self.logTail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"relay did not listen within {timeout} s:\n{self.logTail()}"
                    ) from None
                time.sleep(0.05)

    def logTail(self, n=2000):
        try:
            with open(self.logPath, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                f.seek(max(0, size - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        if self.running():
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout=35.0):
        """
        SIGTERM (the relay drains), SIGKILL after C{timeout}.

        @return: the exit status.
        """
        if self.proc is None:
            return None
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def startRelays(secret, extra, logDir, name, cluster=False, clusterSecret=None, timeout=20.0):
    """
    One relay on 127.0.0.1 (C{<name>-relay}), or (C{cluster}) three pods on
    L{PODS} sharing one peer port and one cluster port (C{<name>-pod-<host>}),
    each started with C{extra} and waited for; if one fails, those already
    started are stopped.

    @return: C{(list of L{RelayProcess}, cluster port or None)}.
    @raise RuntimeError: a relay did not start.
    """
    if not cluster:
        relay = RelayProcess(
            secret, host="127.0.0.1", extra=extra, logDir=logDir, name=f"{name}-relay"
        )
        relay.start(timeout=timeout)
        return [relay], None
    clusterPort = commonPort(PODS)
    peerPort = commonPort(PODS)
    relays = []
    try:
        for host in PODS:
            podExtra = list(extra) + [
                "--cluster-headless",
                ",".join(PODS),
                "--pod-ip",
                host,
                "--cluster-port",
                str(clusterPort),
                "--cluster-listen-address",
                f"{host}:{clusterPort}",
                "--cluster-auth-secret",
                clusterSecret,
                "--cluster-discovery-interval",
                "1",
            ]
            relay = RelayProcess(
                secret,
                host=host,
                port=peerPort,
                extra=podExtra,
                logDir=logDir,
                name=f"{name}-pod-{host}",
            )
            relay.start(timeout=timeout)
            relays.append(relay)
    except Exception:
        for relay in relays:
            relay.stop()
        raise
    return relays, clusterPort


class ExternalRelay:
    """
    A relay somebody else started (C{--url}): no start, no stop.
    """

    def __init__(self, host, port, secret, pid=None):
        self.host = host
        self.port = port
        self.secret = secret
        self._pid = pid
        self.logPath = None

    @property
    def pid(self):
        return self._pid

    def running(self):
        return self._pid is None or alive(self._pid)

    def logTail(self, n=2000):
        return ""

    def stop(self, timeout=0):
        return None


def writeCertificate(directory, name="localhost", days=2, expired=False, prefix="bench-"):
    """
    A throwaway self-signed EC certificate for C{name} and 127.0.0.1 (the
    relay serves QUIC only with a certificate), valid from five minutes ago
    for C{days} days, or, if C{expired}, from ten days ago until yesterday.
    Written as C{<prefix><name>.crt} and C{.key} (mode 0600) in
    C{directory}.

    @return: C{(certificate path, key path)}.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    if expired:
        start, end = now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)
    else:
        start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(directory, exist_ok=True)
    certPath = os.path.join(directory, f"{prefix}{name}.crt")
    keyPath = os.path.join(directory, f"{prefix}{name}.key")
    with open(certPath, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    fd = os.open(keyPath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return certPath, keyPath


def runQueueSeconds(pid, tree=True):
    """
    Seconds C{pid} (and its live descendants) spent runnable but waiting
    for a CPU (/proc/PID/schedstat, main threads): on a shared machine,
    what tells a relay short of CPU from a relay with nothing to do.
    None if unreadable.
    """
    total = 0.0
    for p in processTree(pid) if tree else [pid]:
        try:
            with open(f"/proc/{p}/schedstat") as f:
                total += int(f.read().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            if p == pid:
                return None
    return total


def udpCounters():
    """
    The kernel's system-wide UDP counters (/proc/net/snmp: RcvbufErrors,
    SndbufErrors, InErrors, ...) as a dict, or None.
    """
    try:
        with open("/proc/net/snmp") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("Udp:"):
            return {k: int(v) for k, v in zip(names.split()[1:], values.split()[1:])}
    return None
