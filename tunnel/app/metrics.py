"""Prometheus metrics: `GET /metrics` over plain HTTP, served from inside the shell's event loop.

Like the control socket (tunnel/app/control.py) the server never blocks the loop:
the listening socket and each connection are non-blocking, a request is read
until its blank line (at most MAX_REQUEST bytes), and every connection has a
deadline: a client that is silent, slow to send its request or slow to read
the answer is dropped when it passes.  Error answers are written from the loop
(as far as the socket takes them; the rest is retried from a timer, as the
loop has no writable events).  For /metrics the loop only takes the snapshot
(``status()``: the shell's, the core's ``stats()`` plus ``io``), and only for a
scrape it will answer (a 503 "busy" costs no snapshot); rendering it
(~0.5 s for 1000 tunnels of 2 paths) and writing it happen on a worker thread,
which costs the loop at most a GIL switch interval per wakeup meanwhile.

The body is the Prometheus text format (0.0.4) made by ``prometheus_client``
(``generate_latest``) from a custom collector over that snapshot; nothing is
kept between scrapes.

Metrics (labels in braces; ``client`` is the client's certificate name, for the
client role the ``name`` given to MetricsServer):

    mptun_info{role}                                       1
    mptun_tunnels                                          gauge: tunnels (client: 1 while up)
    mptun_handshaking                                      gauge: paths in the DTLS handshake (server)
    mptun_tunnel_{delivered,duplicates,too_old,spoofed,malformed,ecn_dropped}_total{client,address}
    mptun_class_{packets,copies}_total{client,class}
    mptun_path_{tx,rx}_{packets,bytes}_total{client,path,name}
    mptun_path_{dtls_dropped,malformed}_total{client,path,name}
    mptun_path_rtt_seconds, mptun_path_loss_ratio, mptun_path_rate_bytes_per_second{client,path,name}
    mptun_path_capacity_bytes_per_second, mptun_path_base_rtt_seconds, mptun_path_queue_seconds
        {client,path,name}: balance's model of the path (tunnel/core/bottleneck.py), when it has one
    mptun_class_shed{client,class}: balance packets marked CE or dropped for full queues
    mptun_path_up{client,path,name}                        1 if state == "up"
    mptun_path_state{client,path,name,state}               1 (one series per path: its current state)
    mptun_path_joined{client,path,name}                    (client) 1 if the path joined the tunnel
    mptun_server_<counter>_total                           each entry of the server's ``counters``
    mptun_client_<counter>_total                           dropped_no_path, not_ipv4, rebind_attempts, rebinds (client)
    mptun_io_<counter>_total                               each entry of the shell's ``io``
    mptun_loop_stalls_total, mptun_loop_stall_seconds_total  wakeups later than asked (tunnel/io/loop.py)
    mptun_loop_stall_longest_seconds                       gauge: the longest
    mptun_loop_busy_total                                  callbacks that ran long
    mptun_crl_expired                                      (server, with a crl) 1 while past its nextUpdate
    mptun_crl_next_update_timestamp_seconds, mptun_crl_revoked  (server, with a crl) its nextUpdate, its serials

The path state is not a label of the counters: a counter series would restart
whenever its path went up -> degraded -> up, which breaks ``rate()``.
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import re
import socket
import threading
import time
from typing import Callable, Iterable, Optional

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tunnel.io.loop import STALL
from tunnel.io.loopconn import Conn, LoopServer

log = logging.getLogger("mptun")
STALL_MS = round(STALL * 1e3)

# generate_latest() writes the classic text format whatever the library's newest one is.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

PATH_LABELS = ["client", "path", "name"]
TUNNEL_LABELS = ["client", "address"]

# stats key (the metric is mptun_tunnel_<key>_total, mptun_path_<key>_total) -> help
TUNNEL_COUNTERS = {
    "delivered": "Packets that passed the tunnel-wide de-duplication.",
    "duplicates": "Duplicate packets dropped by the tunnel-wide de-duplication.",
    "too_old": "Packets dropped because they were older than the de-duplication window.",
    "spoofed": "Packets from the tunnel with a source address the client does not own (server).",
    "malformed": "Malformed frames received on the tunnel.",
    "ecn_dropped": "Packets dropped because their ECN codepoint could not be carried.",
}
PATH_COUNTERS = {
    "tx_packets": "Records sent on the path.",
    "rx_packets": "Records received on the path.",
    "tx_bytes": "Bytes sent on the path.",
    "rx_bytes": "Bytes received on the path.",
    "dtls_dropped": "DTLS records dropped on the path (replayed, forged, undecryptable).",
    "malformed": "Malformed frames received on the path.",
    "feedbacks_sent": "FEEDBACK frames sent on the path (the peer's balance asked for them).",
}
CLIENT_COUNTERS = {  # mptun_client_<key>_total
    "dropped_no_path": "Packets from the TUN dropped because no path was up.",
    "not_ipv4": "Packets from the TUN dropped because they were not IPv4 (nor IPv6 with an IPv6 address).",
    "local6": "IPv6 link-local or multicast packets from the TUN, kept off the tunnel.",
    "rebind_attempts": "Spare sessions started for silent paths (NAT rebinding).",
    "rebinds": "Silent path sessions replaced by a spare from a new source port.",
}


def _metric_name(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", str(text))


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class StatusCollector:
    """A prometheus_client collector: each collect() turns one ``status()`` into metric families."""

    def __init__(self, status: Callable[[], dict], role: str, name: str = ""):
        if role not in ("server", "client"):
            raise ValueError(f"role must be 'server' or 'client', not {role!r}")
        self.status = status
        self.role = role
        self.name = name

    def describe(self) -> Iterable:
        return []  # nothing at registration time: status() is only asked when scraped

    def collect(self) -> Iterable:
        return self.families(self.status())

    def families(self, st: dict) -> list:
        """The metric families of one status; those without samples (no tunnels yet, a
        server-only one for the client) are left out."""
        return [fam for fam in self._families(st) if fam.samples]

    def _families(self, st: dict) -> Iterable:
        info = GaugeMetricFamily("mptun_info", "The mptun daemon and its role.", labels=["role"])
        info.add_metric([self.role], 1)
        yield info
        if self.role == "server":
            tunnels = [(t.get("name", ""), t) for t in st.get("tunnels", [])]
            yield GaugeMetricFamily("mptun_tunnels", "Tunnels (connected clients).", value=len(tunnels))
            yield GaugeMetricFamily(
                "mptun_handshaking", "Paths in the DTLS handshake.", value=_number(st.get("handshaking")) or 0
            )
        else:
            tunnels = [(self.name, st)]
            yield GaugeMetricFamily(
                "mptun_tunnels", "Tunnels (1 while the client's tunnel is up).", value=1 if st.get("state") == "up" else 0
            )
        yield from self._tunnel_families(tunnels)
        yield from self._path_families(tunnels)
        if self.role == "server":
            yield from self._counter_dict("mptun_server_", st.get("counters", {}), "Server counter {}.")
            yield from self._crl_families((st.get("revocation") or {}).get("crl") or {})
        else:
            for key, help_text in CLIENT_COUNTERS.items():
                if _number(st.get(key)) is not None:
                    yield CounterMetricFamily(f"mptun_client_{key}", help_text, value=_number(st[key]))
        yield from self._counter_dict("mptun_io_", st.get("io", {}), "I/O counter {} of the shell.")
        yield from self._loop_families(st.get("loop") or {})

    @staticmethod
    def _crl_families(crl: dict) -> Iterable:
        """Only with a CRL configured (tunnel/core/revocation.py)."""
        if "expired" not in crl:
            return
        yield GaugeMetricFamily(
            "mptun_crl_expired", "1 if the CRL is past its nextUpdate (crl_expired says whether handshakes are "
            "refused meanwhile), else 0.", value=1 if crl["expired"] else 0,
        )
        if _number(crl.get("next_update")) is not None:
            yield GaugeMetricFamily(
                "mptun_crl_next_update_timestamp_seconds", "The CRL's nextUpdate (Unix time).",
                value=_number(crl["next_update"]),
            )
        if _number(crl.get("revoked")) is not None:
            yield GaugeMetricFamily("mptun_crl_revoked", "Certificates the CRL revokes.", value=_number(crl["revoked"]))

    @staticmethod
    def _loop_families(loop: dict) -> Iterable:
        if _number(loop.get("stalls")) is None:
            return
        yield CounterMetricFamily(
            "mptun_loop_stalls", f"Times of {STALL_MS} ms or more the OS did not run mptun (a late wakeup, or callbacks held off the CPU).",
            value=_number(loop["stalls"]),
        )
        yield CounterMetricFamily(
            "mptun_loop_stall_seconds", "Time mptun was not run when it should have been (sum of the stalls).",
            value=(_number(loop.get("stall_total_ms")) or 0) / 1e3,
        )
        yield GaugeMetricFamily(
            "mptun_loop_stall_longest_seconds", "The longest stall so far.",
            value=(_number(loop.get("stall_longest_ms")) or 0) / 1e3,
        )
        yield CounterMetricFamily(
            "mptun_loop_busy", f"Wakeups whose callbacks ran {STALL_MS} ms or more (mptun's own time).",
            value=_number(loop.get("busy")) or 0,
        )

    @staticmethod
    def _counter_dict(prefix: str, counters: dict, help_text: str) -> Iterable:
        for key, value in sorted(counters.items()):
            if _number(value) is not None:
                yield CounterMetricFamily(prefix + _metric_name(key), help_text.format(key), value=_number(value))

    @staticmethod
    def _tunnel_families(tunnels: list[tuple[str, dict]]) -> Iterable:
        for key, help_text in TUNNEL_COUNTERS.items():
            fam = CounterMetricFamily(f"mptun_tunnel_{key}", help_text, labels=TUNNEL_LABELS)
            for client, t in tunnels:
                if _number(t.get(key)) is not None:
                    fam.add_metric([client, t.get("address") or ""], _number(t[key]))
            yield fam
        packets = CounterMetricFamily("mptun_class_packets", "Packets sent per traffic class.", labels=["client", "class"])
        copies = CounterMetricFamily("mptun_class_copies", "Copies sent per traffic class (all paths).", labels=["client", "class"])
        shed = CounterMetricFamily("mptun_class_shed", "Balance packets marked CE or dropped because every path's queue was full.",
                                   labels=["client", "class"])
        for client, t in tunnels:
            seen = set()
            for c in t.get("classes") or []:
                if c.get("name") in seen:
                    continue
                seen.add(c.get("name"))
                if _number(c.get("packets")) is not None:
                    packets.add_metric([client, str(c.get("name"))], _number(c["packets"]))
                if _number(c.get("copies")) is not None:
                    copies.add_metric([client, str(c.get("name"))], _number(c["copies"]))
                if _number(c.get("shed")) is not None:
                    shed.add_metric([client, str(c.get("name"))], _number(c["shed"]))
        yield packets
        yield copies
        yield shed

    @staticmethod
    def _path_families(tunnels: list[tuple[str, dict]]) -> Iterable:
        counters = {
            key: CounterMetricFamily(f"mptun_path_{key}", help_text, labels=PATH_LABELS)
            for key, help_text in PATH_COUNTERS.items()
        }
        rtt = GaugeMetricFamily("mptun_path_rtt_seconds", "Smoothed round-trip time of the path.", labels=PATH_LABELS)
        loss = GaugeMetricFamily("mptun_path_loss_ratio", "Estimated loss of the path (0..1).", labels=PATH_LABELS)
        rate = GaugeMetricFamily(
            "mptun_path_rate_bytes_per_second", "Estimated send rate of the path.", labels=PATH_LABELS
        )
        up = GaugeMetricFamily("mptun_path_up", "1 if the path is up, else 0.", labels=PATH_LABELS)
        state = GaugeMetricFamily(
            "mptun_path_state", "The path's current state (one series per path, value 1).", labels=PATH_LABELS + ["state"]
        )
        joined = GaugeMetricFamily("mptun_path_joined", "1 if the path joined the tunnel, else 0.", labels=PATH_LABELS)
        capacity = GaugeMetricFamily(
            "mptun_path_capacity_bytes_per_second", "balance: the modelled rate of the path's bottleneck (from FEEDBACK).",
            labels=PATH_LABELS)
        base = GaugeMetricFamily("mptun_path_base_rtt_seconds", "balance: the lowest round trip of the last 10 s.",
                                 labels=PATH_LABELS)
        queue = GaugeMetricFamily("mptun_path_queue_seconds", "balance: queue delay the latest FEEDBACK's packet met.",
                                  labels=PATH_LABELS)
        idle = GaugeMetricFamily(
            "mptun_path_idle_probing", "1 while the path probes every idle_probe_interval (no traffic), else 0.",
            labels=PATH_LABELS,
        )
        any_joined = False
        for client, t in tunnels:
            seen = set()
            for p in t.get("paths") or []:
                labels = [client, str(p.get("addr", "")), str(p.get("name") or "")]
                if tuple(labels) in seen:  # a repeated label set would make the whole scrape invalid
                    continue
                seen.add(tuple(labels))
                st = str(p.get("state", ""))
                up.add_metric(labels, 1 if st == "up" else 0)
                state.add_metric(labels + [st], 1)
                if "probing" in p:
                    idle.add_metric(labels, 1 if p["probing"] == "idle" else 0)
                if "joined" in p:
                    any_joined = True
                    joined.add_metric(labels, 1 if p["joined"] else 0)
                for key, fam in counters.items():
                    if _number(p.get(key)) is not None:
                        fam.add_metric(labels, _number(p[key]))
                if _number(p.get("rtt_ms")) is not None:
                    rtt.add_metric(labels, _number(p["rtt_ms"]) / 1000)
                if _number(p.get("loss")) is not None:
                    loss.add_metric(labels, _number(p["loss"]))
                if _number(p.get("rate_kbps")) is not None:
                    rate.add_metric(labels, _number(p["rate_kbps"]) * 1000 / 8)
                b = p.get("bottleneck")
                if isinstance(b, dict):
                    for fam, key, scale in ((capacity, "rate_kbps", 1000 / 8), (base, "base_rtt_ms", 1e-3),
                                            (queue, "queue_ms", 1e-3)):
                        if _number(b.get(key)) is not None:
                            fam.add_metric(labels, _number(b[key]) * scale)
        yield from counters.values()
        yield from (rtt, loss, rate, up, state, idle, capacity, base, queue)
        if any_joined:
            yield joined


def parse_metrics_address(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``127.0.0.1:9100``, ``[::1]:9100``, ``localhost:9100``) -> (host, port).

    The address must be an IP literal (or ``localhost``): no name lookups at start-up, and
    binding to all interfaces (``0.0.0.0`` / ``[::]``) has to be said explicitly, because the
    metrics show client names and addresses.
    """
    usage = f"metrics address {text!r}: expected ADDR:PORT, e.g. 127.0.0.1:9100 or [::1]:9100"
    if not isinstance(text, str):
        raise ValueError(usage)
    s = text.strip()
    if s.startswith("["):
        host, sep, port = s[1:].partition("]:")
        if not sep or not host:
            raise ValueError(usage)
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"metrics address {text!r}: {host!r} in brackets is not an IPv6 address") from None
    else:
        host, sep, port = s.rpartition(":")
        if not sep or not host:
            raise ValueError(usage)
        if ":" in host:
            raise ValueError(f"metrics address {text!r}: write an IPv6 address in brackets, e.g. [::1]:9100")
        if host == "localhost":
            host = "127.0.0.1"
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"metrics address {text!r}: {host!r} is not an IP address") from None
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"metrics address {text!r}: port {port!r} is not a number in 1..65535")
    return host, int(port)


