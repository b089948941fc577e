"""One server, many clients: real processes, one namespace per client, two paths each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tunnel.app import control
from tunnel.lab.netns import wait_for
from tunnel.lab.stack import PORT, SERVER_INNER, SERVER_NAME, make_pki, mptun_argv, write_toml

pytestmark = pytest.mark.netns


class Fleet:
    """A server namespace and N client namespaces, each client with two /30 links to the server."""

    def __init__(self, lab, workdir: Path, n: int, **server_opts):
        self.lab, self.workdir, self.n = lab, workdir, n
        self.names = [f"c{i:02d}" for i in range(1, n + 1)]
        make_pki(workdir, clients=self.names)
        self.server = lab.add_host("srv")
        self.clients, self.procs = {}, {}
        for i, name in enumerate(self.names, start=1):
            host = lab.add_host(name)
            lab.link(self.server, host, f"198.18.{i}.0/30")
            lab.link(self.server, host, f"198.18.{i}.4/30")
            self.clients[name] = host
        self.server_opts = server_opts

    def start_server(self) -> None:
        table = {
            "listen": f"0.0.0.0:{PORT}",
            "certificate": f"{SERVER_NAME}.crt",
            "key": f"{SERVER_NAME}.key",
            "ca": "ca.crt",
            "address": f"{SERVER_INNER}/24",
            "control": str(self.workdir / "server.sock"),
            "log_level": "debug",
            **self.server_opts,
        }
        cfg = write_toml(self.workdir / "server.toml", {"server": table})
        self.server_log = self.workdir / "server.log"
        self.server_proc = self.server.popen(mptun_argv("server", "-c", str(cfg)), stderr=open(self.server_log, "ab"))
        wait_for(lambda: "listening on" in self.server_log.read_text() and (self.workdir / "server.sock").exists(),
                 10, message="server did not start")  # the log line comes before the control socket

    def start_client(self, name: str) -> None:
        i = self.names.index(name) + 1
        table = {
            "server": [f"198.18.{i}.1:{PORT}", f"198.18.{i}.5:{PORT}"],
            "server_name": SERVER_NAME,
            "certificate": f"{name}.crt",
            "key": f"{name}.key",
            "ca": "ca.crt",
            "control": str(self.workdir / f"{name}.sock"),
            "log_level": "debug",
        }
        cfg = write_toml(self.workdir / f"{name}.toml", {"client": table})
        log = open(self.workdir / f"{name}.log", "ab")
        self.procs[name] = self.clients[name].popen(mptun_argv("client", "-c", str(cfg)), stderr=log)

    def status(self) -> dict:
        return control.query(self.workdir / "server.sock")

    def client_status(self, name: str) -> dict:
        return control.query(self.workdir / f"{name}.sock")

    def address(self, name: str) -> str:
        return self.client_status(name)["address"].split("/")[0]

    def wait_all(self, timeout: float = 60.0) -> None:
        def ready():
            st = self.status()
            return len(st["tunnels"]) == self.n and all(len(t["paths"]) == 2 for t in st["tunnels"])

        wait_for(ready, timeout, interval=0.5, message=f"not all {self.n} clients have two paths: {self.status()}")

    def stop(self) -> None:
        for proc in list(self.procs.values()) + [getattr(self, "server_proc", None)]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in list(self.procs.values()) + [getattr(self, "server_proc", None)]:
            if proc is not None:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


@pytest.fixture
def fleet(lab, tmp_path):
    made = []

    def make(n: int, **opts) -> Fleet:
        f = Fleet(lab, tmp_path, n, **opts)
        made.append(f)
        return f

    yield make
    for f in made:
        f.stop()


def test_twenty_clients_with_two_paths_each(fleet):
    f = fleet(20, metrics="127.0.0.1:9109")
    f.start_server()
    for name in f.names:
        f.start_client(name)
    f.wait_all()
    st = f.status()
    assert sum(len(t["paths"]) for t in st["tunnels"]) == 40
    assert len({t["address"] for t in st["tunnels"]}) == 20
    for name in f.names:
        assert f.clients[name].ping(SERVER_INNER, timeout=2.0), name
    # client-to-client traffic through the server is off by default
    assert not f.clients["c01"].ping(f.address("c02"), timeout=0.5)
    assert f.status()["counters"]["client_to_client_blocked"] >= 1
    out = subprocess.run(mptun_argv("status", "-s", str(f.workdir / "server.sock")), capture_output=True, text=True)
    assert out.stdout.count("client c") == 20 and out.stdout.count("    path ") == 40
    # the Prometheus endpoint serves the same numbers
    scrape = f.server.run([sys.executable, "-c",
                           "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9109/metrics').read().decode())"])
    from prometheus_client.parser import text_string_to_metric_families

    families = {fam.name: fam for fam in text_string_to_metric_families(scrape.stdout)}
    assert families["mptun_tunnels"].samples[0].value == 20
    up = [s for s in families["mptun_path_up"].samples if s.value == 1]
    assert len(up) == 40 and {s.labels["client"] for s in up} == set(f.names)


def test_client_to_client_when_enabled_and_restarted_client_keeps_its_address(fleet):
    f = fleet(2, client_to_client=True)
    f.start_server()
    for name in f.names:
        f.start_client(name)
    f.wait_all(30)
    assert f.clients["c01"].ping(f.address("c02"), timeout=2.0)
    before = f.address("c01")
    f.procs["c01"].kill()  # no CLOSE: the server still has the old tunnel when the new process comes
    f.procs["c01"].wait()
    f.start_client("c01")
    wait_for(lambda: _up(f, "c01"), 20, message="c01 did not come back")
    assert f.address("c01") == before
    assert "replaces its previous tunnel" in f.server_log.read_text()


def _up(f: Fleet, name: str) -> bool:
    try:
        return f.client_status(name)["state"] == "up"
    except OSError:
        return False


FORGE = """
import socket, struct, sys
src, dst, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL: we write the header
for i in range(n):
    payload = b"forged%03d" % i
    udp = struct.pack(">HHHH", 40000, port, 8 + len(payload), 0) + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    s.sendto(ip + udp, (dst, 0))
