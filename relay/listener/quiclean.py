"""
The lean path of a QUIC connection: the packet that is nearly all of the
relay's QUIC traffic, a 1-RTT packet carrying DATAGRAM frames (and maybe an
ACK and PADDING), received and built here instead of by aioquic's general
code, on aioquic's own state and keys.

Why: aioquic's C{receive_datagram} and C{datagrams_to_send} handle every
packet type, frame type, path and logger on every packet; for a relay
message they cost about two thirds of the relay's CPU per message (see the
README's performance section). What a DATAGRAM packet needs is a fraction
of that.

How aioquic stays the authority:
  - Receiving: a packet is taken here only if it is a short-header packet
    to the connection's current id, from its validated current address,
    with the current key phase, decrypting with aioquic's 1-RTT keys, not
    a duplicate, holding only DATAGRAM, ACK and PADDING frames that parse.
    Nothing is changed before all of that is known; anything else (key
    update, PING, other frames, migration, a decryption failure, an
    oversized DATAGRAM) is handed to aioquic's C{receive_datagram}
    unchanged, which decrypts it again. A packet taken here gets exactly the
    bookkeeping C{receive_datagram} gives it (expected and largest packet
    number, ACK ranges, duplicate window, ACK timer, idle timer, spin bit),
    and its ACK frames go to aioquic's loss recovery as its ACK handler
    sends them.
  - Sending: packets are built here only while aioquic would put nothing
    but an ACK and DATAGRAM frames in them (L{LeanPath.onlyDatagrams}
    checks every other thing its application-space writer sends); else
    aioquic builds them. A packet built here is what aioquic's packet
    builder makes of the same frames (header, packet number, key phase,
    padding, pacing, congestion window), registered with its loss recovery
    and idle timer as its C{_flush_builder} does, so ACKs, losses, PTO
    probes and key updates that follow are aioquic's own.

Every aioquic internal used here is named, with its reason, in
L{relay.internals.aioquic}, and tested there against the installed version.
"""

import struct

from aioquic.buffer import Buffer, BufferReadError, size_uint_var
from aioquic.quic.connection import QuicConnectionState
from aioquic.quic.packet import QuicPacketType, decode_packet_number, pull_ack_frame, push_ack_frame
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.tls import Epoch

from relay.internals import aioquic as internals

_CONNECTED = QuicConnectionState.CONNECTED
_ONE_RTT = Epoch.ONE_RTT
_ONE_RTT_PACKET = QuicPacketType.ONE_RTT

_PADDING = 0x00
_PING = 0x01
_ACK = 0x02
_ACK_ECN = 0x03
_DATAGRAM_WITH_LENGTH = 0x31

# A short header's first byte: fixed bit set, reserved bits (0x18) clear,
# and the packet number length (2 bytes, as aioquic's builder sends).
_FIXED_BIT = 0x40
_SPIN_BIT = 0x20
_KEY_PHASE_BIT = 0x04
_RESERVED_BITS = 0x18
_PACKET_NUMBER_SIZE = 2
_AEAD_TAG_SIZE = 16
# aioquic pads a packet's payload to 2 bytes so that header protection can
# sample (PACKET_NUMBER_MAX_SIZE - PACKET_NUMBER_SEND_SIZE); a packet built
# here never needs it: a DATAGRAM frame is at least 2 bytes, an ACK frame 5.
# Header protection samples 16 bytes, 4 bytes after the packet number's
# start (RFC 9001 section 5.4.2).
_SAMPLE_SIZE = 16
_PN_MAX_SIZE = 4
# A sent packet's qlog frames: the lean path runs only without a qlog, so
# nothing is ever appended to this one list all its packets share.
_NO_QLOG_FRAMES = []
_DATAGRAM_HEADS = [bytes((_DATAGRAM_WITH_LENGTH, length)) for length in range(0x40)]


