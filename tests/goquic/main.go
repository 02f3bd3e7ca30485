// Command goquic is a QUIC test client for the relay written on quic-go, the
// QUIC stack of the Go agents: a second, independent implementation beside
// the relay's own aioquic, so the tests see the relay as agents do.
//
// It speaks peer protocol v1 (PROTOCOL.md section 2) over DATAGRAM frames
// with ALPN nb-quic and runs one scenario over many fresh connections. Each
// line it writes to stdout is a JSON object; the last one is the summary.
// Progress and errors go to stderr. It builds from Debian's packages alone
// (golang-go, golang-github-lucas-clemente-quic-go-dev) in GOPATH mode:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o goquic ./tests/goquic
//
// Scenarios (-scenario):
//
//	first      per connection: Auth, then SubscribePeerState(echo) and a
//	           Transport to echo in the moment the AuthResponse arrives;
//	           counts the AuthResponses, PeersOnline answers and echoes
//	           that never came
//	exchange   per connection: -messages Transports of 1 to 1179 bytes to
//	           the echo peer, each echoed back; every byte and the order
//	           checked
//	cidchange  per connection: Transports to itself until quic-go has
//	           changed the relay's connection id -changes times, then 500
//	           more; nothing may be lost
//	sizes      per connection: a 1180-byte "sizes <i>" request to the
//	           echo peer, which answers with payloads of several sizes and
//	           "end"; reports what arrived (quic-go 0.29 accepts DATAGRAM
//	           frames up to 1220 bytes)
//	badtoken   per connection: Auth with a token of another secret and a
//	           Transport to echo at once; reports how the relay closed
//	hold       -n peers connect and stay; one line when all are up, one per
//	           connection as it ends (idle timeout when the relay vanishes)
//	load       the benchmark's load: -pairs echo pairs over QUIC or TLS
//	           WebSocket, -window messages in flight each (load.go)
//
// The echo peer (-echo NAME) must send every Transport it receives back to
// its sender (for sizes: answer as described); the tests run it over
// WebSocket.
package main

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	quic "github.com/lucas-clemente/quic-go"
	"github.com/lucas-clemente/quic-go/logging"
)

const (
	alpn = "nb-quic"

	version            = 1
	msgTransport       = 3
	msgClose           = 4
	msgHealthCheck     = 5
	msgAuth            = 6
	msgAuthResponse    = 7
	msgSubscribe       = 8
	msgPeersOnline     = 10
	msgPeersWentOffine = 11

	idSize = 36
	// The largest Transport payload in quic-go 0.29's DATAGRAM frame of
	// 1220 bytes: 1220 - 3 (frame type, 2-byte length) - 38 (header).
	maxFittingPayload = 1179
	// Transports allowed in flight, sent but not yet echoed: quic-go keeps
	// at most 128 received datagrams unread and drops the rest.
	window = 64
)

var magic = []byte{0x21, 0x12, 0xa4, 0x42}

// errNoAuthResponse: the relay never answered the Auth (the Auth, or the
// answer, was lost).
var errNoAuthResponse = errors.New("no AuthResponse")

var (
	addr      = flag.String("addr", "127.0.0.1:443", "the relay's host:port (UDP)")
	caFile    = flag.String("ca", "", "PEM certificate to trust (required)")
	secret    = flag.String("secret", "", "the relay's auth secret")
	scenario  = flag.String("scenario", "first", "first, exchange, cidchange, sizes, badtoken, hold or load")
	count     = flag.Int("n", 50, "fresh connections")
	echoName  = flag.String("echo", "", "name of the echo peer")
	tag       = flag.String("tag", "goquic", "prefix of this run's peer names")
	messages  = flag.Int("messages", 1000, "Transports per connection (exchange)")
	changes   = flag.Int("changes", 2, "connection id changes to wait for (cidchange)")
	idle      = flag.Duration("idle", 4*time.Minute, "MaxIdleTimeout (the agents ask for 4 min)")
	keepAlive = flag.Duration("keepalive", 30*time.Second, "KeepAlivePeriod (the agents' 30 s)")
	timeout   = flag.Duration("timeout", 5*time.Second, "longest wait for any one answer")
)

// peerID is the 36-byte id of a peer name: "sha-" + SHA-256(name).
func peerID(name string) []byte {
	sum := sha256.Sum256([]byte(name))
	return append([]byte("sha-"), sum[:]...)
}

