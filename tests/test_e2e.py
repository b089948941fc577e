"""End to end: real `mptun server` and `mptun client` processes in network namespaces."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunnel.app import certs
from tunnel.lab.netns import wait_for
from tunnel.lab.stack import PORT, SERVER_INNER, mptun_argv

pytestmark = pytest.mark.netns
MANGLER = Path(__file__).with_name("udp_mangler.py")


def _iperf3(stack, *extra: str) -> dict:
    server = stack.server_host.popen(["iperf3", "-s", "-1", "-B", SERVER_INNER], stdout=subprocess.DEVNULL)
    wait_for(lambda: stack.server_host.is_listening(5201), 5, message="iperf3 server did not start")
    res = stack.client_host.run(["iperf3", "-c", SERVER_INNER, "-t", "2", "-J", *extra], timeout=30)
    server.wait(10)
    return json.loads(res.stdout)


def test_ping_and_iperf3_tcp_through_the_tunnel(tunnel_stack):
    tunnel_stack.start()
    assert tunnel_stack.client_inner() == "100.64.0.2"
    before = tunnel_stack.server_status()["tunnels"][0]["delivered"]
    up = _iperf3(tunnel_stack)
    down = _iperf3(tunnel_stack, "-R")
    for result in (up, down):
        assert result["end"]["sum_received"]["bits_per_second"] > 10e6
    status = tunnel_stack.server_status()
    tunnel = status["tunnels"][0]
    # the bytes really went through the tunnel: thousands of DATA frames delivered, none spoofed
    assert tunnel["delivered"] - before > 1000
    assert tunnel["spoofed"] == 0
    assert tunnel["paths"][0]["cipher"].startswith("ECDHE-")
    client = tunnel_stack.client_status()
    assert client["state"] == "up" and client["delivered"] > 1000


def test_client_with_certificate_from_another_ca_is_refused(tunnel_stack, tmp_path):
    other = tmp_path / "other"
    certs.create_ca(other, name="Evil CA")
    certs.issue_client(other, "mallory")
    for ext in ("crt", "key"):
        (tunnel_stack.workdir / f"mallory.{ext}").write_bytes((other / f"mallory.{ext}").read_bytes())
        os.chmod(tunnel_stack.workdir / f"mallory.{ext}", 0o600)
    tunnel_stack.client_name = "mallory"
    tunnel_stack.start_server()
    tunnel_stack.start_client()
    wait_for(
        lambda: "refused" in tunnel_stack.server_log.read_text(),
        10,
        message="server did not log the refusal",
    )
    line = next(l for l in tunnel_stack.server_log.read_text().splitlines() if "refused" in l)
    assert "198.18.0.2" in line and "mallory" in line and "unable to get local issuer certificate" in line
    assert tunnel_stack.server_status()["tunnels"] == []
    assert "tunnel up" not in tunnel_stack.client_log.read_text()


def test_client_refuses_a_server_with_another_name(tunnel_stack):
    tunnel_stack.client_overrides["server_name"] = "not-our-server"
    tunnel_stack.start_server()
    tunnel_stack.start_client()
    wait_for(
        lambda: "not the expected server_name" in tunnel_stack.client_log.read_text(),
        10,
        message="client did not log why it refused the server",
    )
    log = tunnel_stack.client_log.read_text()
    assert "'not-our-server'" in log and "mptun-server" in log
    assert "tunnel up" not in log
    assert tunnel_stack.server_status()["tunnels"] == []


def test_flipped_byte_on_the_wire_is_dropped_and_the_tunnel_stays(tunnel_stack):
    """A relay in the server's namespace flips a bit in every 4th client->server record."""
    relay_port = PORT + 1
    count_file = tunnel_stack.workdir / "flipped"
    tunnel_stack.server_host.popen(
        [sys.executable, str(MANGLER), tunnel_stack.server_addr, str(relay_port),
         tunnel_stack.server_addr, str(PORT), "4", str(count_file), "500"]
    )
    wait_for(lambda: tunnel_stack.server_host.is_listening(relay_port, udp=True), 5, message="relay not up")
    tunnel_stack.client_overrides["server"] = f"{tunnel_stack.server_addr}:{relay_port}"
    # one session throughout: flipped probes must not look like a dead path, or the client would
    # replace its session (NAT rebinding) and the new handshake's flipped records go uncounted
    tunnel_stack.client_overrides["dead_interval"] = 1.5
    tunnel_stack.start()
    # 600-byte echos: their records are the only ones of 500 bytes or more, so the relay's count of
    # big flipped records is the number of echo requests that never reached the server
    replies = tunnel_stack.client_host.echo_count(SERVER_INNER, 24, interval=0.1, size=600)
    flipped, flipped_echos = map(int, count_file.read_text().split())
    assert flipped >= 5
    assert replies == 24 - flipped_echos  # every intact request answered, every flipped one lost
    # every flipped record was dropped by DTLS and counted; none reached the TUN
    tunnel = tunnel_stack.server_status()["tunnels"][0]
    assert len(tunnel["paths"]) == 1 and tunnel["paths"][0]["dtls_dropped"] == flipped
    assert tunnel["dtls_dropped"] == flipped  # the tunnel's count (kept across replaced paths)
    # same tunnel throughout: connected once, never gone (a path may be judged down for a moment on a
    # loaded machine: flipped probes look like loss, but the tunnel does not notice)
    server_log = tunnel_stack.server_log.read_text()
    assert server_log.count("connected from") == 1 and " gone: " not in server_log
    wait_for(lambda: tunnel_stack.client_host.ping(SERVER_INNER, timeout=0.3), 5, message="tunnel broke")