"""


def test_forged_inner_source_gets_nothing_through(fleet):
    f = fleet(1)
    f.start_server()
    f.start_client("c01")
    f.wait_all(30)
    recv = f.server.popen([sys.executable, "-c",
                           "import socket,sys\n"
                           "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(('0.0.0.0', 6000)); s.settimeout(3)\n"
                           "n=0\n"
                           "try:\n"
                           "    while True: s.recv(100); n+=1\n"
                           "except socket.timeout: pass\n"
                           "print(n)"], stdout=subprocess.PIPE, text=True)
    wait_for(lambda: f.server.is_listening(6000, udp=True), 5, message="receiver")
    f.clients["c01"].run([sys.executable, "-c", FORGE, "100.64.0.99", SERVER_INNER, "6000", "20"])
    f.clients["c01"].run([sys.executable, "-c", FORGE, f.address("c01"), SERVER_INNER, "6000", "5"])
    out, _ = recv.communicate(timeout=15)
    assert int(out) == 5  # only the honest ones
    assert f.status()["tunnels"][0]["spoofed"] == 20


def test_pending_route_delivers_the_queue_in_order(fleet):
    f = fleet(1, pending_expiry=30.0, timeout=1.0, dead_interval=0.3)
    f.start_server()
    f.start_client("c01")
    f.wait_all(30)
    client = f.clients["c01"]
    addr = f.address("c01")
    block = f.workdir / "block.rules"
    block.write_text(
        "add table inet blk\n"
        "add chain inet blk in { type filter hook input priority 0; }\n"
        "add chain inet blk out { type filter hook output priority 0; }\n"
        f"add rule inet blk in udp sport {PORT} drop\n"
        f"add rule inet blk out udp dport {PORT} drop\n"
    )
    client.run(["nft", "-f", str(block)])
    # the server keeps the silent path's session (it would work again at once), but once it has been
    # silent for the timeout (1 s here) the tunnel counts as having no path: packets wait
    wait_for(lambda: f.status()["tunnels"] and all(p["state"] == "down" and p["silent_s"] >= 1.2
                                                   for p in f.status()["tunnels"][0]["paths"]), 15,
             message="the server's paths did not fall silent")
    recv = client.popen([sys.executable, "-c",
                         "import socket\n"
                         "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(('0.0.0.0', 6001)); s.settimeout(20)\n"
                         "got=[]\n"
                         "try:\n"
                         "    while len(got) < 5: got.append(s.recv(100).decode())\n"
                         "except socket.timeout: pass\n"
                         "print(','.join(got))"], stdout=subprocess.PIPE, text=True)
    wait_for(lambda: client.is_listening(6001, udp=True), 5, message="receiver")
    send = ("import socket\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            f"for i in range(5): s.sendto(b'p%d' % i, ('{addr}', 6001))\n")
    f.server.run([sys.executable, "-c", send])
    counters = f.status()["counters"]
    assert counters["pending_dropped"] == 2  # a queue of 3
    client.run(["nft", "delete", "table", "inet", "blk"])
    out, _ = recv.communicate(timeout=30)
    assert out.strip() == "p0,p1,p2"
