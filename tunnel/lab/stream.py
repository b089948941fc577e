"""A media-like UDP stream through the lab, and what the receiver saw of it.

Why: multipath is about what an application notices while links die: how
many datagrams were lost, how long the stream stalled, whether packets came
twice or out of order, and what the latency was.  iperf3 reports none of that
per packet, so this module sends a steady, numbered stream and has the
receiver record every arrival:

- ``python -m tunnel.lab.stream send --to ADDR:PORT --rate PPS --size BYTES --count N``
  sends N datagrams on an absolute schedule (datagram i leaves at
  start + i/rate, so a late one does not shift the rest), each carrying a
  header (magic, sequence number, send time), then an "end" marker a few
  times; it prints a JSON summary.
- ``python -m tunnel.lab.stream recv --bind ADDR:PORT --out FILE`` records
  (seq, send time, arrival time, TOS byte) per datagram until it has
  ``--expect`` of them, has been idle for ``--timeout`` seconds, has lingered
  ``--linger`` seconds after the end marker, or gets SIGTERM; then it writes
  the statistics (:class:`StreamResult`) to FILE, atomically.

Send and arrival times are ``time.monotonic_ns()``: CLOCK_MONOTONIC is not
virtualised by network namespaces (only by time namespaces, which
``ip netns exec`` does not create), so a sender and a receiver in different
lab hosts on this machine read the same clock and one-way latency is just
their difference (tests/test_lab_stream.py checks that claim).

The receiver also counts the TOS byte (IP_RECVTOS / IPV6_RECVTCLASS) of each
datagram, for DSCP/ECN checks, and the kernel's drop counter of its socket
(SO_RXQ_OVFL), so losses of the tool itself are told apart from the network's.

The sub-commands import nothing heavy (the lab's pyroute2 only in the
functions that drive namespaces), so they start quickly inside a namespace.
:func:`percentile` is the nearest-rank percentile the benchmark's RTT figures use
too (tunnel/lab/bench/traffic.py imports it from here).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence

if TYPE_CHECKING:
    from tunnel.lab.netns import Host

# Wire format: magic, sequence number (the count of data datagrams in an end
# marker), time.monotonic_ns() at sending; padded with zeros to --size.  The
# sequence number is at UDP payload offset 4 (`@th,96,32` in nftables).
HEADER = struct.Struct("!4sIQ")
DATA_MAGIC = b"MPSd"
END_MAGIC = b"MPSe"
END_REPEATS = 3  # end markers sent ...
END_SPACING = 0.01  # ... this many seconds apart

DEFAULT_TIMEOUT = 3.0  # receiver: seconds without a datagram before it gives up
DEFAULT_LINGER = 0.5  # receiver: seconds to wait for stragglers after an end marker
RCVBUF = 4 << 20

# Linux values; the socket module lacks these names.
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_ANCBUF = socket.CMSG_SPACE(4) * 2

_NS_PER_MS = 1_000_000
_runs = itertools.count()


# --------------------------------------------------------------------------
# Records and statistics (pure; unit-tested without sockets)
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Arrival:
    """One datagram as the receiver saw it (times from time.monotonic_ns())."""

    seq: int
    sent_ns: int
    arrived_ns: int
    tos: Optional[int] = None  # TOS / traffic class byte, if the kernel reported it

    @property
    def latency_ms(self) -> float:
        return (self.arrived_ns - self.sent_ns) / _NS_PER_MS


@dataclass
class StreamResult:
    """What the receiver saw of one stream; see :func:`analyze` for the definitions."""

    sent: int
    received: int
    duplicates: int
    lost: int
    loss_ratio: float
    reordered: int
    longest_gap_ms: float
    gap_after_seq: Optional[int]  # the longest gap is between the arrival of this seq ...
    gap_before_seq: Optional[int]  # ... and of this one
    longest_loss_run: int
    loss_run_start: Optional[int]  # first seq of the longest run of lost seqs
    latency_p50_ms: Optional[float]
    latency_p99_ms: Optional[float]
    latency_max_ms: Optional[float]
    tos_counts: dict[int, int]
    end_seen: bool  # an end marker arrived, so ``sent`` is exact
    socket_drops: int  # datagrams the receiving socket's buffer dropped (the tool's own loss)
    stopped_by: str  # "expect", "complete", "end", "timeout" or "signal"
    arrivals: Optional[list[Arrival]] = None  # with --full: every datagram, in arrival order
    sender: Optional[dict[str, Any]] = None  # the sender's summary (filled by run_stream)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tos_counts"] = {str(k): v for k, v in self.tos_counts.items()}
        if self.arrivals is not None:
            d["arrivals"] = [[a.seq, a.sent_ns, a.arrived_ns, a.tos] for a in self.arrivals]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StreamResult:
        d = dict(d)
        d["tos_counts"] = {int(k): v for k, v in d["tos_counts"].items()}
        if d.get("arrivals") is not None:
            d["arrivals"] = [Arrival(*a) for a in d["arrivals"]]
        return cls(**d)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    rank = max(1, -(-len(sorted_values) * p // 100))  # ceil(n * p / 100)
    return sorted_values[int(rank) - 1]


def first_arrivals(arrivals: Iterable[Arrival]) -> list[Arrival]:
    """The first arrival of each seq, in arrival order (duplicates dropped)."""
    seen: set[int] = set()
    firsts = []
    for a in arrivals:
        if a.seq not in seen:
            seen.add(a.seq)
            firsts.append(a)
    return firsts


def count_reordered(seqs: Iterable[int]) -> int:
    """Datagrams that arrived after one with a higher seq (RFC 4737 style)."""
    highest, count = -1, 0
    for seq in seqs:
        if seq < highest:
            count += 1
        highest = max(highest, seq)
    return count


def longest_gap(arrivals: Sequence[Arrival]) -> tuple[float, Optional[int], Optional[int]]:
    """(ms, seq before, seq after) of the longest time between consecutive arrivals."""
    best: tuple[float, Optional[int], Optional[int]] = (0.0, None, None)
    for prev, cur in zip(arrivals, arrivals[1:]):
        gap = (cur.arrived_ns - prev.arrived_ns) / _NS_PER_MS
        if gap > best[0]:
            best = (gap, prev.seq, cur.seq)
    return best


def held_gap_ms(result: StreamResult, rate: float, stalls: Sequence[Sequence] = ()) -> float:
    """The longest gap between first arrivals that the tunnel itself made, in ms.

    Needs ``result.arrivals`` (``full=True``).  Of the time between two
    consecutive first arrivals a and b, this leaves out what the sender made
    (b left later than its schedule after a: a pause of the sending process)
    and the ``stalls`` ((start, end, ...) monotonic seconds: an mptun process
    not run by the OS, see TunnelStack.stalls); what is left is the packets
    being held, lost or delayed on the way.
    """
    if result.arrivals is None:
        raise ValueError("held_gap_ms needs the arrivals: run the stream with full=True")
    firsts = first_arrivals(sorted(result.arrivals, key=lambda a: a.arrived_ns))
    interval_ns = 1e9 / rate
    stalled = [(start * 1e9, end * 1e9) for start, end, *_ in stalls]
    worst = 0.0
    for a, b in zip(firsts, firsts[1:]):
        excused = list(stalled)
        due = a.sent_ns + (b.seq - a.seq) * interval_ns  # when b should have left
        if b.sent_ns > due:
            excused.append((due, b.sent_ns))
        held = (b.arrived_ns - a.arrived_ns) - covered(excused, a.arrived_ns, b.arrived_ns)
        worst = max(worst, held / _NS_PER_MS)
    return worst


def covered(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """How much of [lo, hi] the union of ``intervals`` covers."""
    total, reach = 0.0, lo
    for start, end in sorted(intervals):
        start, end = max(start, reach), min(end, hi)
        if end > start:
            total += end - start
            reach = end
    return total


def longest_loss_run(received: set[int], sent: int) -> tuple[int, Optional[int]]:
    """(length, first seq) of the longest run of seqs in [0, sent) that never arrived."""
    best: tuple[int, Optional[int]] = (0, None)
    run_start: Optional[int] = None
    for seq in range(sent + 1):  # seq == sent closes a run that reaches the end
        if seq < sent and seq not in received:
            run_start = seq if run_start is None else run_start
        elif run_start is not None:
            if seq - run_start > best[0]:
                best = (seq - run_start, run_start)
            run_start = None
    return best


def tos_counts(arrivals: Iterable[Arrival]) -> dict[int, int]:
    """How many datagrams (duplicates included) carried each TOS value."""
    counts: dict[int, int] = {}
    for a in arrivals:
        if a.tos is not None:
            counts[a.tos] = counts.get(a.tos, 0) + 1
    return dict(sorted(counts.items()))


def analyze(arrivals: Sequence[Arrival], end_count: Optional[int] = None, socket_drops: int = 0,
            stopped_by: str = "", full: bool = False) -> StreamResult:
    """Statistics of a stream from its arrivals.

    ``sent`` is the count from the end marker (``end_count``) if one arrived,
    else the highest seq + 1.  ``received`` counts distinct seqs below
    ``sent``; every further copy is a duplicate.  Gaps, reordering and
    latency use the first arrival of each seq.
    """
    ordered = sorted(arrivals, key=lambda a: a.arrived_ns)  # stable: ties keep receive order
    firsts = first_arrivals(ordered)
    sent = end_count if end_count is not None else max((a.seq for a in firsts), default=-1) + 1
    received = {a.seq for a in firsts if a.seq < sent}
    lost = sent - len(received)
    gap_ms, gap_after, gap_before = longest_gap(firsts)
    run, run_start = longest_loss_run(received, sent)
    latencies = sorted(a.latency_ms for a in firsts)
    return StreamResult(
        sent=sent,
        received=len(received),
        duplicates=len(ordered) - len(firsts),
        lost=lost,
        loss_ratio=lost / sent if sent else 0.0,
        reordered=count_reordered(a.seq for a in firsts),
        longest_gap_ms=gap_ms,
        gap_after_seq=gap_after,
        gap_before_seq=gap_before,
        longest_loss_run=run,
        loss_run_start=run_start,
        latency_p50_ms=percentile(latencies, 50) if latencies else None,
        latency_p99_ms=percentile(latencies, 99) if latencies else None,
        latency_max_ms=latencies[-1] if latencies else None,
        tos_counts=tos_counts(ordered),
        end_seen=end_count is not None,
        socket_drops=socket_drops,
        stopped_by=stopped_by,
        arrivals=list(ordered) if full else None,
    )


# --------------------------------------------------------------------------
# Wire format and sockets
# --------------------------------------------------------------------------

def encode(magic: bytes, seq: int, sent_ns: int, size: int = HEADER.size) -> bytes:
    return HEADER.pack(magic, seq, sent_ns).ljust(size, b"\0")


def decode(data: bytes) -> Optional[tuple[bytes, int, int]]:
    """(magic, seq, sent_ns) of one of our datagrams, or None for anything else."""
    if len(data) < HEADER.size:
        return None
    magic, seq, sent_ns = HEADER.unpack_from(data)
    return (magic, seq, sent_ns) if magic in (DATA_MAGIC, END_MAGIC) else None


def parse_address(text: str) -> tuple[str, int]:
    """``"198.18.0.1:5000"`` or ``"[::1]:5000"`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected ADDR:PORT, got {text!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _tos_option(family: socket.AddressFamily) -> tuple[int, int]:
    """(level, option) that sets the TOS byte / traffic class and tags it in a cmsg."""
    if family == socket.AF_INET6:
        return socket.IPPROTO_IPV6, socket.IPV6_TCLASS
    return socket.IPPROTO_IP, socket.IP_TOS


def open_receiver_socket(bind: tuple[str, int]) -> socket.socket:
    """A UDP socket bound to ``bind`` that reports TOS and socket drops per datagram."""
    family = _family(bind[0])
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)  # root: past rmem_max
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVTCLASS, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_RECVTOS, 1)
    sock.bind(bind)
    return sock


def parse_ancillary(ancdata: Iterable[tuple[int, int, bytes]]) -> tuple[Optional[int], Optional[int]]:
    """(TOS byte, socket drop counter) from recvmsg() ancillary data, None where absent."""
    tos = drops = None
    for level, kind, data in ancdata:
        if (level, kind) in ((socket.IPPROTO_IP, socket.IP_TOS),
                             (socket.IPPROTO_IPV6, socket.IPV6_TCLASS)):
            tos = data[0] if len(data) == 1 else int.from_bytes(data[:4], sys.byteorder)
        elif (level, kind) == (socket.SOL_SOCKET, SO_RXQ_OVFL):
            drops = int.from_bytes(data[:4], sys.byteorder)
    return tos, drops


# --------------------------------------------------------------------------
# Receiver
# --------------------------------------------------------------------------

class _Stopped(Exception):
    """Raised by the SIGTERM handler to end the recording."""


@dataclass
class Recording:
    """The receive loop's state; :meth:`result` turns it into statistics."""

    expect: Optional[int] = None
    arrivals: list[Arrival] = field(default_factory=list)
    seqs: set[int] = field(default_factory=set)
    end_count: Optional[int] = None
    socket_drops: int = 0
    stopped_by: str = ""

    def add(self, data: bytes, arrived_ns: int, tos: Optional[int], drops: Optional[int]) -> None:
        """Record one datagram (ignoring foreign ones)."""
        packet = decode(data)
        if packet is None:
            return
        magic, seq, sent_ns = packet
        if drops is not None:
            self.socket_drops = drops
        if magic == END_MAGIC:
            self.end_count = seq
        else:
            self.arrivals.append(Arrival(seq, sent_ns, arrived_ns, tos))
            self.seqs.add(seq)

    def done(self) -> Optional[str]:
        """Why to stop now, or None to go on."""
        if self.expect is not None and len(self.seqs) >= self.expect:
            return "expect"
        if self.end_count is not None and len(self.seqs) >= self.end_count:
            return "complete"
        return None

    def result(self, full: bool = False) -> StreamResult:
        return analyze(self.arrivals, self.end_count, self.socket_drops, self.stopped_by, full)


@contextmanager
def stopped_by_signal(rec: Recording) -> Iterator[None]:
    """Within this, SIGTERM or Ctrl-C end the recording (``rec.stopped_by = "signal"``), not the process."""
    previous = signal.signal(signal.SIGTERM, _raise_stopped_once)
    try:
        yield
    except (_Stopped, KeyboardInterrupt):
        rec.stopped_by = "signal"
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_stopped_once(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the wrap-up
    raise _Stopped()


def receive(sock: socket.socket, rec: Recording, timeout: float = DEFAULT_TIMEOUT,
            linger: float = DEFAULT_LINGER) -> None:
    """Record datagrams into ``rec`` until it is done, ``linger`` s have passed since
    the end marker, or ``timeout`` s since the last datagram (or the start)."""
    idle_deadline = time.monotonic() + timeout
    end_deadline = float("inf")
    while not rec.stopped_by:
        remaining = min(idle_deadline, end_deadline) - time.monotonic()
        if remaining <= 0:
            rec.stopped_by = "end" if rec.end_count is not None else "timeout"
            return
        sock.settimeout(remaining)
        try:
            data, ancdata, _, _ = sock.recvmsg(65535, _ANCBUF)
        except socket.timeout:
            continue
        arrived_ns = time.monotonic_ns()
        had_end = rec.end_count is not None
        rec.add(data, arrived_ns, *parse_ancillary(ancdata))
        idle_deadline = arrived_ns / 1e9 + timeout
        if not had_end and rec.end_count is not None:
            end_deadline = arrived_ns / 1e9 + linger
        rec.stopped_by = rec.done() or ""


def write_json_atomically(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file + rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def read_result(path: Path | str) -> StreamResult:
    """The :class:`StreamResult` a receiver wrote to ``path``."""
    return StreamResult.from_json(json.loads(Path(path).read_text()))


def recv_main(args: argparse.Namespace) -> int:
    rec = Recording(args.expect)
    # The handler goes in before the socket is bound: whoever saw the port bound may SIGTERM us.
    with stopped_by_signal(rec), open_receiver_socket(parse_address(args.bind)) as sock:
        receive(sock, rec, args.timeout, args.linger)
    write_json_atomically(Path(args.out), rec.result(args.full).to_json())
    return 0


# --------------------------------------------------------------------------
# Sender
# --------------------------------------------------------------------------

def _open_sender_socket(to: tuple[str, int], bind: Optional[str], tos: Optional[int]) -> socket.socket:
    family = _family(to[0])
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if tos is not None:
        sock.setsockopt(*_tos_option(family), tos)
    if bind:
        sock.bind((bind, 0))
    return sock


def _sleep_until(target: float) -> float:
    """Sleep until time.monotonic() reaches ``target``; return how late we woke (s)."""
    delay = target - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    return time.monotonic() - target


def _send(sock: socket.socket, to: tuple[str, int], data: bytes) -> bool:
    """sendto() that reports failure (e.g. ENETUNREACH while a link is down) instead of raising."""
    try:
        sock.sendto(data, to)
        return True
    except OSError:
        return False


def send_stream(to: tuple[str, int], rate: float, size: int, count: int, bind: Optional[str] = None,
                tos: Optional[int] = None, dup_every: int = 0) -> dict[str, Any]:
    """Send ``count`` datagrams of ``size`` bytes at ``rate``/s, then the end markers.

    With ``dup_every`` K > 0, every K-th datagram (seq K-1, 2K-1, ...) is sent
    twice (for testing duplicate detection).  Returns the summary the ``send``
    sub-command prints.
    """
    if size < HEADER.size or rate <= 0 or count < 0 or dup_every < 0:
        raise ValueError(f"need size >= {HEADER.size} bytes, rate > 0, count >= 0, dup_every >= 0")
    errors = dups = 0
    max_late = 0.0
    with _open_sender_socket(to, bind, tos) as sock:
        start = time.monotonic()
        for seq in range(count):
            max_late = max(max_late, _sleep_until(start + seq / rate))
            data = encode(DATA_MAGIC, seq, time.monotonic_ns(), size)
            copies = 2 if dup_every and (seq + 1) % dup_every == 0 else 1
            errors += sum(not _send(sock, to, data) for _ in range(copies))
            dups += copies - 1
        duration = time.monotonic() - start
        for i in range(END_REPEATS):
            _send(sock, to, encode(END_MAGIC, count, time.monotonic_ns()))
            if i + 1 < END_REPEATS:
                time.sleep(END_SPACING)
    return {"sent": count, "duplicates_sent": dups, "send_errors": errors,
            "duration_s": duration, "max_lateness_ms": max_late * 1e3}


def send_main(args: argparse.Namespace) -> int:
    summary = send_stream(parse_address(args.to), args.rate, args.size, args.count,
                          args.bind, args.tos, args.dup_every)
    print(json.dumps(summary))
    return 0


# --------------------------------------------------------------------------
# Python API for tests and benchmarks: run the sub-commands in lab hosts
# --------------------------------------------------------------------------

def _self_argv(*args: object) -> list[str]:
    return [sys.executable, "-m", "tunnel.lab.stream", *map(str, args)]


def start_receiver(host: Host, bind: str, out: Path | str, expect: Optional[int] = None,
                   timeout: float = DEFAULT_TIMEOUT, linger: float = DEFAULT_LINGER,
                   full: bool = False) -> subprocess.Popen:
    """Start ``recv`` in ``host`` bound to ``bind`` ("ADDR:PORT"); it writes ``out`` when done.

    Does not wait for it to listen: see :func:`wait_listening`.
    """
    argv = _self_argv("recv", "--bind", bind, "--out", out, "--timeout", timeout, "--linger", linger)
    if expect is not None:
        argv += ["--expect", str(expect)]
    if full:
        argv.append("--full")
    return host.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_listening(host: Host, port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Wait until ``proc`` (a receiver in ``host``) has bound UDP ``port``."""
    from tunnel.lab.netns import wait_for  # here, not at the top: pyroute2 slows the sub-commands' start

    wait_for(lambda: host.is_listening(port, udp=True) or proc.poll() is not None, timeout,
             message=f"stream receiver did not bind UDP port {port}")
    if proc.poll() is not None:
        raise RuntimeError(f"stream receiver exited with {proc.returncode}: {_stderr(proc)}")


def finish_receiver(proc: subprocess.Popen, out: Path | str, timeout: float) -> StreamResult:
    """Wait up to ``timeout`` s for the receiver to stop on its own, else SIGTERM it; read ``out``."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # `ip netns exec` execs, so this is the receiver itself
        proc.wait(10)
    if proc.returncode != 0:
        raise RuntimeError(f"stream receiver exited with {proc.returncode}: {_stderr(proc)}")
    return read_result(out)


def start_sender(host: Host, to: str, rate: float, size: int, count: int, tos: Optional[int] = None,
                 bind: Optional[str] = None, dup_every: int = 0) -> subprocess.Popen:
    """Start ``send`` in ``host`` towards ``to`` ("ADDR:PORT"); see :func:`finish_sender`."""
    argv = _self_argv("send", "--to", to, "--rate", rate, "--size", size, "--count", count)
    for option, value in (("--tos", tos), ("--bind", bind), ("--dup-every", dup_every or None)):
        if value is not None:
            argv += [option, str(value)]
    return host.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_sender(proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    """Wait for a sender and return its JSON summary."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"stream sender exited with {proc.returncode}: {stderr.strip()}")
    return json.loads(stdout)


def _sender_timeout(rate: float, count: int) -> float:
    return count / rate + 30.0


def run_sender(host: Host, to: str, rate: float, size: int, count: int, tos: Optional[int] = None,
               bind: Optional[str] = None, dup_every: int = 0) -> dict[str, Any]:
    """Send a whole stream from ``host`` and return the sender's summary."""
    proc = start_sender(host, to, rate, size, count, tos, bind, dup_every)
    return finish_sender(proc, _sender_timeout(rate, count))


def run_stream(sender_host: Host, receiver_host: Host, to_addr: str, port: int, rate: float,
               size: int, count: int, workdir: Path | str, *, tos: Optional[int] = None,
               dup_every: int = 0, timeout: float = DEFAULT_TIMEOUT, linger: float = DEFAULT_LINGER,
               full: bool = False, during: Optional[Callable[[], None]] = None) -> StreamResult:
    """Stream ``count`` datagrams from ``sender_host`` to ``to_addr``:``port`` in ``receiver_host``.

    The receiver binds the wildcard address on ``port`` and stops once the
    end marker has come and every datagram before it, or ``linger`` s after
    the end marker, or after ``timeout`` s without a datagram.  (No
    ``expect``: stopping at the ``count``-th distinct datagram would miss
    duplicates of the last ones.)  ``during``, if given, is called once the
    sender has started (e.g. to cut a link mid-stream).  The result carries
    the sender's summary in ``.sender``.
    """
    out = Path(workdir) / f"stream-{receiver_host.name}-{port}-{next(_runs)}.json"
    wildcard = "[::]" if _family(to_addr) == socket.AF_INET6 else "0.0.0.0"
    dest = f"[{to_addr}]:{port}" if ":" in to_addr else f"{to_addr}:{port}"
    receiver = start_receiver(receiver_host, f"{wildcard}:{port}", out, None, timeout, linger, full)
    sender: Optional[subprocess.Popen] = None
    try:
        wait_listening(receiver_host, port, receiver)
        sender = start_sender(sender_host, dest, rate, size, count, tos, dup_every=dup_every)
        if during is not None:
            during()
        summary = finish_sender(sender, _sender_timeout(rate, count))
        result = finish_receiver(receiver, out, timeout + linger + 5.0)
    finally:
        for proc in (sender, receiver):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    return replace(result, sender=summary)


def _stderr(proc: subprocess.Popen) -> str:
    return proc.stderr.read().strip() if proc.stderr and proc.poll() is not None else ""


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tunnel.lab.stream", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("recv", help="record a stream and write its statistics as JSON")
    r.add_argument("--bind", required=True, help="ADDR:PORT to listen on")
    r.add_argument("--out", required=True, help="JSON result file (written atomically)")
    r.add_argument("--expect", type=int, help="stop once this many distinct datagrams arrived")
    r.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"stop after this many seconds without a datagram (default {DEFAULT_TIMEOUT:g})")
    r.add_argument("--linger", type=float, default=DEFAULT_LINGER,
                   help=f"seconds to wait for stragglers after the end marker (default {DEFAULT_LINGER:g})")
    r.add_argument("--full", action="store_true", help="include every arrival in the result")
    r.set_defaults(main=recv_main)
    s = sub.add_parser("send", help="send a paced stream, print a JSON summary")
    s.add_argument("--to", required=True, help="ADDR:PORT of the receiver")
    s.add_argument("--rate", type=float, required=True, help="datagrams per second")
    s.add_argument("--size", type=int, required=True, help=f"UDP payload bytes (>= {HEADER.size})")
    s.add_argument("--count", type=int, required=True, help="datagrams to send")
    s.add_argument("--bind", help="source address")
    s.add_argument("--tos", type=lambda v: int(v, 0), help="TOS byte / traffic class, e.g. 0xb8")
    s.add_argument("--dup-every", type=int, default=0, help="testing: send every K-th datagram twice")
    s.set_defaults(main=send_main)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.main(args)
    except ValueError as e:  # bad ADDR:PORT, size, rate...
        parser.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