def test_junk_datagrams_are_counted_and_dropped(tunnel_stack):
    tunnel_stack.start()
    junk = (
        "import socket,os\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        f"a=('{tunnel_stack.server_addr}',{PORT})\n"
        "for i in range(200): s.sendto(os.urandom(i % 90 + 1), a)\n"
        "for i in range(50): s.sendto(bytes([22,254,253])+os.urandom(60), a)\n"
        "for i in range(50): s.sendto(bytes([23,254,253])+os.urandom(60), a)\n"
    )
    tunnel_stack.client_host.run([sys.executable, "-c", junk])
    wait_for(
        lambda: tunnel_stack.server_status()["counters"]["junk"] >= 250,
        5,
        message="junk not counted",
    )
    status = tunnel_stack.server_status()
    assert len(status["tunnels"]) == 1 and status["handshaking"] == 0  # no state kept for junk
    assert "Traceback" not in tunnel_stack.server_log.read_text()
    assert tunnel_stack.client_host.ping(SERVER_INNER)


def test_sigterm_closes_the_tunnel_and_removes_the_tun_device(tunnel_stack):
    tunnel_stack.start()
    tunnel_stack.server_proc.send_signal(signal.SIGTERM)
    assert tunnel_stack.server_proc.wait(10) == 0
    wait_for(
        lambda: "server closed the path: server shutting down" in tunnel_stack.client_log.read_text(),
        5,
        message="client was not told",
    )
    res = tunnel_stack.server_host.run(["ip", "link", "show", "mptun0"], check=False)
    assert res.returncode != 0  # the TUN device is gone
    tunnel_stack.client_proc.send_signal(signal.SIGINT)
    assert tunnel_stack.client_proc.wait(10) == 0
    assert tunnel_stack.client_host.run(["ip", "link", "show", "mptun0"], check=False).returncode != 0


def test_client_reconnects_after_a_server_restart(tunnel_stack):
    tunnel_stack.start()
    tunnel_stack.server_proc.kill()  # no CLOSE: the client must notice by itself
    tunnel_stack.server_proc.wait(5)
    tunnel_stack.start_server()
    tunnel_stack.wait_up(timeout=15)
    assert tunnel_stack.client_inner() == "100.64.0.2"
    assert len(tunnel_stack.server_status()["tunnels"]) == 1


def _reassembly_requests(host) -> int:
    lines = host.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
    ip = [l.split() for l in lines if l.startswith("Ip:")]
    return int(ip[1][ip[0].index("ReasmReqds")])


def test_inner_mtu_follows_the_underlay_and_nothing_fragments(lab, tmp_path):
    from tunnel.lab.stack import TunnelStack

    server, client = lab.add_host("srv"), lab.add_host("cli")
    link = lab.link(server, client, "198.18.0.0/30", mtu=1400)
    stack = TunnelStack(server, client, link.a_addr, workdir=tmp_path / "stack")
    stack.server_overrides["routes"] = ["198.19.77.0/24"]
    try:
        stack.start()
        expected = 1400 - 20 - 8 - 37 - 13  # IPv4, UDP, DTLS AEAD record, largest DATA header (DATA_ORDERED)
        for host in (server, client):
            assert int(host.run(["cat", "/sys/class/net/mptun0/mtu"]).stdout) == expected
        # the pushed route points into the tunnel on the client
        assert "dev mptun0" in client.run(["ip", "route", "show", "198.19.77.0/24"]).stdout
        before = _reassembly_requests(server) + _reassembly_requests(client)
        _iperf3(stack)
        _iperf3(stack, "-R")
        assert _reassembly_requests(server) + _reassembly_requests(client) == before
    finally:
        stack.stop()


