"""Least privilege: `user = "nobody"` makes the daemons switch user after set-up and
keep exactly CAP_NET_ADMIN and CAP_NET_RAW; the tunnel keeps working (TUN created by
the client after the drop, routes on CONFIG, a path hot-plugged, a reconnect)."""

from __future__ import annotations

import os
import pwd
import signal

import pytest

from tunnel import cli, privs
from tunnel.lab.netns import wait_for
from tunnel.lab.procs import tail
from tunnel.lab.stack import SERVER_INNER

NET_ADMIN_RAW = (1 << 12) | (1 << 13)


def status_of(pid: int) -> dict:
    return privs.proc_status(pid)


def tasks_of(pid: int) -> list[dict]:
    return [privs.proc_status(f"{pid}/task/{t}") for t in os.listdir(f"/proc/{pid}/task")]


def assert_dropped(pid: int, uid: int, gid: int) -> None:
    for st in tasks_of(pid):  # every thread: capabilities are per thread
        assert st["Uid"].split() == [str(uid)] * 4, st["Uid"]
        assert st["Gid"].split() == [str(gid)] * 4, st["Gid"]
        assert int(st["CapEff"], 16) == NET_ADMIN_RAW, st["CapEff"]
        assert int(st["CapPrm"], 16) == NET_ADMIN_RAW, st["CapPrm"]
        assert int(st["CapInh"], 16) == 0 and int(st["CapAmb"], 16) == 0
        assert int(st["CapBnd"], 16) == NET_ADMIN_RAW, st["CapBnd"]
        assert st["NoNewPrivs"] == "1"


@pytest.mark.netns
def test_server_and_client_drop_to_nobody_and_the_tunnel_works(multipath):
    nobody = pwd.getpwnam("nobody")
    mp = multipath(2, "duplicate")
    mp.stack.server_overrides["user"] = "nobody"
    mp.stack.client_overrides["user"] = "nobody"
    mp.start()
    for proc, log in ((mp.stack.server_proc, mp.stack.server_log), (mp.stack.client_proc, mp.stack.client_log)):
        wait_for(lambda: "privileges dropped" in log.read_text(), 10, message=tail(log))
        line = next(l for l in log.read_text().splitlines() if "privileges dropped" in l)
        assert "user nobody (uid 65534" in line and "cap_net_admin,cap_net_raw" in line
        assert_dropped(proc.pid, nobody.pw_uid, nobody.pw_gid)
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
    mp.stack.server_proc.send_signal(signal.SIGTERM)
    assert mp.stack.server_proc.wait(10) == 0  # clean stop as nobody (TUN closed, control socket left)
    assert "mptun0" not in mp.server.run(["ip", "-o", "link"]).stdout
    mp.stack.start_server()
    wait_for(lambda: mp.client.ping(SERVER_INNER, timeout=0.5), 20,
             message=f"no reconnect; client log:\n{tail(mp.stack.client_log)}")
    assert_dropped(mp.stack.client_proc.pid, nobody.pw_uid, nobody.pw_gid)
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
    from tunnel.config import ConfigError, load_client_config
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
