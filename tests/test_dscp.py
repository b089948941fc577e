"""DSCP/ECN end to end: outer marks per the policy, RFC 6040 ECN, per-class scheduling, reload."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

from conftest import STREAM_PORT
from tunnel.lab.netns import wait_for
from tunnel.lab.stack import PORT, SERVER_INNER
from tunnel.lab.stream import finish_sender, start_sender

pytestmark = pytest.mark.netns
WEBRTC = Path(__file__).resolve().parent.parent / "policies" / "webrtc.toml"
EF, ECT0, CE = 0xB8, 0x02, 0x03


def _capture(mp, seconds: float):
    """Start capturing the tunnel's datagrams on every server-side link; returns a collector."""
    procs = []
    for i, link in enumerate(mp.links):
        out = mp.stack.workdir / f"capture-{i}.json"
        procs.append((mp.server.popen([sys.executable, "-m", "tunnel.lab.capture", link.a_ifname, str(PORT), str(seconds), str(out)]), out))

    def collect() -> list[list[int]]:
        seen = []
        for proc, out in procs:
            proc.wait(seconds + 10)
            seen += json.loads(out.read_text())
        return seen

    return collect


def _data(seen, min_len: int = 200):
    """(length, tos) of the datagrams big enough to be DATA of the test streams (not probes)."""
    return [(n, tos) for n, tos in seen if n >= min_len]


def test_outer_dscp_follows_the_policy_and_ecn_is_copied(multipath):
    mp = multipath(2, "duplicate")
    mp.stack.client_overrides["policy"] = str(WEBRTC)
    mp.start()
    collect = _capture(mp, 3.0)
    media = mp.stream(rate=100, count=150, size=300, tos=EF | 2)  # EF, ECT(0)
    seen = _data(collect())
    marks = {tos for _, tos in seen}
    assert marks == {EF | 2}, marks  # outer EF, inner ECN copied (RFC 6040)
    assert len(seen) >= 2 * 150 * 0.95  # duplicated: a copy on each of the two links
    assert media.lost == 0
    # bulk: unmarked traffic goes out with outer DSCP 0 (no leak), only ECN carried
    collect = _capture(mp, 3.0)
    bulk = mp.stream(rate=100, count=150, size=300, tos=0x28)  # inner AF11, Not-ECT
    seen = _data(collect())
    assert {tos for _, tos in seen} == {0}
    assert 150 * 0.95 <= len(seen) <= 150 * 1.05  # balanced: each packet once
    assert bulk.lost == 0
    classes = {c["name"]: c for c in mp.stack.client_status()["classes"]}
    assert classes["media"]["copies"] == 2 * classes["media"]["packets"] >= 300
    assert classes["default"]["copies"] == classes["default"]["packets"] >= 150


def test_without_a_policy_no_inner_dscp_leaks(multipath):
    mp = multipath(1, "duplicate").start()
    collect = _capture(mp, 2.5)
    mp.stream(rate=100, count=100, size=300, tos=EF | 1)  # EF + ECT(1)
    assert {tos for _, tos in _data(collect())} == {1}


def _mark_ce(mp, not_ect_only: bool = False) -> None:
    """Rewrite the ECN field of every tunnel datagram arriving at the server to CE."""
    rules = (
        "add table ip ce\n"
        "add chain ip ce pre { type filter hook prerouting priority -150; }\n"
        f"add rule ip ce pre udp dport {PORT} ip ecn set ce\n"
    )
    mp.nft(mp.server, rules)


def test_congestion_experienced_reaches_the_receiver(multipath):
    mp = multipath(1, "duplicate").start()
    clean = mp.stream(rate=100, count=100, tos=ECT0)
    assert clean.tos_counts == {ECT0: 100}
    _mark_ce(mp)
    marked = mp.stream(rate=100, count=100, tos=ECT0)
    assert marked.tos_counts == {CE: 100}  # the outer CE became an inner CE, checksum and all
    # a Not-ECT packet cannot carry CE: RFC 6040 drops it, and it is counted
    dropped = mp.stream(rate=100, count=50, tos=0)
    assert dropped.received == 0
    tunnel = mp.stack.server_status()["tunnels"][0]
    assert tunnel["ecn_dropped"] >= 50


def test_media_duplicated_and_bulk_balanced_at_the_same_time(multipath):
    mp = multipath(2, "duplicate")
    mp.stack.client_overrides["policy"] = str(WEBRTC)
    mp.start()
    before = {p["name"]: p["tx_packets"] for p in mp.client_paths()}
    bulk = {}

    def with_bulk():
        bulk["proc"] = start_sender(mp.client, f"{SERVER_INNER}:{STREAM_PORT + 1}", 400, 300, 800)

    media = mp.stream(rate=100, count=200, size=300, tos=EF, during=with_bulk)
    finish_sender(bulk["proc"], 30)
    assert media.lost == 0
    classes = {c["name"]: c for c in mp.stack.client_status()["classes"]}
    assert classes["media"]["packets"] >= 200 and classes["media"]["copies"] == 2 * classes["media"]["packets"]
    assert classes["default"]["packets"] >= 800 and classes["default"]["copies"] == classes["default"]["packets"]
    sent = {p["name"]: p["tx_packets"] - before[p["name"]] for p in mp.client_paths()}
    # each path carried every media packet; the bulk went once, on the path where it arrived
    # first (at 1 Mbit/s on idle equal links: mostly one of them)
    assert all(n >= 200 for n in sent.values())
    assert 2 * 200 + 800 <= sum(sent.values()) <= 2 * 200 + 800 + 400  # (+ probes and FEEDBACK)


def test_policy_reload_on_sighup_keeps_the_tunnel(multipath, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(WEBRTC.read_text())
    mp = multipath(1, "duplicate")
    mp.stack.client_overrides["policy"] = str(policy)
    mp.start()
    policy.write_text('[[class]]\nname = "x"\nmatch.dscp = ["NOPE"]\n')
    mp.stack.client_proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "policy not reloaded" in mp.stack.client_log.read_text(), 5, message="no reload error logged")
    assert "unknown DSCP name 'NOPE'" in mp.stack.client_log.read_text()
    assert [c["name"] for c in mp.stack.client_status()["classes"]] == ["media", "media-unmarked", "signalling", "default"]
    policy.write_text('[[class]]\nname = "all"\nmode = "duplicate"\nouter_dscp = "CS1"\n')
    mp.stack.client_proc.send_signal(signal.SIGHUP)
    wait_for(lambda: [c["name"] for c in mp.stack.client_status()["classes"]] == ["all"], 5, message="not reloaded")
    assert mp.client.ping(SERVER_INNER)
    assert mp.stack.client_log.read_text().count("tunnel up:") == 1
