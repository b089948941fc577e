"""Least privilege: `user = "nobody"` makes the daemons switch user after set-up and
keep only what their role still uses (the client CAP_NET_ADMIN and CAP_NET_RAW, the
server nothing); the tunnel keeps working (TUN created by the client after the drop on
the /dev/net/tun descriptor opened before it, routes on CONFIG, a path hot-plugged, a
reconnect), whether /dev/net/tun is mode 0600 or 0666."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tunnel.app import cli, privs
from tunnel.lab import stack as lab_stack
from tunnel.lab.netns import wait_for
from tunnel.lab.procs import tail
from tunnel.lab.stack import SERVER_INNER

NET_ADMIN_RAW = (1 << 12) | (1 << 13)
NONE = 0

# Run a command in a private mount namespace whose /dev/net is a fresh tmpfs holding one
# /dev/net/tun node (char 10,200) of the mode given first: the host's own node and mode
# are not touched and do not matter.
_WITH_TUN_MODE = (
    'mode="$1"; shift; mount -t tmpfs -o mode=0755 mptun-test-devnet /dev/net'
    ' && mknod -m "$mode" /dev/net/tun c 10 200 && exec "$@"'
)


def with_tun_mode(mode: int, argv: list[str]) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private",
            "sh", "-c", _WITH_TUN_MODE, "sh", f"{mode:04o}", *argv]


PACKAGING = Path(__file__).resolve().parent.parent / "packaging"
UNITS = {"server": "mptun-server.service", "client": "mptun-client@.service"}


def unit_bounding_set(role: str) -> str:
    """The unit's CapabilityBoundingSet= in setpriv's terms (-all,+net_admin,...)."""
    for line in (PACKAGING / UNITS[role]).read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            caps = line.split("=", 1)[1].split()
            return ",".join(["-all"] + ["+" + c.lower().removeprefix("cap_") for c in caps])
    raise AssertionError(f"{UNITS[role]} has no CapabilityBoundingSet=")


def like_the_unit(role: str, argv: list[str]) -> list[str]:
    """``argv`` as the shipped unit runs it: root limited to the unit's bounding set,
    nothing inheritable, no_new_privs (CapabilityBoundingSet=, NoNewPrivileges=)."""
    return ["setpriv", "--bounding-set", unit_bounding_set(role), "--inh-caps", "-all", "--no-new-privs", "--", *argv]


def status_of(pid: int) -> dict:
    return privs.proc_status(pid)


def tasks_of(pid: int) -> list[dict]:
    return [privs.proc_status(f"{pid}/task/{t}") for t in os.listdir(f"/proc/{pid}/task")]


def assert_dropped(pid: int, uid: int, gid: int, caps: int = NET_ADMIN_RAW) -> None:
    for st in tasks_of(pid):  # every thread: capabilities are per thread
        assert st["Uid"].split() == [str(uid)] * 4, st["Uid"]
        assert st["Gid"].split() == [str(gid)] * 4, st["Gid"]
        assert int(st["CapEff"], 16) == caps, st["CapEff"]
        assert int(st["CapPrm"], 16) == caps, st["CapPrm"]
        assert int(st["CapInh"], 16) == 0 and int(st["CapAmb"], 16) == 0
        assert int(st["CapBnd"], 16) == caps, st["CapBnd"]
        assert st["NoNewPrivs"] == "1"


@pytest.mark.netns
@pytest.mark.parametrize("tun_mode, unit", [(0o600, False), (0o666, False), (0o600, True)],
                         ids=["tun0600", "tun0666", "unit-tun0600"])
def test_server_and_client_drop_to_nobody_and_the_tunnel_works(multipath, monkeypatch, tun_mode, unit):
    nobody = pwd.getpwnam("nobody")

    def argv(*args: str) -> list[str]:
        daemon = [sys.executable, "-m", "tunnel", *args]
        return with_tun_mode(tun_mode, like_the_unit(args[0], daemon) if unit else daemon)

    # both daemons see a /dev/net/tun of mode tun_mode (nobody cannot open a 0600 one);
    # unit: root limited as packaging/*.service limit it (their `--user mptun` is user = "nobody" here)
    monkeypatch.setattr(lab_stack, "mptun_argv", argv)
    mp = multipath(2, "duplicate")
    seen = mp.client.run(with_tun_mode(tun_mode, ["stat", "-c", "%a %t:%T", "/dev/net/tun"])).stdout.split()
    assert seen == [f"{tun_mode:o}", "a:c8"]
    mp.stack.server_overrides["user"] = "nobody"
    mp.stack.client_overrides["user"] = "nobody"
    mp.start()
    for proc, log, caps, names in ((mp.stack.server_proc, mp.stack.server_log, NONE, "capabilities none"),
                                   (mp.stack.client_proc, mp.stack.client_log, NET_ADMIN_RAW,
                                    "capabilities cap_net_admin,cap_net_raw")):
        wait_for(lambda: "privileges dropped" in log.read_text(), 10, message=tail(log))
        line = next(l for l in log.read_text().splitlines() if "privileges dropped" in l)
        assert "user nobody (uid 65534" in line and names in line
        assert_dropped(proc.pid, nobody.pw_uid, nobody.pw_gid, caps)
    client_text = mp.stack.client_log.read_text()
    # the client made its TUN and set address and routes after the drop
    assert client_text.index("privileges dropped") < client_text.index("tunnel up:")
    assert mp.client.ping(SERVER_INNER)
    # a third interface appears: its socket needs SO_BINDTODEVICE (CAP_NET_RAW)
    link = mp.add_link(2)
    mp.links.append(link)
    mp.wait_paths(3, timeout=10)
    assert mp.client.ping(SERVER_INNER)
    # the server restarts (as root, dropping again): the client reconnects and reconfigures
    def tun_index() -> str:
        return mp.client.run(["cat", "/sys/class/net/mptun0/ifindex"]).stdout.strip()

    index_before = tun_index()
    mp.stack.server_proc.send_signal(signal.SIGTERM)
    assert mp.stack.server_proc.wait(10) == 0  # clean stop as nobody (TUN closed, control socket left)
    assert "mptun0" not in mp.server.run(["ip", "-o", "link"]).stdout
    mp.stack.start_server()
    wait_for(lambda: mp.client.ping(SERVER_INNER, timeout=0.5), 20,
             message=f"no reconnect; client log:\n{tail(mp.stack.client_log)}")
    assert_dropped(mp.stack.client_proc.pid, nobody.pw_uid, nobody.pw_gid)
    wait_for(lambda: "privileges dropped" in mp.stack.server_log.read_text().split("stopped")[-1], 10,
             message=tail(mp.stack.server_log))
    assert_dropped(mp.stack.server_proc.pid, nobody.pw_uid, nobody.pw_gid, NONE)
    # the client kept its TUN across the reconnect (made once, on the descriptor opened at start)
    assert tun_index() == index_before
    for log in (mp.stack.server_log, mp.stack.client_log):
        assert "Traceback" not in log.read_text()
    # a clean stop as nobody: the TUN device is removed, exit status 0
    mp.stack.client_proc.send_signal(signal.SIGTERM)
    assert mp.stack.client_proc.wait(10) == 0
    wait_for(lambda: "mptun0" not in mp.client.run(["ip", "-o", "link"]).stdout, 5,
             message="client TUN still there")
    assert "Traceback" not in mp.stack.client_log.read_text()


def test_switching_user_needs_root(monkeypatch):
    root, nobody = privs.resolve("root"), privs.resolve("nobody")
    assert (root.uid, root.gid) == (0, 0) and nobody.uid == 65534
    monkeypatch.setattr(privs.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(privs.os, "getegid", lambda: 1000)
    with pytest.raises(privs.PrivilegeError,
                       match=r"switching to user nobody \(uid 65534, gid 65534\) needs mptun to be started as root "
                             r"\(it runs as uid 1000\)"):
        privs.check(nobody)
    with pytest.raises(privs.PrivilegeError, match="needs mptun to be started as root"):
        privs.drop(nobody)
    # already that user (systemd's User=): nothing to do, not an error
    monkeypatch.setattr(privs.os, "geteuid", lambda: 65534)
    monkeypatch.setattr(privs.os, "getegid", lambda: 65534)
    assert privs.check(nobody) is False
    assert "privileges unchanged" in privs.drop(nobody)
    with pytest.raises(privs.PrivilegeError, match="no such user"):
        privs.resolve("no-such-user-xyz")


def test_unknown_user_or_group_is_a_config_error(tmp_path, capsys):
    from tunnel.app.config import ConfigError, load_client_config
    from tunnel.lab.stack import make_pki, write_toml

    make_pki(tmp_path)
    base = {"server": "198.18.0.1:4433", "server_name": "mptun-server", "certificate": "alice.crt",
            "key": "alice.key", "ca": "ca.crt"}
    cfg = write_toml(tmp_path / "c.toml", {"client": {**base, "user": "no-such-user-xyz"}})
    with pytest.raises(ConfigError, match=r"c.toml: \[client\] user: no such user 'no-such-user-xyz'"):
        load_client_config(cfg)
    cfg = write_toml(tmp_path / "c.toml", {"client": {**base, "user": "nobody", "group": "no-such-group-xyz"}})
    with pytest.raises(ConfigError, match=r"\[client\] group: no such group"):
        load_client_config(cfg)
    cfg = write_toml(tmp_path / "c.toml", {"client": {**base, "group": "nogroup"}})
    with pytest.raises(ConfigError, match=r"\[client\] group: needs user too"):
        load_client_config(cfg)
    cfg = write_toml(tmp_path / "c.toml", {"client": {**base, "user": "nobody"}})
    assert load_client_config(cfg).user == "nobody"
    assert cli.main(["client", "-c", str(cfg), "--group", "nogroup"]) == 2
    assert "--group needs --user" in capsys.readouterr().err
    assert cli.main(["client", "-c", str(cfg), "--user", "no-such-user-xyz", "--check-config"]) == 2
    assert "no such user 'no-such-user-xyz'" in capsys.readouterr().err


_NARROW = """
import logging, sys
from tunnel.app import privs
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
privs.after_setup(None, getattr(privs, sys.argv[1]), logging.getLogger("t"))
st = privs.proc_status()
print(st["Uid"].split()[1], st["CapEff"], st["CapPrm"], st["CapInh"], st["CapAmb"], st["NoNewPrivs"])
"""


@pytest.mark.parametrize("keep, left, said", [
    ("SERVER_KEEP", NONE, "capabilities none"),
    ("CLIENT_KEEP", NET_ADMIN_RAW, "capabilities cap_net_admin,cap_net_raw"),
], ids=["server", "client"])
def test_started_unprivileged_with_capabilities_keeps_only_its_roles(keep, left, said):
    """Started as an unprivileged user with ambient capabilities (a unit with User= and
    AmbientCapabilities=): after set-up each role keeps only what it uses."""
    granted = "+net_admin,+net_raw,+net_bind_service"
    res = subprocess.run(
        ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
         "--inh-caps", granted, "--ambient-caps", granted, "--",
         sys.executable, "-c", _NARROW, keep],
        capture_output=True, text=True, timeout=30, cwd=Path(__file__).resolve().parent.parent,
    )
    assert res.returncode == 0, res.stderr
    said_line, caps_line = res.stdout.splitlines()[-2:]
    assert said_line == f"privileges dropped: still uid 65534, {said}"
    uid, eff, prm, inh, amb, nnp = caps_line.split()
    assert uid == "65534"
    assert (int(eff, 16), int(prm, 16), int(inh, 16), int(amb, 16), nnp) == (left, left, 0, 0, "1")