// token is an HMAC v2 token valid for an hour, keyed with SHA-256(secret).
func token(secret string) []byte {
	payload := []byte(strconv.FormatInt(time.Now().Add(time.Hour).Unix(), 10))
	key := sha256.Sum256([]byte(secret))
	mac := hmac.New(sha256.New, key[:])
	mac.Write(payload)
	return append(append([]byte{1}, mac.Sum(nil)...), payload...)
}

func transport(dst, payload []byte) []byte {
	return append(append([]byte{version, msgTransport}, dst...), payload...)
}

// payloadOf is the deterministic payload of message index on connection
// conn (tests/test_quic.py makes the same ones).
func payloadOf(conn, index, size int) []byte {
	b := make([]byte, 0, size+4)
	b = append(b, byte(conn>>8), byte(conn), byte(index>>8), byte(index))
	for j := 4; j < size; j++ {
		b = append(b, byte(conn*31+index*7+j))
	}
	return b[:size]
}

func exchangeSize(conn, index int) int {
	return 1 + (index*7919+conn*104729)%maxFittingPayload
}

// tracer watches the packets of one connection for the destination
// connection ids quic-go sends to.
type tracer struct {
	logging.NullConnectionTracer
	mu          sync.Mutex
	ids         []string
	sentPackets int
	changedAt   []int
}

func (t *tracer) SentPacket(hdr *logging.ExtendedHeader, size logging.ByteCount, ack *logging.AckFrame, frames []logging.Frame) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.sentPackets++
	if hdr.IsLongHeader {
		return
	}
	id := hdr.DestConnectionID.String()
	if len(t.ids) == 0 || t.ids[len(t.ids)-1] != id {
		if len(t.ids) > 0 {
			t.changedAt = append(t.changedAt, t.sentPackets)
		}
		t.ids = append(t.ids, id)
	}
}

// idChanges is how many times quic-go moved to another relay connection id
// in 1-RTT packets, and after how many packets sent each time.
func (t *tracer) idChanges() (int, []int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.changedAt), append([]int(nil), t.changedAt...)
}

// tracers hands one connection its tracer.
type tracers struct {
	logging.NullTracer
	next *tracer
}

func (ts *tracers) TracerForConnection(ctx context.Context, p logging.Perspective, odcid logging.ConnectionID) logging.ConnectionTracer {
	return ts.next
}

type transportMsg struct {
	src, payload []byte
}

// peer is one authenticated QUIC connection to the relay.
type peer struct {
	conn       quic.Connection
	id         []byte
	trace      *tracer
	transports chan transportMsg
	online     chan [][]byte
	done       chan struct{}
	err        error
}