def _wakeups_and_cpu(pid: int) -> tuple[int, float]:
    """Voluntary context switches (each one a sleep, so a wakeup) and CPU seconds of ``pid``."""
    status = Path(f"/proc/{pid}/status").read_text()
    switches = int(next(l for l in status.splitlines() if l.startswith("voluntary_ctxt_switches")).split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return switches, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_tunnel_wakes_only_to_probe_slowly(tunnel_stack):
    """No traffic: after a second each end probes every idle_probe_interval (0.5 s), and
    its timer follows those deadlines instead of a 20 ms tick.  Each end wakes for its own
    probe, the answer and the other end's probe: a few times a second, where the tick
    alone made 50 (with it and 0.1 s probes: ~67 in all)."""
    tunnel_stack.start()
    wait_for(lambda: tunnel_stack.client_status()["paths"][0].get("probing") == "idle", 10,
             message="the client's path never went idle")
    wait_for(lambda: tunnel_stack.server_status()["tunnels"][0]["paths"][0].get("probing") == "idle", 10,
             message="the server's path never went idle")
    pids = {"client": tunnel_stack.client_proc.pid, "server": tunnel_stack.server_proc.pid}
    before = {k: _wakeups_and_cpu(p) for k, p in pids.items()}
    probes0 = tunnel_stack.client_status()["paths"][0]["tx_packets"]
    t0 = time.monotonic()
    time.sleep(4.0)  # the measurement window itself (both ends are idle: waited for above)
    after = {k: _wakeups_and_cpu(p) for k, p in pids.items()}
    seconds = time.monotonic() - t0
    status = tunnel_stack.client_status()
    assert status["state"] == "up" and status["paths"][0]["state"] == "up"  # still alive
    sent = status["paths"][0]["tx_packets"] - probes0  # PINGs and PONGs: 2 + 2 a second
    assert 2 * seconds <= sent <= 5 * seconds, sent
    for side in pids:
        rate = (after[side][0] - before[side][0]) / seconds
        cpu = 100 * (after[side][1] - before[side][1]) / seconds
        print(f"idle {side}: {rate:.1f} wakeups/s, {cpu:.2f} % CPU, client sent {sent / seconds:.1f} datagrams/s")
        assert rate < 15, f"{side}: {rate:.1f} wakeups/s"
    # the first packet brings fast probing back
    send_one = f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ({SERVER_INNER!r}, 9))"
    tunnel_stack.client_host.run([sys.executable, "-c", send_one], timeout=10)
    wait_for(lambda: tunnel_stack.client_status()["paths"][0]["probing"] == "active", 2,
             message="traffic did not bring fast probing back")


def test_a_stopped_client_reports_its_stall_and_the_tunnel_goes_on(tunnel_stack):
    """SIGSTOP is what a busy machine or a taken vCPU does to mptun: the process is not
    run.  The client counts the late wakeup (status, /metrics) and logs it once; a
    stall is not mistaken for its own busy time, and the tunnel carries on."""
    tunnel_stack.start()
    before = tunnel_stack.client_status()["loop"]
    pid = tunnel_stack.client_proc.pid
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: time.monotonic() - t0 >= 1.0, 3)
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: tunnel_stack.client_status()["loop"]["stalls"] > before["stalls"], 5,
             message="the client did not count its stall")
    loop = tunnel_stack.client_status()["loop"]
    t2 = time.monotonic()
    late = [ms for at, ms in loop["recent_stalls"] if t0 < at <= t2]
    # stopped 1 s; its next timer was at most an idle probe interval (0.5 s) away; and no stall
    # can be longer than from the SIGSTOP to the status that showed it
    assert late and 450 <= max(late) <= (t2 - t0) * 1e3, loop
    assert loop["stall_longest_ms"] >= max(late), loop
    assert loop["busy_longest_ms"] < 450, loop  # the stop was not its own time
    shown = subprocess.run(mptun_argv("status", "-s", str(tunnel_stack.client_socket)), capture_output=True, text=True)
    assert re.search(r"stalls [1-9]\d* \(longest \d+ ms", shown.stdout), shown
    wait_for(lambda: "was not run for" in tunnel_stack.client_log.read_text(), 5,
             message="the stall was not logged")
    # still a tunnel: the path recovers (it may have gone down while the client was stopped)
    wait_for(lambda: tunnel_stack.client_status()["paths"][0]["state"] == "up", 10,
             message="the path did not come back after the stall")
    assert tunnel_stack.client_status()["state"] == "up"
