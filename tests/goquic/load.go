package main

// The load scenario: the benchmark's load generator (python -m tests.bench
// quic), in Go so that the relay, not the load, sets the pace.
//
// -pairs pairs of peers over -transport (quic; wss: TLS WebSocket on the
// same relay; or ws: plain WebSocket, on a relay without a certificate, so
// that TLS WebSocket can be set against plain with the same load). In each pair A sends Transports of -size payload bytes to B,
// at most -window unanswered; B checks each and sends it back; A checks it
// again and times the round trip. Every byte is checked at both ends: a
// payload is its sequence number, its pair, and a pattern of both.
//
// Lines on stdout: {"ready": pairs} once every peer is authenticated, then
// {"mark": "start"} after -warmup and {"mark": "end"} after -duration more
// (the harness reads the relay's CPU time at each), then the summary after
// the window drains (at most -drain). Messages in flight for -stall with no
// answer are written off as lost and freed from the window; an answer that
// comes after that counts as late.

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	quic "github.com/lucas-clemente/quic-go"
	"nhooyr.io/websocket"
)

var (
	loadTransport = flag.String("transport", "quic", "load: quic, wss (TLS WebSocket) or ws (plain WebSocket)")
	loadPairs     = flag.Int("pairs", 10, "load: sender/echo pairs")
	loadWindow    = flag.Int("window", 64, "load: messages in flight per pair (1: ping-pong)")
	loadSize      = flag.Int("size", maxFittingPayload, "load: payload bytes of each Transport (16 or more)")
	loadWarmup    = flag.Duration("warmup", time.Second, "load: time before the measured interval")
	loadDuration  = flag.Duration("duration", 5*time.Second, "load: the measured interval")
	loadDrain     = flag.Duration("drain", 3*time.Second, "load: longest wait for the last answers")
	loadStall     = flag.Duration("stall", 500*time.Millisecond, "load: an unanswered message is lost after this")
)

// link is one authenticated peer connection, QUIC or WebSocket.
type link interface {
	send([]byte) error
	recv() ([]byte, error)
	close()
}

type quicLink struct{ conn quic.Connection }

func newQuicLink(conn quic.Connection) *quicLink { return &quicLink{conn} }

func (l *quicLink) send(b []byte) error   { return l.conn.SendMessage(b) }
func (l *quicLink) recv() ([]byte, error) { return l.conn.ReceiveMessage() }
func (l *quicLink) close() {
	l.send([]byte{version, msgClose})
	l.conn.CloseWithError(0, "normal closure")
}

type wsLink struct {
	conn *websocket.Conn
	ctx  context.Context
}

func (l *wsLink) send(b []byte) error { return l.conn.Write(l.ctx, websocket.MessageBinary, b) }

func (l *wsLink) recv() ([]byte, error) {
	_, b, err := l.conn.Read(l.ctx)
	return b, err
}

func (l *wsLink) close() {
	l.send([]byte{version, msgClose})
	l.conn.Close(websocket.StatusNormalClosure, "")
}

func dialLoad(tlsConf *tls.Config, name string) (link, error) {
	var l link
	if *loadTransport == "wss" || *loadTransport == "ws" {
		opts := &websocket.DialOptions{}
		if *loadTransport == "wss" {
			conf := tlsConf.Clone()
			conf.NextProtos = nil
			opts.HTTPClient = &http.Client{Transport: &http.Transport{TLSClientConfig: conf}}
		}
		ctx, cancel := context.WithTimeout(context.Background(), *timeout)
		defer cancel()
		conn, _, err := websocket.Dial(ctx, *loadTransport+"://"+*addr+"/relay", opts)
		if err != nil {
			return nil, err
		}
		conn.SetReadLimit(1 << 16)
		l = &wsLink{conn: conn, ctx: context.Background()}
	} else {
		conn, _, err := dial(tlsConf)
		if err != nil {
			return nil, err
		}
		l = newQuicLink(conn)
	}
	id := peerID(name)
	if err := l.send(append(append(append([]byte{version, msgAuth}, magic...), id...), token(*secret)...)); err != nil {
		l.close()
		return nil, err
	}
	answered := make(chan error, 1)
	go func() {
		for {
			b, err := l.recv()
			if err != nil {
				answered <- err
				return
			}
			if len(b) >= 2 && b[0] == version && b[1] == msgAuthResponse {
				answered <- nil
				return
			}
		}
	}()
	select {
	case err := <-answered:
		if err != nil {
			return nil, err
		}
		return l, nil
	case <-time.After(*timeout):
		l.close()
		return nil, errNoAuthResponse
	}
}

