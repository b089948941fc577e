"""A real WebRTC call (aiortc, unmodified) between two lab namespaces, measured.

Why: mptun is built for live media, and the honest test of that is a real
WebRTC stack on both ends: ICE, DTLS-SRTP, RTP/RTCP with its own NACK/RTX and
jitter buffers, sending audio and video through whatever the routing gives it.
Nothing in aiortc is patched or configured towards the tunnel: the peers only
get host candidates (no STUN/TURN servers), and routing alone decides whether
the media crosses mptun or a raw link.

Pieces:

- ``python -m tunnel.lab.webrtc peer ...``: one peer, run inside a namespace
  (``Host.popen``).  Offer/answer go through files in a shared directory (the
  signalling is not the point).  It sends synthetic audio (a tone, Opus) and
  video (noise frames, VP8: incompressible, so the encoder fills full-size RTP
  packets), runs for ``--seconds`` after the connection is up, and writes a
  JSON result: getStats ``inbound-rtp``, the frames its receiving tracks
  decoded (and the longest pause between two decoded frames) and, from an
  AF_PACKET capture on ``--iface`` with kernel timestamps, every RTP packet
  it received (per SSRC: loss from sequence numbers, longest gap, RFC 3550
  jitter, largest IP packet, TOS bytes, IP fragments).
- ``python -m tunnel.lab.webrtc outer IFACE PORT OUT``: a capture of the
  tunnel's outer UDP datagrams (length, TOS, fragment bits) until SIGTERM.
- :func:`run_call`: runs a whole call between two hosts and returns both
  results; :class:`CallLab`: the multipath topology plus a namespace "far"
  behind the server, with the switches the test and the bench need (direct
  route, tunnel up with a mode or policy, impairments).

App layer only (lab), like the rest of :mod:`tunnel.lab`.
"""
from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from tunnel.lab.stream import covered

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
WARMUP_S = 1.0  # gaps are measured from this long after the connection is up
EVENT_WINDOW_S = 1.0  # event_gap_ms: the gaps this close after the event (a cut: detection is 0.3 s)


# --------------------------------------------------------------------------
# Capture (AF_PACKET, kernel receive timestamps)
# --------------------------------------------------------------------------

def _open_capture(iface: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))  # no link header
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.bind((iface, ETH_P_ALL))
    s.settimeout(0.2)
    return s


def _recv(s: socket.socket) -> Optional[tuple[bytes, int, float]]:
    """(packet, pkttype, kernel receive time) or None on timeout."""
    try:
        pkt, anc, _flags, addr = s.recvmsg(65535, 64)
    except socket.timeout:
        return None
    t = time.time()
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = struct.unpack_from("qq", data)
            t = sec + nsec * 1e-9
    return pkt, addr[2], t


def _udp(pkt: bytes) -> Optional[tuple[int, int, int, int, int, int]]:
    """(ip_len, tos, frag bits, src port, dst port, payload offset) of an IPv4 packet, else None.

    ``frag bits`` is the MF flag and fragment offset (0 for an unfragmented packet).
    """
    if len(pkt) < 20 or pkt[0] >> 4 != 4:
        return None
    ihl = (pkt[0] & 0x0F) * 4
    frag = int.from_bytes(pkt[6:8], "big") & 0x3FFF
    if pkt[9] != 17 or len(pkt) < ihl + 8:
        return (int.from_bytes(pkt[2:4], "big"), pkt[1], frag, -1, -1, -1)
    sport, dport = struct.unpack_from("!HH", pkt, ihl)
    return int.from_bytes(pkt[2:4], "big"), pkt[1], frag, sport, dport, ihl + 8


class RtpCapture(threading.Thread):
    """Every RTP packet received on ``iface``: [t, ssrc, seq, rtp_ts, pt, ip_len, tos].

    Those sent out through ``iface`` go to ``sent`` in the same form, so a
    gap at the receiver can be told apart from one the (CPU-starved) sender made.

    RTP is told from STUN, DTLS and RTCP (all on the same ports with
    rtcp-mux) by its first two bytes (RFC 7983 and RFC 5761: version 2,
    payload type outside 64-95).  SRTP leaves the RTP header in the clear.
    """

    def __init__(self, iface: str) -> None:
        super().__init__(daemon=True, name="rtp-capture")
        self.sock = _open_capture(iface)
        self.packets: list[list] = []
        self.sent: list[list] = []
        self.fragments = 0  # received IPv4 packets with MF set or a fragment offset
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            got = _recv(self.sock)
            if got is None:
                continue
            pkt, pkttype, t = got
            head = _udp(pkt)
            if head is None:
                continue
            ip_len, tos, frag, _sport, _dport, off = head
            if frag and pkttype != PACKET_OUTGOING:
                self.fragments += 1
            if off < 0 or frag or len(pkt) < off + 12:
                continue
            b0, b1 = pkt[off], pkt[off + 1]
            if b0 >> 6 != 2 or 64 <= (b1 & 0x7F) <= 95:
                continue
            seq, ts, ssrc = struct.unpack_from("!HII", pkt, off + 2)
            (self.sent if pkttype == PACKET_OUTGOING else self.packets).append([t, ssrc, seq, ts, b1 & 0x7F, ip_len, tos])

    def stop(self) -> None:
        self.stopping.set()
        self.join(2)
        self.sock.close()