class LeanPath:
    """
    The lean receive and send of one established server connection.

    @ivar received: packets taken by L{receive}.
    @ivar messages: DATAGRAM frames in them.
    @ivar handedOver: packets L{receive} left to aioquic.
    @ivar built: packets built by L{transmit}.
    """

    def __init__(self, quic):
        self._quic = quic
        self._pair = internals.cryptoPair(quic, _ONE_RTT)
        self._zeroRtt = internals.cryptoPair(quic, Epoch.ZERO_RTT)
        self._space = internals.packetSpace(quic, _ONE_RTT)
        self._loss = internals.recovery(quic)
        self._cryptoStream = internals.cryptoStream(quic, _ONE_RTT)
        self._limits = internals.connectionLimits(quic)
        self._maxDatagramFrameSize = quic.configuration.max_datagram_frame_size
        self._ackDelayExponent = internals.remoteAckDelayExponent(quic)
        self._localAckDelayExponent = internals.localAckDelayExponent(quic)
        self._ackDelay = internals.ackDelay(quic)
        self._onAckDelivery = internals.ackDeliveryHandler(quic)
        self._onPingDelivery = internals.pingDeliveryHandler(quic)
        # quic._idle_timeout(), and the RTT estimate it was computed from.
        self._idleTimeout = None
        self._idleRtt = None
        self.received = 0
        self.messages = 0
        self.handedOver = 0
        self.built = 0

    # Receiving

    def receive(self, data, addr, now):
        """
        Take one UDP datagram if it is a lean packet.

        @return: the DATAGRAM frames' payloads, in order (maybe none), if the
            packet was taken; None if it must go to aioquic's
            C{receive_datagram} (nothing has been changed then).
        """
        quic = self._quic
        if quic._state is not _CONNECTED or quic._close_pending:
            return self._handOver()
        hostCID = quic.host_cid
        pnOffset = 1 + len(hostCID)
        if data[1:pnOffset] != hostCID or data[0] & 0x80:
            return self._handOver()
        paths = quic._network_paths
        path = paths[0]
        if path.addr != addr or not path.is_validated:
            return self._handOver()
        recv = self._pair.recv
        if recv.aead is None or self._zeroRtt.recv.aead is not None:
            return self._handOver()
        space = self._space
        # aioquic's HeaderProtection.remove without its copy of the whole
        # packet: the mask from its cipher, applied to the header only.
        sample = pnOffset + _PN_MAX_SIZE
        if len(data) < sample + _SAMPLE_SIZE:
            return self._handOver()
        mask = recv.hp._mask(data[sample : sample + _SAMPLE_SIZE])
        first = data[0] ^ (mask[0] & 0x1F)
        if first & _RESERVED_BITS or ((first & _KEY_PHASE_BIT) >> 2) != recv.key_phase:
            return self._handOver()
        pnLength = (first & 0x03) + 1
        if pnLength == _PACKET_NUMBER_SIZE:
            # What quic-go and aioquic send nearly always (0.3 us less than
            # the loop).
            truncated = ((data[pnOffset] ^ mask[1]) << 8) | (data[pnOffset + 1] ^ mask[2])
        else:
            truncated = 0
            for i in range(pnLength):
                truncated = (truncated << 8) | (data[pnOffset + i] ^ mask[1 + i])
        plainHeader = bytes((first,)) + hostCID + truncated.to_bytes(pnLength, "big")
        pn = decode_packet_number(truncated, pnLength * 8, space.expected_packet_number)
        if pn in space.received_packets:
            return self._handOver()
        try:
            payload = recv.aead.decrypt(data[len(plainHeader) :], plainHeader, pn)
        except ValueError:
            return self._handOver()
        frames = self._parse(payload)
        if frames is None:
            return self._handOver()
        datagrams, acks, eliciting = frames
        self.received += 1
        self.messages += len(datagrams)

        # receive_datagram's bookkeeping for a 1-RTT packet, in its order.
        if pn > space.expected_packet_number:
            space.expected_packet_number = pn + 1
        if pn > quic._spin_highest_pn:
            quic._spin_bit = bool(first & _SPIN_BIT)
            quic._spin_highest_pn = pn
        if acks:
            loss = self._loss
            exponent = self._ackDelayExponent
            for rangeset, delay in acks:
                # As aioquic's ACK frame handler does.
                if not loss.peer_completed_address_validation:
                    loss.peer_completed_address_validation = True
                loss.on_ack_received(
                    ack_rangeset=rangeset,
                    ack_delay=(delay << exponent) / 1000000,
                    now=now,
                    space=space,
                )
        quic._close_at = now + self._currentIdleTimeout()
        quic._ack_eliciting_sent_since_receipt = False
        if not space.discarded:
            if pn > space.largest_received_packet:
                space.largest_received_packet = pn
                space.largest_received_time = now
            ackQueue = space.ack_queue
            # RangeSet.add's result for the packet that is nearly always
            # next, without its walk over every range (0.3 us).
            ranges = ackQueue._RangeSet__ranges
            last = ranges[-1] if ranges else None
            if last is None or pn > last.stop:
                ranges.append(range(pn, pn + 1))
            elif pn == last.stop:
                ranges[-1] = range(last.start, pn + 1)
            else:
                ackQueue.add(pn)
            space.received_packets.add(pn)
            if len(ranges) > internals.MAX_ACK_RANGES:
                ackQueue.shift()
            if eliciting and space.ack_at is None:
                space.ack_at = now + self._ackDelay
        return datagrams

    def _currentIdleTimeout(self):
        """
        aioquic's C{_idle_timeout()}, computed again only when the RTT
        estimate has changed (0.4 us of every packet otherwise): it is the
        smaller of the two ends' idle timeouts (both fixed once the
        handshake is done, before the lean path starts) or three probe
        timeouts, which change only with the RTT estimate (C{_rtt_smoothed}
        and C{_rtt_variance}, set together by loss recovery for each RTT
        sample; kept here, the old objects cannot be mistaken for new ones).
        """
        loss = self._loss
        rtt = (loss._rtt_smoothed, loss._rtt_variance)
        cached = self._idleRtt
        if cached is None or rtt[0] is not cached[0] or rtt[1] is not cached[1]:
            self._idleRtt = rtt
            self._idleTimeout = self._quic._idle_timeout()
        return self._idleTimeout

    def _handOver(self):
        self.handedOver += 1
        return None

    def _parse(self, payload):
        """
        The frames of a decrypted payload, if they are only DATAGRAM (with
        a length of at most two bytes), ACK and PADDING frames that parse
        and that aioquic would accept.

        @return: (datagram payloads, [(ACK ranges, encoded delay)], whether
            ack-eliciting), or None.
        """
        datagrams = []
        acks = None
        eliciting = False
        end = len(payload)
        if not end:
            return None
        limit = self._maxDatagramFrameSize
        i = 0
        while i < end:
            kind = payload[i]
            if kind == _DATAGRAM_WITH_LENGTH:
                if i + 1 >= end:
                    return None
                b = payload[i + 1]
                prefix = b >> 6
                if prefix == 0:
                    length = b
                    start = i + 2
                elif prefix == 1:
                    if i + 2 >= end:
                        return None
                    length = ((b & 0x3F) << 8) | payload[i + 2]
                    start = i + 3
                else:
                    return None
                stop = start + length
                # aioquic refuses a frame (after its type) this large.
                if stop > end or stop - i - 1 >= limit:
                    return None
                datagrams.append(payload[start:stop])
                eliciting = True
                i = stop
            elif kind == _PADDING:
                i += 1
                while i < end and not payload[i]:
                    i += 1
            elif kind == _ACK or kind == _ACK_ECN:
                buf = Buffer(data=payload)
                buf.seek(i + 1)
                try:
                    frame = pull_ack_frame(buf)
                    if kind == _ACK_ECN:
                        buf.pull_uint_var()
                        buf.pull_uint_var()
                        buf.pull_uint_var()
                except (BufferReadError, ValueError):
                    return None
                if acks is None:
                    acks = [frame]
                else:
                    acks.append(frame)
                i = buf.tell()
            else:
                return None
        return datagrams, acks, eliciting

    # Sending

    def onlyDatagrams(self):
        """
        Whether aioquic's C{datagrams_to_send} would now write nothing but
        ACK and DATAGRAM frames, in 1-RTT packets on its validated current
        path: each check below is a frame or packet its writer could add.
        """
        quic = self._quic
        if quic._state is not _CONNECTED or quic._close_pending or not quic._handshake_confirmed:
            return False
        if quic._probe_pending or quic._handshake_done_pending or quic._ping_pending:
            return False
        if (
            quic._streams
            or quic._streams_queue
            or quic._retire_connection_ids
            or quic._streams_blocked_pending
        ):
            return False
        paths = quic._network_paths
        path = paths[0]
        if not path.is_validated or path.remote_challenges:
            return False
        # The other paths (a client's former addresses): aioquic sends on
        # one only while it has a challenge to answer or to make.
        for other in paths[1:]:
            if other.remote_challenges or not (other.is_validated or other.local_challenge_sent):
                return False
        for cid in quic._host_cids:
            if not cid.was_sent:
                return False
        if not self._cryptoStream.sender.buffer_is_empty:
            return False
        maxData, maxStreamsBidi, maxStreamsUni = self._limits
        if maxData.used * 2 > maxData.value or maxData.value != maxData.sent:
            return False
        if maxStreamsBidi.value != maxStreamsBidi.sent or maxStreamsUni.value != maxStreamsUni.sent:
            return False
        if self._pair.send.aead is None or quic._quic_logger is not None:
            return False
        return True

    def transmit(self, now):
        """
        Build what aioquic would send now, if it is only ACK and DATAGRAM
        frames.

        @return: the datagrams to send, [(data, addr)], or None if aioquic
            must build them (nothing has been changed then).
        """
        if not self.onlyDatagrams():
            return None
        quic = self._quic
        peerCID = quic._peer_cid.cid
        headerSize = 1 + len(peerCID) + _PACKET_NUMBER_SIZE
        maxSize = quic._max_datagram_size
        # What the builder leaves for frames in an empty packet.
        room = maxSize - headerSize - _AEAD_TAG_SIZE
        if room < internals.ACK_FRAME_CAPACITY + 1:
            return None
        space = self._space
        loss = self._loss
        pacer = loss._pacer
        pending = quic._datagrams_pending
        pair = self._pair
        quic._pacing_at = None
        # The builder's max_flight_bytes, and what its datagrams put in flight.
        maxFlight = loss.congestion_window - loss.bytes_in_flight
        flight = 0
        pn = quic._packet_number
        firstByte = _FIXED_BIT | (quic._spin_bit << 5) | (_PACKET_NUMBER_SIZE - 1)
        header = self._headerFormat(len(peerCID))
        out = []
        packets = []
        stop = False
        while not stop:
            ackAt = space.ack_at
            if ackAt is None or ackAt >= now:
                quic._pacing_at = pacer.next_send_time(now)
                if quic._pacing_at is not None:
                    break
            # The datagram's room in the congestion window, as the builder
            # computes it for each new datagram.
            flightRoom = min(maxSize, maxFlight - flight) - headerSize - _AEAD_TAG_SIZE
            frames = []
            size = 0
            handlers = []
            eliciting = False
            if ackAt is not None and ackAt <= now:
                buf = Buffer(capacity=room)
                buf.push_uint_var(_ACK)
                delay = (
                    int((now - space.largest_received_time) * 1000000)
                    >> self._localAckDelayExponent
                )
                ranges = push_ack_frame(buf, space.ack_queue, delay, room - 1)
                handlers.append((self._onAckDelivery, (space, space.largest_received_packet)))
                space.ack_at = None
                if ranges > 1 and pn % 8 == 0:
                    # aioquic's ACK-of-ACK trigger; a PING that does not fit
                    # in the congestion window ends its writing.
                    if flightRoom - buf.tell() < 1:
                        stop = True
                    else:
                        buf.push_uint_var(_PING)
                        handlers.append((self._onPingDelivery, ((),)))
                        eliciting = True
                frames.append(buf.data)
                size = buf.tell()
            if not stop:
                while pending:
                    data = pending[0]
                    length = len(data)
                    frameSize = 1 + size_uint_var(length) + length
                    # DATAGRAM frames are in flight: the builder checks both.
                    if room - size < frameSize or flightRoom - size < frameSize:
                        break
                    pending.popleft()
                    if length < 0x40:
                        frames.append(_DATAGRAM_HEADS[length])
                    elif length < 0x4000:
                        frames.append((_DATAGRAM_WITH_LENGTH_2 | length).to_bytes(3, "big"))
                    else:
                        frames.append(b"\x31" + _varint(length))
                    frames.append(data)
                    size += frameSize
                    eliciting = True
            if not size:
                break
            inFlight = eliciting
            packet = self._protect(
                header, firstByte | (pair.key_phase << 2), peerCID, pn, b"".join(frames)
            )
            # Positional (half the cost of keywords, 0.2 us): the field
            # order is internals.SENT_PACKET_FIELDS, checked by its tests.
            # sent_time is the now _flush_builder sets.
            sent = QuicSentPacket(
                _ONE_RTT,
                inFlight,
                eliciting,
                False,
                pn,
                _ONE_RTT_PACKET,
                now,
                len(packet),
                handlers,
                _NO_QLOG_FRAMES,
            )
            if inFlight:
                flight += len(packet)
            out.append(packet)
            packets.append(sent)
            pn += 1
            if not stop:
                # (A builder stopped by the PING skips this, as aioquic's does.)
                pacer.update_after_send(now)
        if not out:
            return []
        # aioquic's _flush_builder.
        quic._packet_number = pn
        for sent in packets:
            loss.on_packet_sent(packet=sent, space=space)
            if sent.is_ack_eliciting and not quic._ack_eliciting_sent_since_receipt:
                quic._close_at = now + self._currentIdleTimeout()
                quic._ack_eliciting_sent_since_receipt = True
        self.built += len(out)
        path = quic._network_paths[0]
        addr = path.addr
        total = 0
        result = []
        for packet in out:
            total += len(packet)
            result.append((packet, addr))
        path.bytes_sent += total
        return result

    def _headerFormat(self, cidLength):
        formats = _HEADER_FORMATS
        if cidLength not in formats:
            formats[cidLength] = struct.Struct(f">B{cidLength}sH")
        return formats[cidLength]

    def _protect(self, header, first, cid, pn, payload):
        """
        aioquic's CryptoPair.encrypt_packet for the header the builder
        writes (C{first}, C{cid}, a 2-byte packet number): its AEAD, then
        its header protection mask applied to the header alone (its
        HeaderProtection.apply copies the packet twice more). A key update
        requested is carried out by aioquic's own encrypt_packet.
        """
        pair = self._pair
        plain = header.pack(first, cid, pn & 0xFFFF)
        if pair._update_key_requested:
            return pair.encrypt_packet(plain, payload, pn)
        send = pair.send
        protected = send.aead.encrypt(payload, plain, pn)
        sample = _PN_MAX_SIZE - _PACKET_NUMBER_SIZE
        mask = send.hp._mask(protected[sample : sample + _SAMPLE_SIZE])
        return (
            header.pack(first ^ (mask[0] & 0x1F), cid, (pn & 0xFFFF) ^ ((mask[1] << 8) | mask[2]))
            + protected
        )


# struct formats of short headers by connection id length.
_HEADER_FORMATS = {}
_DATAGRAM_WITH_LENGTH_2 = (_DATAGRAM_WITH_LENGTH << 16) | 0x4000


def _varint(value):
    buf = Buffer(capacity=8)
    buf.push_uint_var(value)
    return buf.data