// pair is one sender A and its echo B.
type pair struct {
	index       int
	a, b        link
	aID, bID    []byte
	pattern     []byte
	slots       chan struct{}
	mu          sync.Mutex
	outstanding map[uint64]int64
	rtts        []int64
	sent        uint64
	echoed      uint64
	lost        uint64
	late        uint64
	errors      []string
}

const headerBytes = 16

func (p *pair) payload(seq uint64) []byte {
	b := make([]byte, 2+idSize+*loadSize)
	b[0], b[1] = version, msgTransport
	copy(b[2:], p.bID)
	body := b[2+idSize:]
	binary.BigEndian.PutUint64(body, seq)
	binary.BigEndian.PutUint64(body[8:], uint64(p.index))
	copy(body[headerBytes:], p.pattern[seq%256:])
	return b
}

// check: the Transport carries a payload of this pair, from the expected
// peer; returns its sequence number.
func (p *pair) check(msg, from []byte) (uint64, error) {
	if len(msg) < 2+idSize || msg[0] != version || msg[1] != msgTransport {
		return 0, errors.New("not a Transport")
	}
	if string(msg[2:2+idSize]) != string(from) {
		return 0, errors.New("wrong source id")
	}
	body := msg[2+idSize:]
	if len(body) != *loadSize {
		return 0, fmt.Errorf("payload of %d bytes, not %d", len(body), *loadSize)
	}
	seq := binary.BigEndian.Uint64(body)
	if binary.BigEndian.Uint64(body[8:]) != uint64(p.index) || string(body[headerBytes:]) != string(p.pattern[seq%256:seq%256+uint64(*loadSize-headerBytes)]) {
		return 0, errors.New("payload bytes differ")
	}
	return seq, nil
}

func (p *pair) fail(format string, args ...interface{}) {
	p.mu.Lock()
	if len(p.errors) < 5 {
		p.errors = append(p.errors, fmt.Sprintf("pair %d: ", p.index)+fmt.Sprintf(format, args...))
	}
	p.mu.Unlock()
}

// counters shared by all pairs, read at the marks.
var (
	measuring   int32
	deliveredNo uint64 // messages the relay delivered (at A and at B)
	sentNo      uint64
)

// echo runs B: every Transport from A goes back.
func (p *pair) echo() {
	for {
		msg, err := p.b.recv()
		if err != nil {
			return
		}
		if len(msg) >= 2 && msg[1] == msgHealthCheck {
			p.b.send([]byte{version, msgHealthCheck})
			continue
		}
		if _, err := p.check(msg, p.aID); err != nil {
			p.fail("at B: %v", err)
			continue
		}
		atomic.AddUint64(&deliveredNo, 1)
		copy(msg[2:], p.aID)
		if err := p.b.send(msg); err != nil {
			p.fail("B sending: %v", err)
			return
		}
	}
}

// answers runs A's reader.
func (p *pair) answers() {
	for {
		msg, err := p.a.recv()
		if err != nil {
			return
		}
		now := time.Now().UnixNano()
		if len(msg) >= 2 && msg[1] == msgHealthCheck {
			p.a.send([]byte{version, msgHealthCheck})
			continue
		}
		seq, err := p.check(msg, p.bID)
		if err != nil {
			p.fail("at A: %v", err)
			continue
		}
		atomic.AddUint64(&deliveredNo, 1)
		p.mu.Lock()
		if t, ok := p.outstanding[seq]; ok {
			delete(p.outstanding, seq)
			p.echoed++
			if atomic.LoadInt32(&measuring) == 1 {
				p.rtts = append(p.rtts, now-t)
			}
			<-p.slots
		} else {
			p.late++
		}
		p.mu.Unlock()
	}
}

// writeOff frees the window of messages unanswered for -stall.
func (p *pair) writeOff() {
	limit := time.Now().Add(-*loadStall).UnixNano()
	p.mu.Lock()
	for seq, t := range p.outstanding {
		if t < limit {
			delete(p.outstanding, seq)
			p.lost++
			<-p.slots
		}
	}
	p.mu.Unlock()
}

// run sends until stop is closed.
func (p *pair) run(stop chan struct{}, wg *sync.WaitGroup) {
	defer wg.Done()
	var seq uint64
	wait := time.NewTimer(time.Hour)
	for {
		select {
		case <-stop:
			return
		case p.slots <- struct{}{}:
		default:
			wait.Reset(*loadStall / 4)
			select {
			case <-stop:
				return
			case p.slots <- struct{}{}:
				if !wait.Stop() {
					<-wait.C
				}
			case <-wait.C:
				p.writeOff()
				continue
			}
		}
		msg := p.payload(seq)
		p.mu.Lock()
		p.outstanding[seq] = time.Now().UnixNano()
		p.sent++
		p.mu.Unlock()
		atomic.AddUint64(&sentNo, 1)
		if err := p.a.send(msg); err != nil {
			p.fail("A sending: %v", err)
			return
		}
		seq++
	}
}