class _Conn(Conn):
    __slots__ = ("expires", "answered", "eof")

    def __init__(self, sock: socket.socket, expires: float):
        super().__init__(sock)
        self.expires = expires
        self.answered = False
        self.eof = False  # the client half-closed while its answer was still being written


class _Fixed:
    """A collector over one status snapshot (what generate_latest() is given off the loop)."""

    def __init__(self, collector: StatusCollector, snapshot: dict):
        self._collector, self._snapshot = collector, snapshot

    def collect(self) -> list:
        return self._collector.families(self._snapshot)


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


def _response(code: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
              head_only: bool = False, extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {code} {_REASONS[code]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    return head if head_only else head + body


class MetricsServer(LoopServer):
    """`GET /metrics` on ``host:port``, served from inside the shell's event loop (never blocks it).

    The loop accepts, reads the request and takes the status snapshot (``status()``
    runs in the loop, like for the control socket); turning the snapshot into text
    (about 0.5 ms per path) and writing it happen on one worker thread, which owns the
    connection from then on.  So ``status()`` must return a structure of its own (the
    shell's does: the cores build their stats afresh on each call).
    """

    MAX_REQUEST = 8192  # request line + headers
    MAX_CONNS = 32  # more at once are closed at accept
    ACCEPT_BATCH = MAX_CONNS
    MAX_PENDING = 2  # scrapes being rendered or waiting for the worker; more get a 503
    TIMEOUT = 5.0  # a connection must be done (request read, answer written) within this
    LINGER = 0.5  # after the answer: how long the worker waits for the client to close

    def __init__(
        self,
        host: str,
        port: int,
        status: Callable[[], dict],
        role: str,
        *,
        name: str = "",
        timeout: float = TIMEOUT,
    ):
        super().__init__()
        self.host = host
        self.port = port  # the bound port once started (port 0: the kernel's choice)
        self.timeout = timeout
        self.collector = StatusCollector(status, role, name)
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)
        self.scrapes = 0
        self.errors = 0
        self.busy = 0  # scrapes answered 503 (MAX_PENDING already being answered)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._worker: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._pending = 0

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def start(self, loop) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(64)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._listen(sock, loop)

    def render(self) -> bytes:
        """The metrics body, as a scrape gets it (asks ``status()`` here, in the caller's thread)."""
        return generate_latest(self.registry)

    # -- connections ---------------------------------------------------
    def _conn(self, sock: socket.socket) -> _Conn:
        return _Conn(sock, time.monotonic() + self.timeout)

    def _accept_failed(self, exc: OSError) -> None:
        log.warning("metrics: accept failed: %s", exc)

    def _read(self, c: _Conn) -> None:
        if self._conns.get(c.fd) is not c:
            return
        try:
            chunk = c.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:  # the client closed (or reset)
            if c.answered and c.out is not None and len(c.out):
                c.eof = True  # it may still read: finish the answer, but stop watching for input
                self._loop.remove_reader(c.fd)
            else:
                self._drop(c)
            return
        if c.answered:  # anything after the request is read and ignored until the client closes
            return
        c.buf += chunk
        end = c.buf.find(b"\r\n\r\n")
        if end < 0:
            end = c.buf.find(b"\n\n")
        if end < 0:
            if len(c.buf) > self.MAX_REQUEST:
                self._answer(c, 431, b"request too large\n")
            return
        if end > self.MAX_REQUEST:
            self._answer(c, 431, b"request too large\n")
            return
        self._handle(c, bytes(c.buf[:end]))

    def _handle(self, c: _Conn, head: bytes) -> None:
        line = head.split(b"\n", 1)[0].strip().decode("latin-1")
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._answer(c, 400, b"bad request\n")
            return
        method, target = parts[0], parts[1]
        path = target.split("?", 1)[0]
        if path != "/metrics":
            self._answer(c, 404, b"not found: try /metrics\n", head_only=method == "HEAD")
            return
        if method not in ("GET", "HEAD"):
            self._answer(c, 405, b"method not allowed\n", extra="Allow: GET, HEAD\r\n")
            return
        # the slot first, the snapshot only if it will be answered: a snapshot costs the loop
        # about 8 ms at 1000 tunnels, which a flood of scrapes must not make it pay for a 503
        with self._lock:
            busy = self._pending >= self.MAX_PENDING
            if not busy:
                self._pending += 1
        if busy:
            self.busy += 1
            self._answer(c, 503, b"busy: another scrape is being answered\n", head_only=method == "HEAD")
            return
        try:
            snapshot = self.collector.status()
        except Exception as exc:  # a bug in the core must not kill the daemon; say so to the scraper
            with self._lock:
                self._pending -= 1
            self._failed(exc)
            self._answer(c, 500, b"scrape failed, see the daemon's log\n", head_only=method == "HEAD")
            return
        self._release(c)
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="mptun-metrics", daemon=True)
            self._worker.start()
        self._jobs.put((c.sock, c.expires, snapshot, method == "HEAD"))

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        log.error("metrics: scrape failed: %s: %s", type(exc).__name__, exc)
        log.debug("traceback", exc_info=exc)

    # -- the worker thread: render, write, close ----------------------
    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            sock, expires, snapshot, head_only = job
            try:
                self._serve(sock, expires, snapshot, head_only)
            except Exception as exc:  # never let the worker die
                log.debug("metrics: %s: %s", type(exc).__name__, exc)
            finally:
                sock.close()
                with self._lock:
                    self._pending -= 1

    def _serve(self, sock: socket.socket, expires: float, snapshot: dict, head_only: bool) -> None:
        try:
            body = generate_latest(_Fixed(self.collector, snapshot))
        except Exception as exc:
            self._failed(exc)
            data = _response(500, b"scrape failed, see the daemon's log\n", head_only=head_only)
        else:
            self.scrapes += 1
            data = _response(200, body, CONTENT_TYPE, head_only)
        try:
            sock.setblocking(True)
            sock.settimeout(max(0.01, expires - time.monotonic()))
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            # wait a little for the client to close: closing with unread input would reset
            # the connection and could lose the answer; a client that lingers holds up the
            # next scrape for LINGER at most
            expires = min(expires, time.monotonic() + self.LINGER)
            sock.settimeout(max(0.01, expires - time.monotonic()))
            while sock.recv(4096):
                sock.settimeout(max(0.01, expires - time.monotonic()))
        except OSError:  # includes the timeout: the deadline passed
            pass

    # -- answers written from the loop (errors: small) ----------------
    def _answer(
        self, c: _Conn, code: int, body: bytes, *, content_type: str = "text/plain; charset=utf-8",
        head_only: bool = False, extra: str = "",
    ) -> None:
        c.answered = True
        c.buf = bytearray()
        c.out = memoryview(_response(code, body, content_type, head_only, extra))
        self._write(c)

    def _sent(self, c: _Conn) -> None:
        if c.eof:
            self._drop(c)
            return
        # All sent.  Half-close and wait (until the deadline at most) for the client to close:
        # closing now with unread input would reset the connection and could lose the answer.
        try:
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(c)

    def close(self, wait: float = 1.0) -> None:
        """Stop listening and drop the connections; the worker finishes what it has (at most
        ``wait`` seconds are waited for it here; it is a daemon thread)."""
        self._stop_listening()
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join(wait)
            self._worker = None