SOL_PACKET = getattr(socket, "SOL_PACKET", 263)
PACKET_VNET_HDR = 15
ETH_HEADER = 14
_VNET_HDR = struct.Struct("<BBHHHH")  # struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_*


def outer_capture(iface: str, port: int, out: str) -> None:
    """Outer datagrams to/from ``port`` on ``iface`` until SIGTERM.

    Writes [ip_len, tos, frag bits, datagrams, largest datagram] per packet
    seen.  mptun sends batches with UDP GSO, and a capture on the sending
    side sees such a batch as one packet: with ``PACKET_VNET_HDR`` the kernel
    tells its segment size, so ``datagrams`` and ``largest datagram`` (IP
    length) are those that go on the wire (the kernel allows the header only
    on SOCK_RAW sockets, so ``iface`` must be an Ethernet-like one, e.g. a
    veth).  IPv4 fragments of any protocol are kept too (a non-first fragment
    has no UDP header to match the port).
    """
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    s.bind((iface, ETH_P_ALL))
    s.settimeout(0.2)
    seen: list[list[int]] = []
    Path(out + ".ready").touch()
    while not stop.is_set():
        try:
            raw = s.recv(65535 + _VNET_HDR.size)
        except socket.timeout:
            continue
        if len(raw) < _VNET_HDR.size + ETH_HEADER or raw[_VNET_HDR.size + 12:_VNET_HDR.size + 14] != b"\x08\x00":
            continue  # not IPv4
        gso_size = _VNET_HDR.unpack_from(raw)[3]
        pkt = raw[_VNET_HDR.size + ETH_HEADER:]
        head = _udp(pkt)
        if head is None:
            continue
        ip_len, tos, frag, sport, dport, off = head
        if frag or port in (sport, dport):
            payload = ip_len - off if off > 0 else ip_len
            if gso_size and payload > gso_size:
                seen.append([ip_len, tos, frag, -(-payload // gso_size), gso_size + off])
            else:
                seen.append([ip_len, tos, frag, 1, ip_len])
    tmp = out + ".tmp"
    Path(tmp).write_text(json.dumps(seen))
    os.replace(tmp, out)


# --------------------------------------------------------------------------
# Figures from a capture
# --------------------------------------------------------------------------

def stream_figures(packets: Sequence[Sequence], clock_rate: int, start: float, end: float) -> dict:
    """Loss, longest gap and jitter of one SSRC's captured packets.

    Loss counts unique sequence numbers against the range seen (as RFC 3550's
    cumulative loss); duplicates are counted apart.  The longest gap is taken
    between consecutive arrivals in [start, end].  Jitter is RFC 3550's
    interarrival jitter from the kernel timestamps, in ms.
    """
    if not packets:
        return {"received": 0, "expected": 0, "lost": 0, "duplicates": 0, "loss_pct": 100.0,
                "gap_ms": (end - start) * 1e3, "jitter_ms": 0.0, "max_ip_len": 0, "tos": []}
    ext: list[int] = []
    last = None
    cycles = 0
    for p in packets:  # extend 16-bit sequence numbers
        seq = p[2]
        if last is not None and seq < last and last - seq > 0x8000:
            cycles += 0x10000
        elif last is not None and seq > last and seq - last > 0x8000:
            ext.append(seq + cycles - 0x10000)
            continue
        last = seq
        ext.append(seq + cycles)
    unique = set(ext)
    expected = max(unique) - min(unique) + 1
    lost = expected - len(unique)
    times = [p[0] for p in packets if start <= p[0] <= end]
    gap = max((b - a for a, b in zip(times, times[1:])), default=(end - start))
    if times:
        gap = max(gap, times[0] - start, end - times[-1])
    jitter = 0.0
    prev = None
    for p in packets:
        if prev is not None and p[3] != prev[3]:
            d_ts = ((p[3] - prev[3] + 0x80000000) & 0xFFFFFFFF) - 0x80000000  # signed 32-bit difference
            d = abs((p[0] - prev[0]) - d_ts / clock_rate)
            jitter += (d - jitter) / 16
        prev = p
    return {
        "received": len(packets), "expected": expected, "lost": lost,
        "duplicates": len(ext) - len(unique), "loss_pct": 100.0 * lost / expected,
        "gap_ms": gap * 1e3, "jitter_ms": jitter * 1e3,
        "max_ip_len": max(p[5] for p in packets), "tos": sorted({p[6] for p in packets}),
    }


def _sdp_ssrcs(sdp: str) -> dict[int, dict]:
    """SSRC -> {"kind", "rtx"} from the a=ssrc / a=ssrc-group:FID lines of an SDP."""
    out: dict[int, dict] = {}
    kind = None
    for line in sdp.splitlines():
        if line.startswith("m="):
            kind = line[2:].split(" ", 1)[0]
        elif line.startswith("a=ssrc-group:FID ") and kind:
            primary, *rtx = (int(x) for x in line.split()[1:])
            out.setdefault(primary, {"kind": kind, "rtx": False})
            for r in rtx:
                out[r] = {"kind": kind, "rtx": True}
        elif line.startswith("a=ssrc:") and kind:
            ssrc = int(line[7:].split(" ", 1)[0])
            out.setdefault(ssrc, {"kind": kind, "rtx": False})
    return out


# --------------------------------------------------------------------------
# The peer (runs inside a namespace)
# --------------------------------------------------------------------------

def _tracks():
    """A 440 Hz tone (48 kHz, 20 ms frames) and 320x240 noise video at 30 frames/s."""
    import av
    from aiortc.mediastreams import AUDIO_PTIME, AudioStreamTrack, VideoStreamTrack

    class ToneTrack(AudioStreamTrack):
        rate = 48000

        def __init__(self) -> None:
            super().__init__()
            n = int(AUDIO_PTIME * self.rate)
            self._samples = n
            self._pcm = struct.pack(f"<{n}h", *(int(8000 * math.sin(2 * math.pi * 440 * i / self.rate))
                                                for i in range(n)))  # 440 Hz: whole periods per frame

        async def recv(self):
            if hasattr(self, "_timestamp"):
                self._timestamp += self._samples
                await asyncio.sleep(self._start + self._timestamp / self.rate - time.time())
            else:
                self._start, self._timestamp = time.time(), 0
            frame = av.AudioFrame(format="s16", layout="mono", samples=self._samples)
            frame.planes[0].update(self._pcm)
            frame.pts, frame.sample_rate = self._timestamp, self.rate
            frame.time_base = fractions.Fraction(1, self.rate)
            return frame

    class NoiseTrack(VideoStreamTrack):
        """Grey 320x240 frames with a fresh 96x64 patch of noise each: incompressible
        enough for frames of several full-size RTP packets, cheap enough to encode."""

        def __init__(self, width: int = 320, height: int = 240, patch: tuple[int, int] = (96, 64)) -> None:
            super().__init__()
            self._size = (width, height)
            self._patch = patch
            self._noise = [os.urandom(patch[0] * patch[1]) for _ in range(8)]
            self._n = 0

        async def recv(self):
            pts, time_base = await self.next_timestamp()
            width, height = self._size
            frame = av.VideoFrame(width, height, "yuv420p")
            luma = bytearray(b"\x80" * frame.planes[0].buffer_size)
            noise = self._noise[self._n % len(self._noise)]
            self._n += 1
            pw, ph = self._patch
            stride = frame.planes[0].line_size
            for row in range(ph):
                luma[row * stride:row * stride + pw] = noise[row * pw:(row + 1) * pw]
            frame.planes[0].update(bytes(luma))
            for plane in frame.planes[1:]:
                plane.update(b"\x80" * plane.buffer_size)
            frame.pts, frame.time_base = pts, time_base
            return frame

    return ToneTrack(), NoiseTrack()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


async def _wait_file(path: Path, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path.name} within {timeout:g} s")
        await asyncio.sleep(0.05)
    return json.loads(path.read_text())


async def _peer(role: str, workdir: Path, seconds: float, iface: Optional[str], timeout: float) -> dict:
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    capture = RtpCapture(iface) if iface else None
    if capture:
        capture.start()
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # host candidates only
    audio, video = _tracks()
    pc.addTrack(audio)
    pc.addTrack(video)
    frames: dict[str, list[float]] = {"audio": [], "video": []}
    tasks = []

    @pc.on("track")
    def on_track(track) -> None:
        async def consume() -> None:
            stamps = frames[track.kind]
            try:
                while True:
                    await track.recv()
                    stamps.append(time.monotonic())
            except MediaStreamError:
                pass
        tasks.append(asyncio.ensure_future(consume()))

    if role == "offer":
        await pc.setLocalDescription(await pc.createOffer())  # returns once gathering is complete
        _write_json(workdir / "offer.json", {"sdp": pc.localDescription.sdp, "type": "offer"})
        answer = await _wait_file(workdir / "answer.json", timeout)
        await pc.setRemoteDescription(RTCSessionDescription(**answer))
    else:
        offer = await _wait_file(workdir / "offer.json", timeout)
        await pc.setRemoteDescription(RTCSessionDescription(**offer))
        await pc.setLocalDescription(await pc.createAnswer())
        _write_json(workdir / "answer.json", {"sdp": pc.localDescription.sdp, "type": "answer"})
    deadline = time.monotonic() + timeout
    while pc.connectionState != "connected":
        if pc.connectionState in ("failed", "closed") or time.monotonic() > deadline:
            raise RuntimeError(f"{role}: connection {pc.connectionState}")
        await asyncio.sleep(0.02)
    connected = time.monotonic()
    _write_json(workdir / f"{role}.connected", {"monotonic": connected, "time": time.time()})
    start_wall = time.time()
    lag = asyncio.ensure_future(_loop_lag(connected + WARMUP_S, connected + seconds))
    await asyncio.sleep(seconds)
    end_wall = time.time()
    end = time.monotonic()
    loop_lag_ms = await lag

    inbound, outbound = [], []
    for transceiver in pc.getTransceivers():
        for obj in (transceiver.receiver, transceiver.sender):
            for s in (await obj.getStats()).values():
                if s.type == "inbound-rtp":
                    inbound.append({"kind": s.kind, "ssrc": s.ssrc, "packetsReceived": s.packetsReceived,
                                    "packetsLost": s.packetsLost, "jitter": s.jitter})
                elif s.type == "outbound-rtp":
                    outbound.append({"kind": s.kind, "ssrc": s.ssrc, "packetsSent": s.packetsSent})
    remote_sdp, local_sdp = pc.remoteDescription.sdp, pc.localDescription.sdp
    if capture:
        capture.stop()
    await pc.close()
    for task in tasks:
        task.cancel()

    ssrcs = _sdp_ssrcs(remote_sdp)
    rtp: dict[str, dict] = {}
    if capture:
        by_ssrc: dict[int, list] = {}
        for p in capture.packets:
            by_ssrc.setdefault(p[1], []).append(p)
        for ssrc, pkts in by_ssrc.items():
            info = ssrcs.get(ssrc, {"kind": "?", "rtx": False})
            rate = 48000 if info["kind"] == "audio" else 90000
            fig = stream_figures(pkts, rate, start_wall + WARMUP_S, end_wall)
            rtp[str(ssrc)] = {**info, "pt": pkts[0][4], **fig}
    sent: dict[str, dict] = {}
    if capture:
        for ssrc, info in _sdp_ssrcs(local_sdp).items():
            pkts = [p for p in capture.sent if p[1] == ssrc]
            times = [p[0] for p in pkts if start_wall + WARMUP_S <= p[0] <= end_wall]
            sent[str(ssrc)] = {**info, "sent": len(pkts),
                               "gap_ms": _all_gap([[t] for t in times], start_wall + WARMUP_S, end_wall)}
    decoded = {}
    for kind, stamps in frames.items():
        # from the start of the window to its end: frames that stop coming are a pause too
        inside = [connected + WARMUP_S] + [t for t in stamps if connected + WARMUP_S <= t <= end] + [end]
        pause = max(b - a for a, b in zip(inside, inside[1:]))
        decoded[kind] = {"frames": len(stamps), "longest_pause_ms": pause * 1e3}
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "role": role, "seconds": seconds, "connected": connected,
        "cpu_s": usage.ru_utime + usage.ru_stime, "loop_lag_ms": loop_lag_ms,
        "inbound": inbound, "outbound": outbound, "decoded": decoded, "rtp": rtp, "sent": sent,
        "window": [start_wall + WARMUP_S, end_wall],
        "rx": [p[:3] for p in capture.packets] if capture else [], "tx": [p[:4] for p in capture.sent] if capture else [],
        "fragments": capture.fragments if capture else None,
        "all_rtp_gap_ms": _all_gap(capture.packets, start_wall + WARMUP_S, end_wall) if capture else None,
    }


async def _loop_lag(start: float, end: float, tick: float = 0.01) -> float:
    """The longest a 10 ms timer of this event loop fired late between ``start`` and ``end``, in ms:
    how long the app (aiortc's RTP handling, jitter buffers, track consumers) was not scheduled."""
    worst = 0.0
    while (now := time.monotonic()) < end:
        await asyncio.sleep(tick)
        late = time.monotonic() - now - tick
        if now >= start:
            worst = max(worst, late)
    return worst * 1e3


def _all_gap(packets: list[list], start: float, end: float) -> float:
    times = sorted(p[0] for p in packets if start <= p[0] <= end)
    if not times:
        return (end - start) * 1e3
    return 1e3 * max([b - a for a, b in zip(times, times[1:])] + [times[0] - start, end - times[-1]])


def peer_main(args: argparse.Namespace) -> int:
    workdir = Path(args.dir)
    try:
        result = asyncio.run(_peer(args.role, workdir, args.seconds, args.iface, args.timeout))
    except Exception as exc:  # reported to the harness in the result file, not as a traceback
        result = {"role": args.role, "error": f"{type(exc).__name__}: {exc}"}
    _write_json(workdir / f"{args.role}.result.json", result)
    return 0 if "error" not in result else 1


# --------------------------------------------------------------------------
# Harness (root namespace)
# --------------------------------------------------------------------------

def peer_argv(role: str, workdir: Path, seconds: float, iface: Optional[str], timeout: float = 30.0) -> list[str]:
    argv = [sys.executable, "-X", "faulthandler", "-m", "tunnel.lab.webrtc", "peer", role, str(workdir), "--seconds", str(seconds),
            "--timeout", str(timeout)]
    return argv + (["--iface", iface] if iface else [])


def run_call(offer_host, offer_iface: Optional[str], answer_host, answer_iface: Optional[str], workdir: Path,
             seconds: float, during: Optional[Callable[[float], Optional[float]]] = None, timeout: float = 30.0) -> dict:
    """One call: the offerer in ``offer_host``, the answerer in ``answer_host``.

    Each side captures the RTP it receives on its ``*_iface``.  ``during(t0)``
    is called once both sides are connected (``t0``: the later connection
    time, ``time.monotonic()``, shared by all namespaces); it may impair the
    paths on a schedule, and may return the ``time.monotonic()`` of the event
    that matters (a cut), kept as ``"event_wall"`` in wall-clock seconds.
    Returns ``{"offer": result, "answer": result}`` (and ``"event_wall"``).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("offer.json", "answer.json", "offer.connected", "answer.connected",
                 "offer.result.json", "answer.result.json"):
        (workdir / name).unlink(missing_ok=True)
    logs = []
    procs = []
    for role, host, iface in (("answer", answer_host, answer_iface), ("offer", offer_host, offer_iface)):
        log = open(workdir / f"{role}.log", "ab")
        logs.append(log)
        procs.append(host.popen(peer_argv(role, workdir, seconds, iface, timeout),
                                stdout=subprocess.DEVNULL, stderr=log))
    try:
        from tunnel.lab.netns import wait_for

        def connected() -> Optional[list[float]]:
            if any(p.poll() is not None for p in procs):
                codes = ", ".join(f"{r} {p.returncode}" for r, p in zip(("answer", "offer"), procs))
                raise RuntimeError(_failure(workdir, f"a peer exited before connecting (exit codes: {codes})"))
            files = [workdir / f"{r}.connected" for r in ("offer", "answer")]
            return [json.loads(f.read_text())["monotonic"] for f in files] if all(f.exists() for f in files) else None

        t0 = max(wait_for(connected, timeout + 10, message="WebRTC peers did not connect"))
        event = during(t0) if during else None
        for p in procs:
            p.wait(timeout=max(1.0, t0 + seconds - time.monotonic()) + 30)
        results = {}
        for role in ("offer", "answer"):
            path = workdir / f"{role}.result.json"
            if not path.exists():
                raise RuntimeError(_failure(workdir, f"{role} wrote no result"))
            results[role] = json.loads(path.read_text())
            if "error" in results[role]:
                raise RuntimeError(_failure(workdir, f"{role}: {results[role]['error']}"))
        if event is not None:
            results["event_wall"] = event + time.time() - time.monotonic()
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(5)
        for log in logs:
            log.close()


def _failure(workdir: Path, what: str) -> str:
    tails = []
    for role in ("offer", "answer"):
        result = workdir / f"{role}.result.json"
        if result.exists():
            tails.append(f"{role}: {json.loads(result.read_text()).get('error', 'no error')}")
        log = workdir / f"{role}.log"
        if log.exists():
            tails.append(f"{role} log:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    return what + "\n" + "\n".join(tails)


def summary(result: dict, sender: Optional[dict] = None, stalls: Sequence[Sequence] = (),
            event: Optional[float] = None) -> dict:
    """The figures of one receiving side: per kind, from getStats and from the capture.

    ``loss_pct`` (getStats packetsLost / (received + lost)), ``jitter_ms``
    (getStats jitter over the clock rate), ``frames`` decoded and the longest
    pause between decoded frames; from the capture of the primary (non-RTX)
    stream: ``rtp_loss_pct``, ``gap_ms``, ``max_ip_len``; RTX packets received.
    With the ``sender``'s result: ``sent`` (its capture of the same stream
    leaving) and ``sender_gap_ms``, the longest pause in its sending;
    ``net_gap_ms`` (:func:`net_gap_ms`) and ``tunnel_gap_ms``, the same less the
    time a tunnel process was not run (``stalls``, see :meth:`CallLab.tunnel_stalls`);
    with an ``event`` (wall seconds, e.g. a cut), ``event_gap_ms``: the
    ``tunnel_gap_ms`` of the gaps within :data:`EVENT_WINDOW_S` after it.
    """
    out: dict[str, Any] = {"all_rtp_gap_ms": result.get("all_rtp_gap_ms"), "fragments": result.get("fragments"),
                           "loop_lag_ms": result.get("loop_lag_ms"), "cpu_s": result.get("cpu_s")}
    rates = {"audio": 48000, "video": 90000}
    for kind in ("audio", "video"):
        primary = [v for v in result["rtp"].values() if v["kind"] == kind and not v["rtx"]]
        rtx = [v for v in result["rtp"].values() if v["kind"] == kind and v["rtx"]]
        primary_ssrcs = {int(k) for k, v in result["rtp"].items() if v["kind"] == kind and not v["rtx"]}
        stats = [s for s in result["inbound"] if s["kind"] == kind]
        # aiortc files every SSRC of a receiver under one stats id, so an RTX stream can
        # replace the primary one in getStats: prefer the entry of the primary SSRC.
        chosen = [s for s in stats if s["ssrc"] in primary_ssrcs] or stats
        fig: dict[str, Any] = {}
        if chosen:
            s = chosen[0]
            total = s["packetsReceived"] + max(0, s["packetsLost"])
            fig.update(stats_ssrc=s["ssrc"], packets_received=s["packetsReceived"], packets_lost=s["packetsLost"],
                       loss_pct=100.0 * max(0, s["packetsLost"]) / total if total else 100.0,
                       jitter_ms=1e3 * s["jitter"] / rates[kind])
        if primary:
            p = primary[0]
            fig.update(rtp_received=p["received"], rtp_lost=p["lost"], rtp_loss_pct=p["loss_pct"], gap_ms=p["gap_ms"],
                       capture_jitter_ms=p["jitter_ms"], max_ip_len=p["max_ip_len"], tos=p["tos"])
        fig["rtx_received"] = sum(v["received"] for v in rtx)
        if sender is not None:
            mine = [(int(k), v) for k, v in sender.get("sent", {}).items() if v["kind"] == kind and not v["rtx"]]
            if mine:
                ssrc, v = mine[0]
                fig.update(sent=v["sent"], sender_gap_ms=v["gap_ms"],
                           frames_sent=len({p[3] for p in sender["tx"] if p[1] == ssrc}),
                           net_gap_ms=net_gap_ms(result, sender, ssrc, 20.0 if kind == "audio" else 1e3 / 30),
                           tunnel_gap_ms=net_gap_ms(result, sender, ssrc, 20.0 if kind == "audio" else 1e3 / 30,
                                                    stalls))
                if event is not None:
                    fig["event_gap_ms"] = net_gap_ms(result, sender, ssrc, 20.0 if kind == "audio" else 1e3 / 30,
                                                     stalls, near=(event, event + EVENT_WINDOW_S))
        d = result["decoded"][kind]
        fig.update(frames=d["frames"], longest_pause_ms=d["longest_pause_ms"])
        out[kind] = fig
    return out


def net_gap_ms(receiver: dict, sender: dict, ssrc: int, interval_ms: float, stalls: Sequence[Sequence] = (),
               near: Optional[tuple[float, float]] = None) -> float:
    """The longest gap in arrivals of ``ssrc`` that the sender did not make itself, in ms.

    Both captures stamp packets with the kernel's clock, so they compare.
    For consecutive arrivals a, b: (arrival b - arrival a) minus how much
    longer than ``interval_ms`` the sender waited after a before sending
    its next packet.  A pause of a CPU-starved sender thus does not count;
    lost packets and added delay do.  With ``stalls`` ([start, end, ...] wall
    seconds) the time in them is not counted either: packets wait while the
    OS does not run a tunnel process, whatever the tunnel does.  With
    ``near`` (wall seconds) only gaps that overlap that window count.
    """
    held = [(start, end) for start, end, *_ in stalls]
    lo, hi = near if near is not None else (-math.inf, math.inf)
    start, end = receiver["window"]
    sent: dict[int, float] = {}
    order: list[int] = []
    for t, s, seq, _ts in sender["tx"]:
        if s == ssrc and seq not in sent:
            sent[seq] = t
            order.append(seq)
    following = {a: sent[b] - sent[a] for a, b in zip(order, order[1:])}
    arrivals = []
    seen = set()
    for t, s, seq in receiver["rx"]:
        if s == ssrc and seq not in seen and start <= t <= end:
            seen.add(seq)
            arrivals.append((t, seq))
    if len(arrivals) < 2:
        return (end - start) * 1e3
    worst = 0.0
    for (ta, a), (tb, _b) in zip(arrivals, arrivals[1:]):
        if tb < lo or ta > hi:
            continue
        pause = max(0.0, following.get(a, 0.0) * 1e3 - interval_ms)
        worst = max(worst, (tb - ta - covered(held, ta, tb)) * 1e3 - pause)
    t_last, last = arrivals[-1]
    if t_last <= hi and last in sent and any(t > sent[last] for t in sent.values() if t <= end):
        # sent after the last arrival, never arrived
        worst = max(worst, (end - t_last - covered(held, t_last, end)) * 1e3)
    return worst


def call_summary(call: dict) -> dict:
    """:func:`summary` of both receivers of a :func:`run_call` result, each with its sender."""
    stalls, event = call.get("tunnel_stalls", []), call.get("event_wall")
    out = {"offer": summary(call["offer"], call["answer"], stalls, event),
           "answer": summary(call["answer"], call["offer"], stalls, event), "tunnel_stalls": stalls}
    if "outer" in call:
        out["outer"] = call["outer"]
    return out


def tunnel_stalled_ms(fig: dict) -> float:
    """The longest stall of a tunnel process during a :func:`call_summary`'s call, in ms."""
    return max((1e3 * (end - start) for start, end, _who in fig.get("tunnel_stalls", [])), default=0.0)


def starved(fig: dict, seconds: float, max_lag_ms: float = 50.0, max_stall_ms: float = 50.0) -> Optional[str]:
    """Why a call's app-level figures (getStats, decoded frames) say more about the machine
    than about the network, or None.

    On a shared, overloaded machine the Python peers fall behind: the sender
    sends late or in bursts, the receiving app is not scheduled for a while and
    drops datagrams at its socket (getStats counts them as lost) or shows a
    frame late.  The capture figures (kernel timestamps; ``rtp_loss_pct``,
    ``net_gap_ms``) do not depend on that.  App figures are judged only if
    both audio senders sent 90 % of their packets, both receiving apps took
    all the audio that reached their interface, neither event loop was
    late by more than ``max_lag_ms`` and no mptun process went unrun for
    ``max_stall_ms`` (its packets waited that long: a frame comes late).
    """
    for role in ("offer", "answer"):
        a = fig[role]["audio"]
        if a.get("sent", 0) < 0.9 * 50 * seconds:
            return f"{role}: its audio sender sent {a.get('sent')} packets in {seconds:g} s"
        if a.get("packets_received", 0) < a.get("rtp_received", 0) - 2:
            return f"{role}: the app got {a.get('packets_received')} of {a.get('rtp_received')} audio packets"
        if (fig[role].get("loop_lag_ms") or 0) > max_lag_ms:
            return f"{role}: its event loop was {fig[role]['loop_lag_ms']:.0f} ms late"
    for start, end, who in fig.get("tunnel_stalls", []):
        if end - start >= max_stall_ms / 1e3:
            return f"the tunnel's {who} was not run for {1e3 * (end - start):.0f} ms"
    return None


def judged_call(cl: "CallLab", seconds: float, via: str, during: Optional[Callable[[float], Optional[float]]] = None,
                reset: Optional[Callable[[], None]] = None, outer: bool = False,
                attempts: int = 3) -> tuple[dict, Optional[str]]:
    """A call's :func:`call_summary`, and why its app-level figures cannot be judged (None if they can).

    The capture figures (loss and gaps at the interfaces, kernel timestamps)
    hold on a loaded machine; getStats and decoded frames do not when a peer
    is not scheduled (:func:`starved`).  Up to ``attempts`` calls are made to
    get one the machine kept up with; ``reset`` undoes ``during`` between them.
    """
    why: Optional[str] = None
    fig: dict = {}
    for attempt in range(attempts):
        if attempt and reset:
            reset()
        try:
            fig = call_summary(cl.call(seconds, via, during=during, outer=outer))
        except RuntimeError as exc:  # e.g. ICE or DTLS gave up over a lossy raw link
            if attempt == attempts - 1:
                raise
            print(f"webrtc: {via} call {attempt + 1} failed, trying again: {exc}", file=sys.stderr)
            continue
        why = starved(fig, seconds)
        if why is None:
            return fig, None
        print(f"webrtc: {via} call {attempt + 1}: app figures not judged: {why}", file=sys.stderr)
    return fig, why


def repaired(video: dict) -> bool:
    """Did retransmissions (RTX) arrive for at least as many video packets as the wire lost?

    aiortc NACKs a missing packet once; if that NACK or its RTX is lost too,
    the packet is never repaired and aiortc's video jitter buffer (512
    packets) holds every later frame until it overflows: a freeze of several
    seconds that says nothing more about the network than one lost packet.
    """
    return video.get("rtx_received", 0) >= video.get("rtp_lost", 0)


def freeze_threshold_ms(frames: int, seconds: float) -> float:
    """WebRTC's freeze: a pause longer than max(3 x the mean frame interval, mean + 150 ms)."""
    mean = 1e3 * seconds / max(1, frames)
    return max(3 * mean, mean + 150)


# --------------------------------------------------------------------------
# The lab: multipath topology + "far" behind the server
# --------------------------------------------------------------------------

FAR_SUBNET = "198.18.251.0/30"  # server .1, far .2


class CallLab:
    """``MultipathTopology`` with one more namespace ``far`` behind the server.

    ``far`` (198.18.251.2) hangs off the server (198.18.251.1, forwarding on)
    and routes everything via the server.  The router has **no** route to
    ``far``: like a LAN behind a VPN server, it is reachable from the client
    only through the tunnel (the server pushes the route) unless
    :meth:`direct` opens the raw way for a comparison call.
    """

    def __init__(self, lab, n_paths: int = 2, workdir: Optional[Path] = None) -> None:
        import tempfile

        from tunnel.lab.impair import Impairments
        from tunnel.lab.topology import MultipathTopology

        self.lab = lab
        self.topo = MultipathTopology(lab, n_paths=n_paths)
        self.client, self.router, self.server = self.topo.client, self.topo.router, self.topo.server
        self.far = lab.add_host("far")
        link = lab.link(self.server, self.far, FAR_SUBNET)
        self.far_ifname, self.far_addr = link.b_ifname, link.b_addr
        self.server_far_addr = link.a_addr
        self.server.sysctl("net.ipv4.ip_forward", 1)
        self.far.add_route("default", self.server_far_addr)
        # aiortc binds its ICE sockets to port 0 and marks nothing, like a browser: the shipped
        # policy (policies/webrtc.toml, class media-unmarked) recognises its RTP by the payload.
        self.imp = Impairments(self.topo)
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="mptun-webrtc-"))
        self.stack = None
        self._calls = 0

    def close(self) -> None:
        self.stop_tunnel()
        self.imp.clear()

    def direct(self, on: bool, path: int = 0) -> None:
        """Open (or close) the raw way client -> path ``path`` -> router -> server -> far.

        The router gets a route to ``far``; the client's other paths are made
        unreachable for ``far`` so ICE can only pair the candidate of ``path``.
        """
        with self.router.ipr() as ipr:
            ipr.route("add" if on else "del", dst=FAR_SUBNET, gateway=self.topo.server_addr)
        from tunnel.lab.topology import CLIENT_TABLE
        with self.client.ipr() as ipr:
            for p in self.topo.paths:
                if p.index != path:
                    ipr.route("add" if on else "del", dst=FAR_SUBNET, type="unreachable", table=CLIENT_TABLE + p.index)

    def start_tunnel(self, mode: str = "duplicate", policy: Optional[Path] = None, log_level: str = "info"):
        """mptun server (pushing the route to far) and client; waits for every path to be up."""
        from tunnel.lab.stack import TunnelStack
        from tunnel.lab.netns import wait_for

        server = {"routes": [FAR_SUBNET], "log_level": log_level}
        client = {"mode": mode, "log_level": log_level,
                  "interfaces": [p.client_ifname for p in self.topo.paths]}
        if policy is not None:
            server["policy"] = client["policy"] = str(Path(policy).resolve())
        self.stack = TunnelStack(self.server, self.client, self.topo.server_addr,
                                 workdir=self.workdir / f"stack{self._calls}",
                                 server_overrides=server, client_overrides=client)
        self._calls += 1
        self.stack.start()
        self.wait_paths_up()
        wait_for(lambda: self.client.ping(self.far_addr, timeout=0.5), 10, message="far not reachable through mptun")
        return self.stack

    def wait_paths_up(self, timeout: float = 20.0) -> None:
        """Until every path is joined and up on the client and the server lists them all."""
        from tunnel.lab.netns import wait_for

        n = len(self.topo.paths)

        def ready() -> bool:
            up = sum(bool(p.get("joined")) and p.get("state") == "up" for p in self.stack.client_status()["paths"])
            tunnels = self.stack.server_status()["tunnels"]
            return up == n and bool(tunnels) and len(tunnels[0]["paths"]) == n
        wait_for(ready, timeout, message="mptun paths did not all come up")

    def stop_tunnel(self) -> None:
        if self.stack is not None:
            self.stack.stop()
            self.stack = None

    def mark_client_media(self, dscp: int) -> None:
        """Mark the client's outgoing media (the call's UDP into mptun0: nothing else in this lab
        sends UDP there) with ``dscp``, as an OS QoS policy would for a stack that does not mark
        (aiortc does not)."""
        rules = (
            "add table inet wrtcmark\n"
            "add chain inet wrtcmark out { type filter hook output priority mangle; }\n"
            f"add rule inet wrtcmark out oifname mptun0 meta l4proto udp ip dscp set {dscp}\n"
        )
        path = self.workdir / "mark.nft"
        path.write_text(rules)
        self.client.run(["nft", "-f", str(path)])

    @contextmanager
    def outer_capture(self) -> Iterator[list]:
        """Capture the tunnel's outer datagrams on the server's link while the block runs.

        The list it yields is filled at the end: [ip_len, tos, frag bits, datagrams,
        largest datagram] per packet (see :func:`outer_capture`).
        """
        from tunnel.lab.netns import wait_for
        from tunnel.lab.stack import PORT

        self._calls += 1
        out = self.workdir / f"outer{self._calls}.json"
        proc = self.server.popen([sys.executable, "-m", "tunnel.lab.webrtc", "outer", self.topo.server_ifname,
                                  str(PORT), str(out)], stderr=open(str(out) + ".log", "ab"))
        wait_for(lambda: Path(str(out) + ".ready").exists() or proc.poll() is not None, 10,
                 message="outer capture did not start")
        if proc.poll() is not None:
            raise RuntimeError(f"outer capture exited with {proc.returncode}: "
                               + Path(str(out) + ".log").read_text(errors="replace")[-500:])
        seen: list = []
        try:
            yield seen
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        if not out.exists():
            raise RuntimeError("outer capture wrote nothing")
        seen.extend(json.loads(out.read_text()))

    def call(self, seconds: float, via: str, during: Optional[Callable[[float], Optional[float]]] = None,
             outer: bool = False) -> dict:
        """A call client (offer) <-> far (answer); ``via`` "tunnel" (capture on mptun0) or "raw".

        With ``outer`` the result also holds ``"outer"``: the tunnel's datagrams
        on the server's link during the call (:meth:`outer_capture`).
        """
        iface = "mptun0" if via == "tunnel" else self.topo.paths[0].client_ifname
        self._calls += 1
        workdir = self.workdir / f"call{self._calls}"
        t0 = time.monotonic()
        if not outer:
            result = run_call(self.client, iface, self.far, self.far_ifname, workdir, seconds, during=during)
        else:
            with self.outer_capture() as seen:
                result = run_call(self.client, iface, self.far, self.far_ifname, workdir, seconds, during=during)
            result = {**result, "outer": seen}
        if via == "tunnel" and self.stack is not None:
            result["tunnel_stalls"] = self.tunnel_stalls(t0)
        return result

    def tunnel_stalls(self, since: float) -> list[list]:
        """The stalls of the tunnel's processes since ``since`` (monotonic): [start, end, who]
        in wall-clock seconds, the clock of the peers' captures.  A stall is time the OS did
        not run that mptun process although its timer was due (tunnel/io/loop.py)."""
        wall = time.time() - time.monotonic()  # CLOCK_MONOTONIC is shared by every namespace
        return [[start + wall, end + wall, who] for start, end, who in self.stack.stalls(since)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunnel.lab.webrtc")
    sub = parser.add_subparsers(dest="cmd", required=True)
    peer = sub.add_parser("peer", help="one aiortc peer; writes ROLE.result.json in DIR")
    peer.add_argument("role", choices=("offer", "answer"))
    peer.add_argument("dir")
    peer.add_argument("--seconds", type=float, default=10.0, help="call length once connected")
    peer.add_argument("--iface", help="capture the RTP received on this interface")
    peer.add_argument("--timeout", type=float, default=30.0, help="for signalling and connecting")
    outer = sub.add_parser("outer", help="capture outer datagrams to/from PORT until SIGTERM")
    outer.add_argument("iface")
    outer.add_argument("port", type=int)
    outer.add_argument("out")
    args = parser.parse_args(argv)
    if args.cmd == "peer":
        return peer_main(args)
    outer_capture(args.iface, args.port, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