func percentile(sorted []int64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q * float64(len(sorted)-1))
	return float64(sorted[i]) / 1e3
}

func runLoad(tlsConf *tls.Config, summary result, fail failer) {
	if *loadSize < headerBytes || (*loadTransport != "quic" && *loadTransport != "wss" && *loadTransport != "ws") || *loadWindow < 1 {
		fatal("load: -size at least %d, -transport quic, wss or ws, -window at least 1", headerBytes)
	}
	pairs := make([]*pair, *loadPairs)
	var wg sync.WaitGroup
	var mu sync.Mutex
	for i := range pairs {
		p := &pair{index: i, slots: make(chan struct{}, *loadWindow), outstanding: map[uint64]int64{}}
		p.aID = peerID(fmt.Sprintf("%s-a-%d", *tag, i))
		p.bID = peerID(fmt.Sprintf("%s-b-%d", *tag, i))
		p.pattern = make([]byte, 256+*loadSize)
		for j := range p.pattern {
			p.pattern[j] = byte(i*131 + j*7)
		}
		pairs[i] = p
		wg.Add(1)
		go func(i int, p *pair) {
			defer wg.Done()
			var err error
			// B first: A's Transports go nowhere until B is online.
			if p.b, err = dialLoad(tlsConf, fmt.Sprintf("%s-b-%d", *tag, i)); err == nil {
				p.a, err = dialLoad(tlsConf, fmt.Sprintf("%s-a-%d", *tag, i))
			}
			if err != nil {
				mu.Lock()
				fail(i, "connecting: %v", err)
				mu.Unlock()
			}
		}(i, p)
	}
	wg.Wait()
	for _, p := range pairs {
		if p.a == nil || p.b == nil {
			summary["pairs_connected"] = 0
			return
		}
	}
	emit(result{"ready": len(pairs)})
	stop := make(chan struct{})
	var senders sync.WaitGroup
	for _, p := range pairs {
		go p.echo()
		go p.answers()
		senders.Add(1)
		go p.run(stop, &senders)
	}
	time.Sleep(*loadWarmup)
	d0, s0, t0 := atomic.LoadUint64(&deliveredNo), atomic.LoadUint64(&sentNo), time.Now()
	atomic.StoreInt32(&measuring, 1)
	emit(result{"mark": "start"})
	time.Sleep(*loadDuration)
	atomic.StoreInt32(&measuring, 0)
	d1, s1, t1 := atomic.LoadUint64(&deliveredNo), atomic.LoadUint64(&sentNo), time.Now()
	emit(result{"mark": "end"})
	close(stop)
	senders.Wait()
	deadline := time.Now().Add(*loadDrain)
	for time.Now().Before(deadline) {
		left := 0
		for _, p := range pairs {
			p.mu.Lock()
			left += len(p.outstanding)
			p.mu.Unlock()
		}
		if left == 0 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	var all []int64
	var sent, echoed, lost, late uint64
	var problems []string
	for _, p := range pairs {
		p.mu.Lock()
		sent += p.sent
		echoed += p.echoed
		lost += p.lost + uint64(len(p.outstanding))
		late += p.late
		all = append(all, p.rtts...)
		problems = append(problems, p.errors...)
		p.mu.Unlock()
	}
	for _, p := range pairs {
		p.a.close()
		p.b.close()
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	dt := t1.Sub(t0).Seconds()
	summary["transport"] = *loadTransport
	summary["pairs"] = len(pairs)
	summary["window"] = *loadWindow
	summary["size"] = *loadSize
	summary["seconds"] = dt
	summary["delivered"] = d1 - d0
	summary["msgs_per_s"] = float64(d1-d0) / dt
	summary["offered_msgs_per_s"] = float64(s1-s0) / dt
	summary["sent"] = sent
	summary["echoed"] = echoed
	summary["lost"] = lost
	summary["late"] = late
	summary["round_trips"] = len(all)
	summary["rtt_p50_us"] = percentile(all, 0.50)
	summary["rtt_p90_us"] = percentile(all, 0.90)
	summary["rtt_p99_us"] = percentile(all, 0.99)
	summary["rtt_max_us"] = percentile(all, 1)
	for _, e := range problems {
		fail(-1, "%s", e)
	}
}
