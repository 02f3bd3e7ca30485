#!/usr/bin/env bash
# Build deploy/Dockerfile with Podman and run the image as an operator would:
# /readyz and the HEALTHCHECK, python -m relay.probe over WebSocket and TLS
# WebSocket, a QUIC pair, uid 10001, a read-only root filesystem, three
# containers forming a cluster on 127.0.0.2-4 that relays between pods, and
# `podman stop` ending the relay with status 0 within 5 s.
#
# Run as root on Debian, from anywhere: deploy/test-image.sh (or tox -e image).
# It installs podman, buildah, runc and mmdebstrap from Debian if they are
# missing, and needs no container registry: the Python base image is made
# from Debian packages with mmdebstrap, from the apt sources this machine
# already uses. pip inside the build uses this machine's pip settings (index,
# find-links, constraints; pip config files and PIP_* variables) and its CA
# bundle. /etc is left untouched: Podman reads a containers.conf of our own.
#
# Environment:
#   PYTHON_IMAGE  base image of both stages (default: made here with mmdebstrap)
#   KEEP_IMAGES   1 keeps the images made here (default: removed at the end)
#
# Every check prints one PASS or FAIL line; the exit status is non-zero if
# any check failed.
set -euo pipefail

started=$SECONDS
repo=$(cd "$(dirname "$0")/.." && pwd)
tag=$$
secret=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
clusterSecret=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
export OZ_AUTH_SECRET=$secret OZ_CLUSTER_AUTH_SECRET=$clusterSecret
# Fixed ports below the ephemeral range, so that no test's random port takes them.
peerPort=24443
metricsPort=29090
clusterPort=27090
cluster=(127.0.0.2 127.0.0.3 127.0.0.4)

failures=0
checks=0
pass() { checks=$((checks + 1)); echo "PASS: $*"; }
fail() { checks=$((checks + 1)); failures=$((failures + 1)); echo "FAIL: $*"; }
info() { echo "INFO: $*"; }
die() { fail "$*"; exit 1; }
# Podman 4.3 without systemd logs an error about the healthcheck timer at
# every start and removal of a container that has one (harmless: the check
# below runs it by hand); keep everything else it says.
quietly() {
  local out status=0
  out=$("$@" 2>&1 >/dev/null) || status=$?
  printf '%s' "$out" | grep -v 'systemd connection' >&2 || true
  return $status
}

# A command failing outside a check is a failure too (then set -e stops).
trap 'fail "line $LINENO: $BASH_COMMAND (status $?)"' ERR
[ "$(id -u)" = 0 ] || { echo "FAIL: run as root (podman, mmdebstrap)"; exit 1; }

missing=()
for tool in podman buildah runc mmdebstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  info "installing from Debian: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

work=$(mktemp -d /tmp/relay-image.XXXXXX)
image=localhost/relay-image-test:$tag
madeImages=()
containers=()