func tlsConfig() *tls.Config {
	pem, err := os.ReadFile(*caFile)
	if err != nil {
		fatal("reading -ca: %v", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		fatal("no certificate in %s", *caFile)
	}
	return &tls.Config{RootCAs: roots, ServerName: "localhost", NextProtos: []string{alpn}}
}

// dial makes a fresh QUIC connection (its own UDP socket) shaped like an
// agent's (relay/client/dialer/quic in openZro).
func dial(tlsConf *tls.Config) (quic.Connection, *tracer, error) {
	t := &tracer{}
	config := &quic.Config{
		EnableDatagrams: true,
		MaxIdleTimeout:  *idle,
		KeepAlivePeriod: *keepAlive,
		Tracer:          &tracers{next: t},
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	conn, err := quic.DialAddrContext(ctx, *addr, tlsConf, config)
	return conn, t, err
}

// start reads the connection's datagrams until it ends.
func start(conn quic.Connection, id []byte, t *tracer) *peer {
	p := &peer{
		conn:       conn,
		id:         id,
		trace:      t,
		transports: make(chan transportMsg, 1<<16),
		online:     make(chan [][]byte, 64),
		done:       make(chan struct{}),
	}
	go p.read()
	return p
}

func (p *peer) read() {
	defer close(p.done)
	for {
		data, err := p.conn.ReceiveMessage()
		if err != nil {
			p.err = err
			return
		}
		if len(data) < 2 || data[0] != version {
			continue
		}
		switch data[1] {
		case msgTransport:
			if len(data) >= 2+idSize {
				p.transports <- transportMsg{data[2 : 2+idSize], data[2+idSize:]}
			}
		case msgHealthCheck:
			p.send([]byte{version, msgHealthCheck})
		case msgPeersOnline:
			var ids [][]byte
			for body := data[2:]; len(body) >= idSize; body = body[idSize:] {
				ids = append(ids, body[:idSize])
			}
			p.online <- ids
		case msgAuthResponse:
			p.online <- nil
		}
	}
}

func (p *peer) send(message []byte) error {
	return p.conn.SendMessage(message)
}

// connect dials and authenticates: the AuthResponse comes first on
// p.online as a nil list.
func connect(tlsConf *tls.Config, name string, tok []byte) (*peer, error) {
	conn, t, err := dial(tlsConf)
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	id := peerID(name)
	p := start(conn, id, t)
	auth := append(append(append([]byte{version, msgAuth}, magic...), id...), tok...)
	if err := p.send(auth); err != nil {
		p.close()
		return nil, fmt.Errorf("sending Auth: %w", err)
	}
	select {
	case ids := <-p.online:
		if ids != nil {
			p.close()
			return nil, errors.New("PeersOnline before AuthResponse")
		}
		return p, nil
	case <-p.done:
		return nil, fmt.Errorf("closed before AuthResponse: %v", p.err)
	case <-time.After(*timeout):
		p.close()
		return nil, errNoAuthResponse
	}
}

func (p *peer) close() {
	p.send([]byte{version, msgClose})
	p.conn.CloseWithError(0, "normal closure")
	<-p.done
}

// waitOnline waits for a PeersOnline naming id.
func (p *peer) waitOnline(id []byte) bool {
	deadline := time.After(*timeout)
	for {
		select {
		case ids := <-p.online:
			for _, got := range ids {
				if bytes.Equal(got, id) {
					return true
				}
			}
		case <-deadline:
			return false
		}
	}
}

// nextTransport waits for the next Transport, or gives up.
func (p *peer) nextTransport() (transportMsg, bool) {
	select {
	case msg := <-p.transports:
		return msg, true
	case <-time.After(*timeout):
		return transportMsg{}, false
	}
}

// stream sends payloads to dst, at most window of them unanswered, and
// collects the Transports that come back until all have or one is late.
// more, if not nil, is asked after each send whether to add another
// payload (with its index).
func (p *peer) stream(dst []byte, payloads [][]byte, more func(int) []byte) (sent, received [][]byte, err error) {
	for i := 0; ; i++ {
		if i == len(payloads) && more != nil {
			if extra := more(i); extra != nil {
				payloads = append(payloads, extra)
			}
		}
		for len(received) < len(payloads) && (i == len(payloads) || i-len(received) >= window) {
			msg, ok := p.nextTransport()
			if !ok {
				return payloads[:i], received, fmt.Errorf("%d of %d sent came back, then nothing for %v", len(received), i, *timeout)
			}
			received = append(received, msg.payload)
		}
		if i == len(payloads) {
			return payloads, received, nil
		}
		if err := p.send(transport(dst, payloads[i])); err != nil {
			return payloads[:i], received, fmt.Errorf("SendMessage: %w", err)
		}
	}
}

// firstDifference is the first index where two lists of payloads differ,
// or -1.
func firstDifference(a, b [][]byte) int {
	for i := range a {
		if i >= len(b) || !bytes.Equal(a[i], b[i]) {
			return i
		}
	}
	if len(b) > len(a) {
		return len(a)
	}
	return -1
}

type result map[string]interface{}

var stdout = json.NewEncoder(os.Stdout)

func emit(r result) {
	if err := stdout.Encode(r); err != nil {
		fatal("writing stdout: %v", err)
	}
}

func fatal(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "goquic: "+format+"\n", args...)
	os.Exit(2)
}

func main() {
	flag.Parse()
	if *caFile == "" || *secret == "" {
		fatal("-ca and -secret are required")
	}
	if *echoName == "" && (*scenario == "first" || *scenario == "exchange" || *scenario == "sizes" || *scenario == "badtoken") {
		fatal("-echo is required for %s", *scenario)
	}
	tlsConf := tlsConfig()
	echo := peerID(*echoName)
	summary := result{"scenario": *scenario, "connections": *count}
	var failures []string
	fail := func(i int, format string, args ...interface{}) {
		failures = append(failures, fmt.Sprintf("connection %d: ", i)+fmt.Sprintf(format, args...))
	}
	switch *scenario {
	case "first":
		runFirst(tlsConf, echo, summary, fail)
	case "exchange":
		runExchange(tlsConf, echo, summary, fail)
	case "cidchange":
		runIDChange(tlsConf, summary, fail)
	case "sizes":
		runSizes(tlsConf, echo, summary, fail)
	case "badtoken":
		runBadToken(tlsConf, echo, summary, fail)
	case "hold":
		runHold(tlsConf, summary, fail)
	case "load":
		runLoad(tlsConf, summary, fail)
	default:
		fatal("unknown scenario %q", *scenario)
	}
	if failures == nil {
		failures = []string{}
	}
	summary["failures"] = failures
	summary["summary"] = true
	emit(summary)
}

type failer func(int, string, ...interface{})

// runFirst: the race of issue 11. quic-go moves to a relay-issued
// connection id as soon as it learns one, which is in the packet that
// carries the AuthResponse; what it sends next goes to that id.
func runFirst(tlsConf *tls.Config, echo []byte, summary result, fail failer) {
	lostAuth, lostSubscribe, lostTransport, switched := 0, 0, 0, 0
	for i := 0; i < *count; i++ {
		p, err := connect(tlsConf, fmt.Sprintf("%s-first-%d", *tag, i), token(*secret))
		if errors.Is(err, errNoAuthResponse) {
			lostAuth++
			continue
		} else if err != nil {
			fail(i, "%v", err)
			continue
		}
		payload := []byte(fmt.Sprintf("first %d", i))
		p.send(append([]byte{version, msgSubscribe}, echo...))
		p.send(transport(echo, payload))
		if !p.waitOnline(echo) {
			lostSubscribe++
		}
		msg, ok := p.nextTransport()
		if !ok {
			lostTransport++
		} else if !bytes.Equal(msg.src, echo) || !bytes.Equal(msg.payload, payload) {
			fail(i, "wrong echo %q", msg.payload)
		}
		if n, _ := p.trace.idChanges(); n > 0 {
			switched++
		}
		p.close()
	}
	summary["lost_auth"] = lostAuth
	summary["lost_subscribe"] = lostSubscribe
	summary["lost_transport"] = lostTransport
	summary["switched_id"] = switched
}

// connectToEcho connects as name, subscribes to the echo peer and waits
// until the relay says it is online; on failure the connection is closed.
func connectToEcho(tlsConf *tls.Config, name string, echo []byte) (*peer, error) {
	p, err := connect(tlsConf, name, token(*secret))
	if err != nil {
		return nil, err
	}
	p.send(append([]byte{version, msgSubscribe}, echo...))
	if !p.waitOnline(echo) {
		p.close()
		return nil, errors.New("echo peer never online")
	}
	return p, nil
}

func runExchange(tlsConf *tls.Config, echo []byte, summary result, fail failer) {
	total, returned := 0, 0
	for i := 0; i < *count; i++ {
		p, err := connectToEcho(tlsConf, fmt.Sprintf("%s-exchange-%d", *tag, i), echo)
		if err != nil {
			fail(i, "%v", err)
			continue
		}
		payloads := make([][]byte, *messages)
		for k := range payloads {
			payloads[k] = payloadOf(i, k, exchangeSize(i, k))
		}
		sent, received, err := p.stream(echo, payloads, nil)
		total += len(sent)
		returned += len(received)
		if err != nil {
			fail(i, "%v", err)
		}
		if d := firstDifference(sent, received); d >= 0 && err == nil {
			fail(i, "message %d came back wrong or out of order", d)
		}
		p.close()
	}
	summary["sent"] = total
	summary["received"] = returned
}

// runIDChange: quic-go changes the relay's connection id first right after
// the handshake, then after 5,000 to 15,000 packets sent on one id
// (protocol.PacketsPerConnectionID) while it holds enough spare ids; 0.29
// has no call to change it on demand. Transports to itself keep packets
// flowing until it has changed -changes times.
func runIDChange(tlsConf *tls.Config, summary result, fail failer) {
	var changedAt [][]int
	total, returned, lost := 0, 0, 0
	for i := 0; i < *count; i++ {
		name := fmt.Sprintf("%s-cid-%d", *tag, i)
		p, err := connect(tlsConf, name, token(*secret))
		if err != nil {
			fail(i, "%v", err)
			continue
		}
		tail := -1
		more := func(k int) []byte {
			if k >= 60000 {
				return nil
			}
			if n, _ := p.trace.idChanges(); n >= *changes && tail < 0 {
				tail = k + 500
			}
			if tail >= 0 && k >= tail {
				return nil
			}
			return payloadOf(i, k, 1+k%100)
		}
		sent, received, err := p.stream(p.id, nil, more)
		total += len(sent)
		returned += len(received)
		lost += len(sent) - len(received)
		if err != nil {
			fail(i, "%v", err)
		} else if d := firstDifference(sent, received); d >= 0 {
			fail(i, "message %d came back wrong or out of order", d)
		}
		n, at := p.trace.idChanges()
		if n < *changes {
			fail(i, "quic-go changed the connection id %d times in %d messages", n, len(sent))
		}
		changedAt = append(changedAt, at)
		p.close()
	}
	summary["sent"] = total
	summary["received"] = returned
	summary["lost"] = lost
	summary["changed_at_packets"] = changedAt
}

// runSizes: quic-go 0.29 advertises max_datagram_frame_size 1220, so the
// relay can send it messages of at most 1217 bytes (a 1179-byte payload).
// The echo peer answers "sizes <i>" with messages of several sizes and
// "end"; only those that fit may arrive, whole.
//
// What it sends itself stays within its own packets: SendMessage checks
// only the relay's limit (8824 bytes), and a message that does not fit the
// packet size of the moment (1252 bytes before path MTU discovery) makes
// quic-go 0.29 close its own connection with INTERNAL_ERROR ("PacketPacker
// BUG: packet too large").
func runSizes(tlsConf *tls.Config, echo []byte, summary result, fail failer) {
	back := map[int]int{}
	for i := 0; i < *count; i++ {
		p, err := connectToEcho(tlsConf, fmt.Sprintf("%s-sizes-%d", *tag, i), echo)
		if err != nil {
			fail(i, "%v", err)
			continue
		}
		request := []byte(fmt.Sprintf("sizes %d ", i))
		request = append(request, bytes.Repeat([]byte("r"), maxFittingPayload+1-len(request))...)
		if err := p.send(transport(echo, request)); err != nil {
			fail(i, "SendMessage: %v", err)
		}
		for {
			msg, ok := p.nextTransport()
			if !ok {
				fail(i, "the end marker never came")
				break
			}
			if bytes.Equal(msg.payload, []byte("end")) {
				break
			}
			size := len(msg.payload)
			if !bytes.Equal(msg.payload, payloadOf(i, size, size)) {
				fail(i, "a %d-byte payload arrived that was not sent", size)
			}
			back[size]++
		}
		p.close()
	}
	received := map[string]int{}
	for size, n := range back {
		received[strconv.Itoa(size)] = n
	}
	summary["received_sizes"] = received
}

func runBadToken(tlsConf *tls.Config, echo []byte, summary result, fail failer) {
	closes := map[string]int{}
	for i := 0; i < *count; i++ {
		conn, t, err := dial(tlsConf)
		if err != nil {
			fail(i, "dial: %v", err)
			continue
		}
		id := peerID(fmt.Sprintf("%s-intruder-%d", *tag, i))
		p := start(conn, id, t)
		auth := append(append(append([]byte{version, msgAuth}, magic...), id...), token(*secret+"-wrong")...)
		p.send(auth)
		p.send(transport(echo, []byte(fmt.Sprintf("intruder %d", i))))
		select {
		case <-p.done:
		case <-time.After(*timeout):
			fail(i, "still open")
			p.close()
			continue
		}
		var appErr *quic.ApplicationError
		switch {
		case errors.As(p.err, &appErr) && appErr.Remote:
			closes[fmt.Sprintf("application error %#x", uint64(appErr.ErrorCode))]++
		default:
			closes[fmt.Sprintf("%T %v", p.err, p.err)]++
		}
		select {
		case ids := <-p.online:
			if ids == nil {
				fail(i, "authenticated with a bad token")
			}
		default:
		}
	}
	summary["closed"] = closes
}

// runHold connects -n peers that stay until their connections end.
func runHold(tlsConf *tls.Config, summary result, fail failer) {
	var peers []*peer
	for i := 0; i < *count; i++ {
		p, err := connect(tlsConf, fmt.Sprintf("%s-hold-%d", *tag, i), token(*secret))
		if err != nil {
			fail(i, "%v", err)
			continue
		}
		peers = append(peers, p)
	}
	emit(result{"ready": len(peers)})
	began := time.Now()
	ended := map[string]int{}
	var longest time.Duration
	for _, p := range peers {
		<-p.done
		if d := time.Since(began); d > longest {
			longest = d
		}
		var idleErr *quic.IdleTimeoutError
		if errors.As(p.err, &idleErr) {
			ended["idle timeout"]++
		} else {
			ended[fmt.Sprintf("%v", p.err)]++
		}
	}
	summary["ended"] = ended
	summary["all_ended_after_seconds"] = longest.Seconds()
}