cleanup() {
  status=$?
  set +e
  if [ "$failures" -gt 0 ]; then
    for name in "${containers[@]}"; do
      echo "--- last log lines of $name"
      podman logs --tail 30 "$name" 2>&1
    done
  fi
  for name in "${containers[@]}"; do quietly podman rm -f -t 0 "$name"; done
  if [ "${KEEP_IMAGES:-0}" != 1 ]; then
    # Newest first: the relay image before the base it was built on.
    for ((i = ${#madeImages[@]} - 1; i >= 0; i--)); do
      podman rmi -f "${madeImages[i]}" >/dev/null 2>&1
    done
  fi
  rm -rf "$work"
  info "total $((SECONDS - started)) s"
  exit "$status"
}
trap cleanup EXIT

# Podman's defaults do not work here (FACTS.md): crun refuses hybrid cgroups,
# and setting ulimits above the host's hard limit needs CAP_SYS_RESOURCE.
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
if [ "$nofile" = unlimited ]; then nofile=1048576; fi
if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
cat >"$work/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF=$work/containers.conf

# --- The base image ---------------------------------------------------------
if [ -n "${PYTHON_IMAGE:-}" ]; then
  base=$PYTHON_IMAGE
  info "base image $base (PYTHON_IMAGE)"
else
  . /etc/os-release
  base=localhost/relay-python-debian:$VERSION_CODENAME
  if podman image exists "$base"; then
    info "base image $base (already here, kept)"
  else
    # The machine's own apt sources, as apt reads them; none is named here.
    sources=()
    if grep -qsE '^[[:space:]]*deb' /etc/apt/sources.list; then sources+=(/etc/apt/sources.list); fi
    for file in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
      [ -f "$file" ] && sources+=("$file")
    done
    [ ${#sources[@]} -gt 0 ] || die "no apt sources in /etc/apt/sources.list*"
    t0=$SECONDS
    # essential + Python; merged-usr installs usr-is-merged instead of
    # usrmerge (which pulls in 45 MB of Perl); no docs, man pages, locales,
    # nor the apt sources in the image.
    if ! mmdebstrap --variant=essential --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --include=python3,python3-venv,ca-certificates \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --customize-hook='rm -f "$1"/etc/apt/sources.list "$1"/etc/apt/sources.list.d/*' \
        "$VERSION_CODENAME" "$work/rootfs.tar" "${sources[@]}" >"$work/mmdebstrap.log" 2>&1; then
      tail -20 "$work/mmdebstrap.log"
      die "base image: mmdebstrap failed"
    fi
    podman import -q --change 'CMD ["python3"]' "$work/rootfs.tar" "$base" >/dev/null
    madeImages+=("$base")
    rm -f "$work/rootfs.tar"
    info "base image $base from Debian $VERSION_CODENAME in $((SECONDS - t0)) s, $(( $(podman image inspect -f '{{.Size}}' "$base") / 1000000 )) MB"
  fi
fi

# --- pip settings for the build ----------------------------------------------
# This machine's effective pip settings (files and PIP_* variables, as
# `pip config list` reports them) that choose where packages come from, as
# one pip.conf; the paths they name are bind-mounted read-only at the same
# place. Prints the CA bundle pip trusts, then one path to mount per line.
python3 - "$work/pip.conf" >"$work/pip.paths" <<'EOF'
import ast, configparser, os, subprocess, sys
from urllib.parse import unquote, urlsplit

KEYS = {"index-url", "extra-index-url", "find-links", "no-index", "trusted-host", "proxy",
        "retries", "timeout", "default-timeout", "constraint", "only-binary", "prefer-binary"}
items = []
try:
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    for line in listing.splitlines():
        name, _, value = line.partition("=")
        section, _, key = name.rpartition(".")
        items.append((section, key, ast.literal_eval(value)))
except (OSError, subprocess.SubprocessError, ValueError, SyntaxError):
    # No pip here: its variables are all there is.
    items = [(":env:", k[4:].lower().replace("_", "-"), v) for k, v in os.environ.items() if k.startswith("PIP_")]
# Variables beat files, as in pip.
items.sort(key=lambda item: item[0] == ":env:")
config = configparser.ConfigParser(interpolation=None)
cert = None
paths = []
for section, key, value in items:
    section = "global" if section == ":env:" else section
    if key == "cert":
        cert = value
        continue
    if key not in KEYS:
        continue
    if not config.has_section(section):
        config.add_section(section)
    config.set(section, key, value)
    for token in value.split():
        if token.startswith("file://"):
            # A file:// index's pages may link to files beside it (../files).
            path = os.path.dirname(unquote(urlsplit(token).path).rstrip("/"))
        elif token.startswith("/"):
            path = token
        else:
            continue
        if os.path.exists(path) and path not in paths:
            paths.append(path)
with open(sys.argv[1], "w") as f:
    config.write(f)
if cert is None and os.path.exists("/etc/ssl/certs/ca-certificates.crt"):
    cert = "/etc/ssl/certs/ca-certificates.crt"
print(cert or "")
print("\n".join(paths))
EOF
cacert=$(head -1 "$work/pip.paths")
[ -n "$cacert" ] || { cacert=$work/empty.crt; : >"$cacert"; }
buildVolumes=()
while read -r path; do
  [ -n "$path" ] && buildVolumes+=(-v "$path:$path:ro")
done < <(tail -n +2 "$work/pip.paths")
info "pip in the build: CA bundle $cacert; settings: $(grep -c = "$work/pip.conf" || true); mounted: $(tail -n +2 "$work/pip.paths" | tr '\n' ' ')"

# --- Build -------------------------------------------------------------------
t0=$SECONDS
# docker format keeps the HEALTHCHECK (OCI has none); --layers=false leaves
# no intermediate images behind.
if ! podman build --format docker --network host --layers=false --pull=missing \
    --build-arg "PYTHON_IMAGE=$base" \
    --secret "id=pipconf,src=$work/pip.conf" --secret "id=cacert,src=$cacert" \
    "${buildVolumes[@]}" -f "$repo/deploy/Dockerfile" -t "$image" "$repo" >"$work/build.log" 2>&1; then
  tail -30 "$work/build.log"
  die "podman build"
fi
madeImages+=("$image")
buildTime=$((SECONDS - t0))
size=$(podman image inspect -f '{{.Size}}' "$image")
pass "image built in $buildTime s, $((size / 1000000)) MB ($image, base $base)"

# --- Helpers -------------------------------------------------------------------
# HTTP status of GET http://$1/$2, in bash alone (no curl on a bare machine).
httpStatus() {
  local host=${1%:*} port=${1##*:} line
  line=$(timeout 5 bash -c "exec 3<>/dev/tcp/$host/$port && printf 'GET /$2 HTTP/1.0\r\nHost: $host\r\n\r\n' >&3 && head -1 <&3" 2>/dev/null) || { echo 000; return; }
  echo "$line" | awk '{print $2}'
}
httpBody() {
  local host=${1%:*} port=${1##*:}
  timeout 5 bash -c "exec 3<>/dev/tcp/$host/$port && printf 'GET /$2 HTTP/1.0\r\nHost: $host\r\n\r\n' >&3 && cat <&3" 2>/dev/null
}
waitReady() {
  local deadline=$((SECONDS + 30))
  while [ "$SECONDS" -lt "$deadline" ]; do
    [ "$(httpStatus "$1" readyz)" = 200 ] && return 0
    sleep 0.2
  done
  return 1
}
# Python in the image, as a client beside the relays (read-only, uid 10001);
# a program may come on standard input.
inImage() {
  timeout 120 podman run --rm -i --no-healthcheck --network host --read-only --cap-drop=all \
    --security-opt=no-new-privileges -v "$work/certs:/certs:ro" \
    -e OZ_AUTH_SECRET -e SSL_CERT_FILE=/certs/localhost.crt \
    --entrypoint /opt/relay/bin/python "$image" "$@"
}
# relay.probe from the image, 50 round trips: probe LABEL [ARG...] URL.
probe() {
  local label=$1 out
  shift
  if out=$(inImage -m relay.probe --count 50 "$@" </dev/null 2>&1); then
    pass "relay.probe over $label: $out"
  else
    fail "relay.probe over $label: $out"
  fi
}
# A relay container as the Kubernetes manifests run it: uid 10001 (the
# image's USER), read-only root filesystem with a small /tmp, no capabilities.
runRelay() {
  local name=$1
  shift
  containers+=("$name")
  quietly podman run -d --name "$name" --network host --read-only --read-only-tmpfs=false \
    --tmpfs /tmp:rw,size=16m,mode=1777 --cap-drop=all --security-opt=no-new-privileges \
    -v "$work/certs:/certs:ro" -e OZ_AUTH_SECRET "$@" "$image"
}
# Stop a relay as Kubernetes does (SIGTERM); it must exit 0 within 5 s.
stopRelay() {
  local name=$1 t0 ms status
  t0=$(date +%s%N)
  quietly podman stop -t 10 "$name"
  ms=$((($(date +%s%N) - t0) / 1000000))
  status=$(podman inspect -f '{{.State.ExitCode}}' "$name")
  if [ "$status" = 0 ] && [ "$ms" -lt 5000 ]; then
    pass "podman stop $name: exit status 0 after $ms ms"
  else
    fail "podman stop $name: exit status $status after $ms ms (want 0 within 5000 ms)"
  fi
  if podman logs "$name" 2>&1 | grep -qE 'Traceback|Unhandled Error'; then
    fail "$name logged a traceback"
  else
    pass "$name logged no traceback"
  fi
}

# Two peers, A at $1 and B at $2 (ws://, wss://, rel:// or rels://), find
# each other and bounce messages: A sends, B echoes. Prints the instances each peer landed on.
PAIR=$(cat <<'EOF'
import os, sys
from twisted.internet import defer, task
from relay import client, messages as m

def connect(reactor, spec, peerID):
    return client.connect(reactor, spec, peerID, secret=os.environ["OZ_AUTH_SECRET"], timeout=10)

@defer.inlineCallbacks
def main(reactor, specA, specB, count=50):
    tag = os.urandom(6).hex()
    idA, idB = m.peerID("image-a-" + tag), m.peerID("image-b-" + tag)
    a = yield connect(reactor, specA, idA)
    b = yield connect(reactor, specB, idB)
    try:
        yield a.waitOnline(idB, 10)
        b.onTransport = lambda message: b.sendRaw(message[:2] + idA + message[38:])
        for i in range(count):
            payload = os.urandom(1000 + i)
            a.send(idB, payload)
            source, echoed = yield a.transports.get().addTimeout(10, reactor)
            if source != idB or echoed != payload:
                raise SystemExit("a wrong message came back")
        print(f"ok: {count} round trips, A on {a.instanceURL}, B on {b.instanceURL}")
    finally:
        yield defer.DeferredList([a.close(), b.close()])

task.react(lambda reactor: main(reactor, *sys.argv[1:3]))
EOF
)

# --- One relay with TLS: WebSocket over TLS and QUIC -----------------------------
mkdir -p "$work/certs"
chown 10001:10001 "$work/certs"
# A throwaway certificate for localhost and 127.0.0.1, written as uid 10001
# by the tests' writer: the image holds no test code, so the repository's
# tests/ is mounted, read-only, for this one run.
timeout 60 podman run --rm --no-healthcheck --network none -v "$work/certs:/certs" -v "$repo/tests:/src/tests:ro" \
  --entrypoint /opt/relay/bin/python "$image" \
  -c "import sys; sys.path.insert(0, '/src'); from tests.bench.relayproc import writeCertificate; writeCertificate('/certs', 'localhost', prefix='')" \
  || die "throwaway certificate"

# The image holds the product (the relay, its client library, the probe),
# none of the tools: the installed package's files name no tool module.
if tools=$(inImage -c "
import importlib.metadata, re, sys
tools = [str(f) for f in importlib.metadata.files('relay') if re.search(r'(^|/)(bench|tests|deploy)/|(^|/)(fuzz|soak|lint|loopback)\.py$', str(f))]
print(' '.join(tools))
sys.exit(1 if tools else 0)
" </dev/null 2>&1); then
  pass "the image holds no tools (bench, fuzz, soak, lint)"
else
  fail "the image holds tools: $tools"
fi

single=relay-image-test-tls-$tag
runRelay "$single" \
  -e OZ_LISTEN_ADDRESS=127.0.0.1:$peerPort -e OZ_EXPOSED_ADDRESS=localhost:$peerPort \
  -e OZ_METRICS_ADDRESS=127.0.0.1 -e OZ_METRICS_PORT=$metricsPort \
  -e OZ_TLS_CERT_FILE=/certs/localhost.crt -e OZ_TLS_KEY_FILE=/certs/localhost.key
if waitReady "127.0.0.1:$metricsPort"; then
  pass "TLS relay: /readyz 200"
else
  fail "TLS relay: /readyz $(httpStatus "127.0.0.1:$metricsPort" readyz) after 30 s"
fi

pid=$(podman inspect -f '{{.State.Pid}}' "$single")
uids=$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$pid/status" 2>/dev/null || true)
gids=$(awk '/^Gid:/ {print $2, $3, $4, $5}' "/proc/$pid/status" 2>/dev/null || true)
if [ "$uids" = "10001 10001 10001 10001" ] && [ "$gids" = "10001 10001 10001 10001" ]; then
  pass "the relay runs as uid 10001, gid 10001"
else
  fail "the relay runs as uids $uids, gids $gids (real, effective, saved, fs; want 10001 each)"
fi

readOnly=$(podman inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$single")
if [ "$readOnly" = true ] && ! writeError=$(podman exec --user 0 "$single" touch /opt/relay/written 2>&1); then
  if echo "$writeError" | grep -q 'Read-only file system'; then
    pass "root filesystem read-only (even root may not write: $(echo "$writeError" | tail -1))"
  else
    fail "root filesystem: write refused, but not as read-only: $writeError"
  fi
else
  fail "root filesystem writable (ReadonlyRootfs=$readOnly)"
fi

if health=$(timeout 30 podman healthcheck run "$single" 2>&1); then
  pass "HEALTHCHECK kept in the image, and healthy"
else
  fail "HEALTHCHECK: $health"
fi

probe "TLS WebSocket" "rels://localhost:$peerPort"
probe QUIC --transport quic --cafile /certs/localhost.crt "rels://localhost:$peerPort"

received=$(httpBody "127.0.0.1:$metricsPort" metrics | awk '/^relay_transfer_received_bytes_total[ {]/ {s += $NF} END {print int(s)}')
if [ "$received" -gt 0 ]; then
  pass "/metrics: relay_transfer_received_bytes_total $received"
else
  fail "/metrics: relay_transfer_received_bytes_total is ${received:-missing}"
fi

stopRelay "$single"

# --- Three pods on 127.0.0.2-4 ------------------------------------------------------
members=$(IFS=,; echo "${cluster[*]}")
for ip in "${cluster[@]}"; do
  runRelay "relay-image-test-pod-${ip##*.}-$tag" \
    -e OZ_LISTEN_ADDRESS=$ip:$peerPort -e OZ_EXPOSED_ADDRESS=$ip:$peerPort \
    -e OZ_METRICS_ADDRESS=$ip -e OZ_METRICS_PORT=$metricsPort \
    -e OZ_CLUSTER_HEADLESS=$members -e OZ_POD_IP=$ip -e OZ_CLUSTER_PORT=$clusterPort \
    -e OZ_CLUSTER_LISTEN_ADDRESS=$ip:$clusterPort -e OZ_CLUSTER_AUTH_SECRET \
    -e OZ_CLUSTER_DISCOVERY_INTERVAL=1
done
for ip in "${cluster[@]}"; do
  if waitReady "$ip:$metricsPort"; then
    pass "pod $ip: /readyz 200"
  else
    fail "pod $ip: /readyz $(httpStatus "$ip:$metricsPort" readyz) after 30 s"
  fi
done
# Every pod holds a stream to each of the two others.
deadline=$((SECONDS + 30))
while :; do
  streams=()
  for ip in "${cluster[@]}"; do
    streams+=("$(httpBody "$ip:$metricsPort" metrics | awk '/^relay_cluster_streams[ {]/ {print int($NF); exit}')")
  done
  [ "${streams[*]}" = "2 2 2" ] && break
  [ "$SECONDS" -lt "$deadline" ] || break
  sleep 0.5
done
if [ "${streams[*]}" = "2 2 2" ]; then
  pass "cluster formed: relay_cluster_streams 2 on each pod"
else
  fail "cluster not formed: relay_cluster_streams ${streams[*]} (want 2 2 2)"
fi

probe WebSocket "rel://${cluster[0]}:$peerPort"

for pair in "0 1" "2 0"; do
  set -- $pair
  from=${cluster[$1]} to=${cluster[$2]}
  if out=$(inImage - "rel://$from:$peerPort" "rel://$to:$peerPort" <<<"$PAIR" 2>&1) \
      && echo "$out" | grep -q "A on rel://$from:$peerPort, B on rel://$to:$peerPort"; then
    pass "relayed across pods, peer on $from to peer on $to: $out"
  else
    fail "relayed across pods, peer on $from to peer on $to: $out"
  fi
done
forwards=$(httpBody "${cluster[0]}:$metricsPort" metrics | awk '/^relay_cluster_forwards_total\{.*result="ok"/ {s += $NF} END {print int(s)}')
if [ "$forwards" -gt 0 ]; then
  pass "pod ${cluster[0]} forwarded $forwards messages to its siblings (relay_cluster_forwards_total)"
else
  fail "pod ${cluster[0]}: relay_cluster_forwards_total{result=\"ok\"} is 0"
fi

for ip in "${cluster[@]}"; do
  stopRelay "relay-image-test-pod-${ip##*.}-$tag"
done

info "image $((size / 1000000)) MB, build $buildTime s"
if [ "$failures" -gt 0 ]; then
  echo "FAIL: $failures of $checks checks failed"
  exit 1
fi
echo "PASS: all $checks checks passed"
