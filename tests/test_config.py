"""Tests for tunnel.app.config: TOML loading, validation and error messages."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from tunnel.app.config import ConfigError, ServerConfig, load_client_config, load_server_config

FILES = ("ca.crt", "srv.crt", "srv.key", "alice.crt", "alice.key")

SERVER_BASE = {
    "listen": '"198.18.0.1:4433"',
    "certificate": '"srv.crt"',
    "key": '"srv.key"',
    "ca": '"ca.crt"',
    "address": '"100.64.0.1/24"',
}
CLIENT_BASE = {
    "server": '"198.18.0.1:4433"',
    "server_name": '"mptun-server"',
    "certificate": '"alice.crt"',
    "key": '"alice.key"',
    "ca": '"ca.crt"',
}


@pytest.fixture
def cfgdir(tmp_path: Path) -> Path:
    d = tmp_path / "etc"
    d.mkdir()
    for name in FILES:
        (d / name).write_text("dummy, the loader does not parse certificates\n")
    return d


def toml(table: str, values: dict, extra: str = "") -> str:
    body = "".join(f"{k} = {v}\n" for k, v in values.items() if v is not None)
    return f"[{table}]\n{body}{extra}"


def write(d: Path, text: str, name: str = "mptun.toml") -> Path:
    p = d / name
    p.write_text(text)
    return p


def server(d: Path, extra: str = "", **over) -> Path:
    return write(d, toml("server", {**SERVER_BASE, **over}, extra))


def client(d: Path, extra: str = "", **over) -> Path:
    return write(d, toml("client", {**CLIENT_BASE, **over}, extra))


def server_error(d: Path, extra: str = "", **over) -> str:
    p = server(d, extra, **over)
    with pytest.raises(ConfigError) as e:
        load_server_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: "), msg  # every error names the file first
    assert "\n" not in msg
    return msg


def client_error(d: Path, extra: str = "", **over) -> str:
    p = client(d, extra, **over)
    with pytest.raises(ConfigError) as e:
        load_client_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: "), msg
    assert "\n" not in msg
    return msg


# -- valid configs ------------------------------------------------------------
def test_minimal_server_defaults(cfgdir: Path) -> None:
    cfg = load_server_config(server(cfgdir))
    assert isinstance(cfg, ServerConfig)
    assert cfg.path == cfgdir / "mptun.toml"
    assert cfg.listen == [("198.18.0.1", 4433)]
    assert cfg.address == ipaddress.IPv4Interface("100.64.0.1/24")
    assert (cfg.certificate, cfg.key, cfg.ca) == (cfgdir / "srv.crt", cfgdir / "srv.key", cfgdir / "ca.crt")
    assert cfg.pool_first is None and cfg.pool_last is None
    assert cfg.tun == "mptun0" and cfg.mtu is None and cfg.routes == []
    assert (cfg.probe_interval, cfg.dead_interval, cfg.timeout) == (0.1, 0.3, 3.0)
    assert cfg.mode == "client" and cfg.linger == 30.0 and cfg.dedup_window == 4096
    assert cfg.allow_unlisted_clients is True and cfg.log_level == "info"
    assert cfg.clients == {} and cfg.control is None


def test_full_server(cfgdir: Path) -> None:
    extra = (
        '[clients.alice]\naddress = "100.64.0.10"\n'
        '[clients.bob]\naddress = "100.64.0.11"\n'
    )
    cfg = load_server_config(
        server(
            cfgdir,
            extra,
            listen='["198.18.0.1:4433", "[2001:db8::1]:4433", "0.0.0.0:1"]',
            pool='"100.64.0.100 - 100.64.0.200"',
            tun='"tun-vpn"',
            mtu="1400",
            routes='["10.0.0.0/8", "192.0.2.0/24"]',
            mode='"backup"',
            probe_interval="0.25",
            dead_interval="1",
            timeout="7.5",
            linger="600",
            dedup_window="65536",
            allow_unlisted_clients="false",
            log_level='"debug"',
            control='"/run/mptun.sock"',
        )
    )
    assert cfg.listen == [("198.18.0.1", 4433), ("2001:db8::1", 4433), ("0.0.0.0", 1)]
    assert cfg.pool_first == ipaddress.IPv4Address("100.64.0.100")
    assert cfg.pool_last == ipaddress.IPv4Address("100.64.0.200")
    assert cfg.tun == "tun-vpn" and cfg.mtu == 1400
    assert cfg.routes == [ipaddress.IPv4Network("10.0.0.0/8"), ipaddress.IPv4Network("192.0.2.0/24")]
    assert cfg.probe_interval == 0.25 and cfg.dead_interval == 1.0 and isinstance(cfg.dead_interval, float)
    assert cfg.timeout == 7.5 and cfg.linger == 600.0 and cfg.dedup_window == 65536 and cfg.mode == "backup"
    assert cfg.allow_unlisted_clients is False and cfg.log_level == "debug"
    assert cfg.control == Path("/run/mptun.sock")
    assert cfg.clients == {
        "alice": ipaddress.IPv4Address("100.64.0.10"),
        "bob": ipaddress.IPv4Address("100.64.0.11"),
    }


def test_address_with_room_for_one_client(cfgdir: Path) -> None:
    assert load_server_config(server(cfgdir, address='"10.9.0.1/30"')).address.network.prefixlen == 30


def test_client_config(cfgdir: Path) -> None:
    cfg = load_client_config(client(cfgdir))
    assert cfg.servers == [("198.18.0.1", 4433)] and cfg.server_name == "mptun-server"
    assert (cfg.certificate, cfg.key, cfg.ca) == (cfgdir / "alice.crt", cfgdir / "alice.key", cfgdir / "ca.crt")
    assert cfg.tun == "mptun0" and cfg.log_level == "info" and cfg.control is None
    assert (cfg.probe_interval, cfg.dead_interval, cfg.timeout, cfg.dedup_window) == (0.1, 0.3, 3.0, 4096)
    assert cfg.interfaces == [] and cfg.mode == "duplicate" and cfg.redundancy == 2 and cfg.pin_flows is False
    cfg = load_client_config(
        client(
            cfgdir,
            server='"vpn.example.org:443"',
            probe_interval="0.5",
            dead_interval="1.5",
            timeout="3",
            log_level='"warning"',
        )
    )
    assert cfg.servers == [("vpn.example.org", 443)]
    assert (cfg.probe_interval, cfg.dead_interval, cfg.timeout) == (0.5, 1.5, 3.0)
    assert isinstance(cfg.timeout, float) and cfg.log_level == "warning"
    cfg = load_client_config(client(cfgdir, server='"[2001:db8::1]:4433"'))
    assert cfg.servers == [("2001:db8::1", 4433)]


def test_client_multipath_config(cfgdir: Path) -> None:
    cfg = load_client_config(
        client(
            cfgdir,
            server='["198.18.0.1:4433", "vpn.example.org:443", "[2001:db8::1]:4433"]',
            interfaces='["eth0", "wwan0", "x23456789012345"]',
            mode='"balance"',
            redundancy="3",
            pin_flows="true",
            dedup_window="64",
        )
    )
    assert cfg.servers == [("198.18.0.1", 4433), ("vpn.example.org", 443), ("2001:db8::1", 4433)]
    assert cfg.interfaces == ["eth0", "wwan0", "x23456789012345"]
    assert (cfg.mode, cfg.redundancy, cfg.pin_flows, cfg.dedup_window) == ("balance", 3, True, 64)


@pytest.mark.parametrize("mode", ["duplicate", "redundant", "lowest-rtt", "balance", "backup"])
def test_every_mode_accepted(cfgdir: Path, mode: str) -> None:
    assert load_client_config(client(cfgdir, mode=f'"{mode}"')).mode == mode
    assert load_server_config(server(cfgdir, mode=f'"{mode}"')).mode == mode


@pytest.mark.parametrize("mode", ['"client"', '"fastest"', '"Duplicate"', '""'])
def test_bad_client_mode(cfgdir: Path, mode: str) -> None:
    msg = client_error(cfgdir, mode=mode)
    assert "[client] mode: " in msg and "is not one of duplicate, redundant, lowest-rtt, balance, backup" in msg


@pytest.mark.parametrize("mode", ['"fastest"', '"CLIENT"', '""'])
def test_bad_server_mode(cfgdir: Path, mode: str) -> None:
    msg = server_error(cfgdir, mode=mode)
    assert "[server] mode: " in msg and "is not one of client, duplicate" in msg


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("redundancy", "0", "out of range (1 to 16)"),
        ("redundancy", "17", "out of range (1 to 16)"),
        ("redundancy", "2.0", "expected an integer"),
        ("redundancy", "true", "expected an integer"),
        ("pin_flows", '"yes"', "expected bool"),
        ("pin_flows", "1", "expected bool"),
        ("interfaces", '"eth0"', "expected list"),
        ("interfaces", '["eth0", 5]', "5 is not an interface name"),
        ("interfaces", '[""]', "'' is not an interface name"),
        ("interfaces", '["x234567890123456"]', "is not an interface name"),
        ("mode", "1", "expected str"),
        ("dedup_window", "63", "out of range (64 to 1048576)"),
        ("dedup_window", "1048577", "out of range"),
        ("dedup_window", '"4096"', "expected an integer"),
        ("server", "[]", "empty list"),
        ("server", '["198.18.0.1:4433", "vpn"]', "host:port"),
        ("server", '["198.18.0.1:4433", 4433]', "host:port"),
    ],
)
def test_bad_client_multipath_values(cfgdir: Path, key: str, value: str, fragment: str) -> None:
    msg = client_error(cfgdir, **{key: value})
    assert f"[client] {key}: " in msg and fragment in msg


def test_interval_relations(cfgdir: Path) -> None:
    # dead_interval must be at least twice probe_interval, timeout at least dead_interval
    cfg = load_client_config(client(cfgdir, probe_interval="0.5", dead_interval="1", timeout="1"))
    assert (cfg.probe_interval, cfg.dead_interval, cfg.timeout) == (0.5, 1.0, 1.0)
    msg = client_error(cfgdir, probe_interval="0.5", dead_interval="0.9")
    assert "[client] dead_interval: 0.9 s must be at least twice probe_interval (0.5 s)" in msg
    msg = server_error(cfgdir, probe_interval="0.2")  # the default dead_interval 0.3 is too short for it
    assert "[server] dead_interval: " in msg and "twice probe_interval" in msg
    msg = server_error(cfgdir, dead_interval="2", timeout="1.5")
    assert "[server] timeout: 1.5 s must not be shorter than dead_interval (2.0 s)" in msg
    msg = client_error(cfgdir, dead_interval="5")  # the default timeout 3 s is shorter
    assert "[client] timeout: " in msg


def test_idle_probe_interval(cfgdir: Path) -> None:
    assert load_client_config(client(cfgdir)).idle_probe_interval == 0.5
    assert load_server_config(server(cfgdir)).idle_probe_interval == 0.5
    # the default fits other settings: never below probe_interval, an idle dead interval at most timeout/2
    cfg = load_client_config(client(cfgdir, probe_interval="0.5", dead_interval="1", timeout="1"))
    assert cfg.idle_probe_interval == 0.5
    cfg = load_client_config(client(cfgdir, timeout="1.2"))
    assert cfg.idle_probe_interval == 0.2  # 0.2 x 0.3 / 0.1 = 0.6 s = timeout / 2
    cfg = load_server_config(server(cfgdir, idle_probe_interval="0.75"))
    assert cfg.idle_probe_interval == 0.75
    msg = client_error(cfgdir, idle_probe_interval="0.05")
    assert "[client] idle_probe_interval: 0.05 s must not be shorter than probe_interval (0.1 s)" in msg
    msg = server_error(cfgdir, idle_probe_interval="1")  # dead interval 3 s when idle: not below timeout 3 s
    assert "[server] idle_probe_interval: 1.0 s makes an idle path's dead interval 3 s" in msg and "timeout (3.0 s)" in msg
    assert "[client] idle_probe_interval: " in client_error(cfgdir, idle_probe_interval='"fast"')


def test_keepalive_is_gone(cfgdir: Path) -> None:
    assert "[server] keepalive: unknown key" in server_error(cfgdir, keepalive="1")
    assert "[client] keepalive: unknown key" in client_error(cfgdir, keepalive="1")


def test_server_only_and_client_only_keys(cfgdir: Path) -> None:
    assert "[client] linger: unknown key" in client_error(cfgdir, linger="5")
    for key, value in (("interfaces", '["eth0"]'), ("redundancy", "2"), ("pin_flows", "true"), ("server", '"a:1"')):
        assert f"[server] {key}: unknown key" in server_error(cfgdir, **{key: value})


def test_relative_paths_resolved_against_config_dir(cfgdir: Path, tmp_path: Path, monkeypatch) -> None:
    sub = cfgdir / "pki"
    sub.mkdir()
    (sub / "c.crt").write_text("x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    absolute = str(cfgdir / "ca.crt")
    cfg = load_server_config(server(cfgdir, certificate='"pki/c.crt"', ca=f'"{absolute}"'))
    assert cfg.certificate == cfgdir / "pki" / "c.crt"
    assert cfg.ca == cfgdir / "ca.crt"
    cfg = load_client_config(client(cfgdir, key='"../etc/alice.key"'))
    assert cfg.key.resolve() == (cfgdir / "alice.key").resolve()
    # a file that exists relative to the cwd but not to the config's directory is not found
    (elsewhere / "only-here.crt").write_text("x")
    msg = client_error(cfgdir, certificate='"only-here.crt"')
    assert str(cfgdir / "only-here.crt") in msg


def test_load_accepts_str_path(cfgdir: Path) -> None:
    assert load_client_config(str(client(cfgdir))).server_name == "mptun-server"


# -- errors naming file and key ------------------------------------------------
def test_unknown_key(cfgdir: Path) -> None:
    msg = server_error(cfgdir, listne='"1.2.3.4:5"')
    assert "[server] listne: unknown key" in msg
    msg = client_error(cfgdir, mtu="1400")  # a server-only key
    assert "[client] mtu: unknown key" in msg
    msg = server_error(cfgdir, '[clients.alice]\naddress = "100.64.0.10"\nstatic = true\n')
    assert "[clients.alice] static: unknown key" in msg


@pytest.mark.parametrize("key", ["listen", "address", "certificate", "key", "ca"])
def test_server_missing_required_key(cfgdir: Path, key: str) -> None:
    msg = server_error(cfgdir, **{key: None})
    assert f"[server] {key}: missing (required)" in msg


@pytest.mark.parametrize("key", ["server", "server_name", "certificate", "key", "ca"])
def test_client_missing_required_key(cfgdir: Path, key: str) -> None:
    msg = client_error(cfgdir, **{key: None})
    assert f"[client] {key}: missing (required)" in msg


@pytest.mark.parametrize(
    "key,value",
    [
        ("listen", "4433"),
        ("address", "1"),
        ("certificate", "true"),
        ("probe_interval", '"1s"'),
        ("probe_interval", "true"),
        ("dead_interval", '"0.3"'),
        ("timeout", "[5]"),
        ("linger", '"30s"'),
        ("dedup_window", "4096.0"),
        ("mode", "5"),
        ("mtu", '"1400"'),
        ("mtu", "1400.0"),
        ("mtu", "true"),
        ("routes", '"10.0.0.0/8"'),
        ("allow_unlisted_clients", '"yes"'),
        ("allow_unlisted_clients", "1"),
        ("log_level", "1"),
        ("tun", "0"),
        ("pool", "5"),
        ("keep_warm", '"yes"'),
    ],
)
def test_server_wrong_type(cfgdir: Path, key: str, value: str) -> None:
    msg = server_error(cfgdir, **{key: value})
    assert f"[server] {key}: expected " in msg


@pytest.mark.parametrize("key,value", [("server", "4433"), ("server_name", "1"), ("timeout", '"5"'), ("keep_warm", "1")])
def test_client_wrong_type(cfgdir: Path, key: str, value: str) -> None:
    assert f"[client] {key}: expected " in client_error(cfgdir, **{key: value})


@pytest.mark.parametrize(
    "value,fragment",
    [
        ('"198.18.0.1"', "host:port"),
        ('"198.18.0.1:"', "bad port"),
        ('"198.18.0.1:0"', "bad port"),
        ('"198.18.0.1:65536"', "bad port"),
        ('"198.18.0.1:http"', "bad port"),
        ('"198.18.0.1:-1"', "bad port"),
        ('":4433"', "no host"),
        ('"[]:4433"', "no host"),
        ('["198.18.0.1:4433", "198.18.0.2"]', "host:port"),
        ('["198.18.0.1:4433", 5]', "host:port"),
        ("[]", "empty list"),
    ],
)
def test_bad_listen_endpoint(cfgdir: Path, value: str, fragment: str) -> None:
    msg = server_error(cfgdir, listen=value)
    assert "[server] listen: " in msg and fragment in msg


@pytest.mark.parametrize(
    "value,fragment", [('"vpn.example.org"', "host:port"), ('"vpn:99999"', "bad port"), ('":1"', "no host")]
)
def test_bad_client_server_endpoint(cfgdir: Path, value: str, fragment: str) -> None:
    msg = client_error(cfgdir, server=value)
    assert "[client] server: " in msg and fragment in msg


def test_port_limits(cfgdir: Path) -> None:
    assert load_server_config(server(cfgdir, listen='"0.0.0.0:65535"')).listen == [("0.0.0.0", 65535)]
    assert load_server_config(server(cfgdir, listen='"0.0.0.0:1"')).listen == [("0.0.0.0", 1)]


@pytest.mark.parametrize("value", ['"100.64.0.300/24"', '"100.64.0.1/33"', '"fd00::1/64"', '"vpn"', '""'])
def test_bad_address(cfgdir: Path, value: str) -> None:
    assert "[server] address: " in server_error(cfgdir, address=value)


@pytest.mark.parametrize("value", ['"100.64.0.1/31"', '"100.64.0.1/32"', '"100.64.0.1"'])
def test_address_with_no_room(cfgdir: Path, value: str) -> None:
    assert "[server] address: " in (msg := server_error(cfgdir, address=value))
    assert "no room for clients" in msg


@pytest.mark.parametrize(
    "value,fragment",
    [
        ('"100.64.1.10-100.64.1.20"', "is not a range inside 100.64.0.0/24"),
        ('"100.64.0.10-100.64.1.20"', "is not a range inside"),
        ('"100.64.0.20-100.64.0.10"', "is not a range inside"),
        ('"100.64.0.10"', "FIRST-LAST"),
        ('"a-b"', "FIRST-LAST"),
        ('"100.64.0.10-"', "FIRST-LAST"),
    ],
)
def test_bad_pool(cfgdir: Path, value: str, fragment: str) -> None:
    msg = server_error(cfgdir, pool=value)
    assert "[server] pool: " in msg and fragment in msg


def test_static_client_address_outside_subnet(cfgdir: Path) -> None:
    msg = server_error(cfgdir, '[clients.alice]\naddress = "10.0.0.5"\n')
    assert "[clients.alice] address: 10.0.0.5 is not a free host address of 100.64.0.0/24" in msg


def test_static_client_address_is_the_server_address(cfgdir: Path) -> None:
    msg = server_error(cfgdir, '[clients.alice]\naddress = "100.64.0.1"\n')
    assert "[clients.alice] address: " in msg


def test_static_client_address_invalid(cfgdir: Path) -> None:
    assert "[clients.alice] address: " in server_error(cfgdir, '[clients.alice]\naddress = "100.64.0.256"\n')
    assert "[clients.alice] address: expected " in server_error(cfgdir, "[clients.alice]\naddress = 5\n")


def test_static_client_address_duplicate(cfgdir: Path) -> None:
    extra = '[clients.alice]\naddress = "100.64.0.10"\n[clients.bob]\naddress = "100.64.0.10"\n'
    msg = server_error(cfgdir, extra)
    assert "[clients.bob] address: 100.64.0.10 is given to another client too" in msg


@pytest.mark.parametrize("addr", ["100.64.0.0", "100.64.0.255"])
def test_static_client_address_must_be_a_host_address(cfgdir: Path, addr: str) -> None:
    msg = server_error(cfgdir, f'[clients.alice]\naddress = "{addr}"\n')
    assert "[clients.alice] address: " in msg


def test_clients_table_shape(cfgdir: Path) -> None:
    p = write(cfgdir, toml("server", SERVER_BASE) + "clients = 5\n")
    # `clients = 5` after [server] belongs to [server]: an unknown key there
    with pytest.raises(ConfigError, match=r"\[server\] clients: unknown key"):
        load_server_config(p)
    p = write(cfgdir, "clients = 5\n" + toml("server", SERVER_BASE))
    with pytest.raises(ConfigError, match=r"\[clients\] must be a table"):
        load_server_config(p)
    msg = server_error(cfgdir, "[clients]\nalice = 5\n")
    assert "[clients.alice] must be a table" in msg


@pytest.mark.parametrize("level", ['"verbose"', '"INFO"', '""'])
def test_bad_log_level(cfgdir: Path, level: str) -> None:
    msg = server_error(cfgdir, log_level=level)
    assert "[server] log_level: " in msg and "debug, info, warning, error" in msg
    assert "[client] log_level: " in client_error(cfgdir, log_level=level)


@pytest.mark.parametrize("key", ["certificate", "key", "ca"])
def test_missing_cert_file_names_path(cfgdir: Path, key: str) -> None:
    msg = server_error(cfgdir, **{key: '"nope/missing.pem"'})
    assert f"[server] {key}: file {cfgdir / 'nope' / 'missing.pem'} not found" in msg
    msg = client_error(cfgdir, **{key: '"/nonexistent/x.pem"'})
    assert f"[client] {key}: file /nonexistent/x.pem not found" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read anything")
def test_unreadable_cert_file(cfgdir: Path) -> None:
    os.chmod(cfgdir / "srv.key", 0)
    assert f"file {cfgdir / 'srv.key'} is not readable" in server_error(cfgdir)


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("probe_interval", "0", "out of range"),
        ("probe_interval", "0.001", "out of range"),
        ("dead_interval", "3601", "out of range"),
        ("timeout", "3601", "out of range"),
        ("timeout", "-1", "out of range"),
        ("linger", "0", "out of range"),
        ("linger", "3601", "out of range"),
        ("dedup_window", "0", "out of range"),
        ("mtu", "575", "out of range"),
        ("mtu", "65536", "out of range"),
        ("tun", '"x234567890123456"', "not a valid interface name"),
        ("tun", '""', "not a valid interface name"),
        ("tun", '"a/b"', "not a valid interface name"),
        ("tun", '"a b"', "not a valid interface name"),
        ("routes", '["10.0.0.0/33"]', "10.0.0.0/33"),
        ("routes", '["10.0.0.1/8"]', "host bits"),
        ("routes", '["fd00::/8"]', "fd00::/8"),
    ],
)
def test_bad_values(cfgdir: Path, key: str, value: str, fragment: str) -> None:
    msg = server_error(cfgdir, **{key: value})
    assert f"[server] {key}: " in msg and fragment in msg


def test_range_limits_accepted(cfgdir: Path) -> None:
    cfg = load_server_config(
        server(
            cfgdir,
            probe_interval="0.01",
            dead_interval="0.02",
            timeout="3600",
            linger="0.01",
            dedup_window="1048576",
            mtu="576",
            tun='"x23456789012345"',
        )
    )
    assert (cfg.probe_interval, cfg.dead_interval, cfg.timeout, cfg.linger) == (0.01, 0.02, 3600.0, 0.01)
    assert (cfg.dedup_window, cfg.mtu, cfg.tun) == (1 << 20, 576, "x23456789012345")
    cfg = load_client_config(client(cfgdir, dedup_window="64", redundancy="16", probe_interval="1800",
                                    dead_interval="3600", timeout="3600"))
    assert (cfg.dedup_window, cfg.redundancy, cfg.probe_interval, cfg.dead_interval) == (64, 16, 1800.0, 3600.0)
    # dead_interval = 3600 < 2 * probe_interval: the relation is checked after the ranges
    assert "[client] dead_interval: " in client_error(cfgdir, probe_interval="3600", dead_interval="3600")


def test_client_empty_server_name(cfgdir: Path) -> None:
    assert "[client] server_name: empty" in client_error(cfgdir, server_name='""')


def test_invalid_toml(cfgdir: Path) -> None:
    p = write(cfgdir, "[server\nlisten = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as e:
        load_server_config(p)
    assert str(e.value).startswith(f"{p}: ")
    p = write(cfgdir, '[client]\nserver = "a:1"\nserver = "b:2"\n')  # duplicate key is invalid TOML
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_client_config(p)


def test_missing_config_file(tmp_path: Path) -> None:
    p = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as e:
        load_server_config(p)
    assert str(e.value) == f"{p}: file not found"


def test_unknown_top_level_table(cfgdir: Path) -> None:
    p = write(cfgdir, toml("server", SERVER_BASE) + "[srever]\nx = 1\n")
    with pytest.raises(ConfigError) as e:
        load_server_config(p)
    assert str(e.value).startswith(f"{p}: unknown table or key 'srever'")
    assert "expected clients, server" in str(e.value)
    p = write(cfgdir, "mtu = 1400\n" + toml("client", CLIENT_BASE))
    with pytest.raises(ConfigError, match="unknown table or key 'mtu'"):
        load_client_config(p)
    p = write(cfgdir, toml("client", CLIENT_BASE) + "[clients.alice]\n")  # server-only table in a client config
    with pytest.raises(ConfigError, match="unknown table or key 'clients'"):
        load_client_config(p)


def test_missing_main_table(cfgdir: Path) -> None:
    p = write(cfgdir, "")
    with pytest.raises(ConfigError, match=r"missing \[server\] table"):
        load_server_config(p)
    with pytest.raises(ConfigError, match=r"missing \[client\] table"):
        load_client_config(p)
    p = write(cfgdir, "server = 5\n")
    with pytest.raises(ConfigError, match=r"\[server\] must be a table"):
        load_server_config(p)


def test_example_configs_parse(cfgdir: Path) -> None:
    """The shipped examples are valid (given the files they point at exist)."""
    repo = Path(__file__).resolve().parent.parent
    for example, loader, files in (
        ("server.toml.example", load_server_config, ("server.crt", "server.key", "ca.crt")),
        ("client.toml.example", load_client_config, ("alice.crt", "alice.key", "ca.crt")),
    ):
        for f in files:
            (cfgdir / f).write_text("x")
        p = write(cfgdir, (repo / "certs" / example).read_text(), example)
        loader(p)


def test_server_listen_host_must_be_an_address(cfgdir: Path) -> None:
    msg = server_error(cfgdir, listen='"localhost:4433"')
    assert "[server] listen: " in msg


def test_client_table_without_address_is_valid(cfgdir: Path) -> None:
    cfg = load_server_config(server(cfgdir, '[clients.carol]\n[clients.alice]\naddress = "100.64.0.10"\n'))
    assert cfg.clients["alice"] == ipaddress.IPv4Address("100.64.0.10")


def test_listed_client_without_address_is_admitted(tmp_path: Path) -> None:
    from tunnel.app import server as server_app
    from tunnel.app.certs import create_ca, issue_server

    create_ca(tmp_path)
    issue_server(tmp_path, "srv")
    p = write(
        tmp_path,
        toml("server", {**SERVER_BASE, "listen": '"0.0.0.0:4433"', "allow_unlisted_clients": "false"})
        + '[clients.alice]\naddress = "100.64.0.10"\n[clients.carol]\n',
    )
    cfg = load_server_config(p)
    server_app.build(cfg)
    assert cfg.settings(1472, 1400).allowed_clients == {"alice", "carol"}  # what the server core is given


# -- client routes: the networks behind a client, whose source addresses the server takes from it ---------
def test_client_routes_that_overlap_nothing_load(cfgdir: Path) -> None:
    extra = ('[clients.alice]\naddress = "100.64.0.10"\nroutes = ["10.1.0.0/24", "10.1.1.0/24"]\n'
             '[clients.bob]\nroutes = ["10.2.0.0/16", "192.168.7.0/24"]\n')
    cfg = load_server_config(server(cfgdir, extra))
    assert cfg.client_routes["bob"] == [ipaddress.ip_network("10.2.0.0/16"), ipaddress.ip_network("192.168.7.0/24")]


@pytest.mark.parametrize("route", ["100.64.0.0/25", "100.64.0.1/32", "100.64.0.200/29", "100.64.0.0/24"])
def test_client_route_inside_the_tunnel_subnet_refused(cfgdir: Path, route: str) -> None:
    """A route inside the subnet would let the client send as the server (100.64.0.1) or as others."""
    msg = server_error(cfgdir, f'[clients.alice]\nroutes = ["10.1.0.0/24", "{route}"]\n')
    assert f"[clients.alice] routes: {route} overlaps the tunnel subnet 100.64.0.0/24" in msg


def test_client_route_inside_a_narrow_pool_subnet_refused(cfgdir: Path) -> None:
    msg = server_error(cfgdir, '[clients.alice]\nroutes = ["100.64.0.240/28"]\n', pool='"100.64.0.10-100.64.0.20"')
    assert "[clients.alice] routes: 100.64.0.240/28 overlaps the tunnel subnet 100.64.0.0/24" in msg


@pytest.mark.parametrize("route", ["0.0.0.0/0", "0.0.0.0/1", "100.0.0.0/8"])
def test_client_default_route_refused_with_the_routes_to_use_instead(cfgdir: Path, route: str) -> None:
    """A default-route site necessarily covers the pool: refused, and the error lists the prefixes
    around the tunnel subnet, which load."""
    msg = server_error(cfgdir, f'[clients.alice]\nroutes = ["{route}"]\n')
    assert f"[clients.alice] routes: {route} overlaps the tunnel subnet 100.64.0.0/24" in msg
    suggested = msg.split("instead: ", 1)[1]
    assert suggested.startswith("routes = [")
    cfg = load_server_config(server(cfgdir, f"[clients.alice]\n{suggested}\n"))
    nets = cfg.client_routes["alice"]
    subnet, wide = ipaddress.ip_network("100.64.0.0/24"), ipaddress.ip_network(route)
    assert not any(n.overlaps(subnet) for n in nets)
    assert sum(n.num_addresses for n in nets) == wide.num_addresses - subnet.num_addresses


def test_the_issue_case_overlapping_clients_refused(cfgdir: Path) -> None:
    extra = '[clients.alice]\nroutes = ["100.64.0.0/25", "0.0.0.0/1"]\n[clients.bob]\nroutes = ["100.64.0.0/26"]\n'
    assert "[clients.alice] routes: 100.64.0.0/25 overlaps the tunnel subnet" in server_error(cfgdir, extra)


@pytest.mark.parametrize("mine, theirs", [("10.1.0.0/16", "10.0.0.0/8"), ("10.0.0.0/8", "10.9.9.0/24"),
                                          ("192.168.1.0/24", "192.168.1.0/24")])
def test_client_routes_overlapping_another_clients_refused_naming_both(cfgdir: Path, mine: str, theirs: str) -> None:
    extra = f'[clients.alice]\nroutes = ["{theirs}"]\n[clients.bob]\nroutes = ["172.16.0.0/12", "{mine}"]\n'
    msg = server_error(cfgdir, extra)
    assert f"[clients.bob] routes: {mine} overlaps {theirs} of [clients.alice]" in msg


def test_pinned_address_inside_another_clients_routes_refused(cfgdir: Path) -> None:
    extra = '[clients.alice]\naddress = "100.64.0.10"\n[clients.bob]\nroutes = ["100.64.0.8/29"]\n'
    assert "[clients.bob] routes: 100.64.0.8/29 overlaps the tunnel subnet" in server_error(cfgdir, extra)


@pytest.mark.parametrize("route", ["fd00:6d70::/64", "fd00:6d70::1/128", "fd00:6d70::a/127", "fd00:6d70::/48"])
def test_client_route6_overlapping_pool6_refused(cfgdir: Path, route: str) -> None:
    msg = server_error(cfgdir, f'[clients.alice]\nroutes = ["{route}"]\n', pool6='"fd00:6d70::/64"')
    assert f"[clients.alice] routes: {route} overlaps pool6 fd00:6d70::/64" in msg


def test_client_default_route6_refused(cfgdir: Path) -> None:
    msg = server_error(cfgdir, '[clients.alice]\nroutes = ["::/0"]\n', pool6='"fd00:6d70::/64"')
    assert "[clients.alice] routes: ::/0 overlaps pool6 fd00:6d70::/64" in msg
    assert "prefixes around fd00:6d70::/64 instead: 64 prefixes, " in msg  # too many to list: counted


def test_client_routes6_overlapping_another_clients_refused(cfgdir: Path) -> None:
    extra = '[clients.alice]\nroutes = ["fd00:a::/48"]\n[clients.bob]\nroutes = ["10.0.0.0/8", "fd00:a:0:1::/64"]\n'
    msg = server_error(cfgdir, extra, pool6='"fd00:6d70::/64"')
    assert "[clients.bob] routes: fd00:a:0:1::/64 overlaps fd00:a::/48 of [clients.alice]" in msg


def test_check_config_refuses_overlapping_client_routes_with_exit_2(cfgdir: Path) -> None:
    import subprocess
    import sys

    p = server(cfgdir, '[clients.alice]\nroutes = ["100.64.0.0/25"]\n')
    res = subprocess.run([sys.executable, "-m", "tunnel", "server", "-c", str(p), "--check-config"],
                         capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 2, res
    assert res.stderr.startswith(f"mptun server: error: {p}: [clients.alice] routes: 100.64.0.0/25 overlaps the tunnel subnet 100.64.0.0/24")
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


# -- settings objects for the cores (tunnel/core/settings.py) ------------------------
def test_server_settings_carry_every_key(cfgdir: Path) -> None:
    from tunnel.core.settings import Limits, PathSettings, ServerSettings

    extra = (
        '[clients.alice]\naddress = "100.64.0.10"\nroutes = ["192.168.7.0/24"]\n'
        '[clients.bob]\n'
    )
    cfg = load_server_config(server(
        cfgdir, extra,
        routes='["10.0.0.0/8", "192.0.2.0/24"]', mode='"backup"', dedup_window="65536", linger="600",
        allow_unlisted_clients="false", client_to_client="true", unknown_destination='"icmp"',
        probe_interval="0.25", dead_interval="1", idle_probe_interval="0.5", timeout="7.5",
        max_tunnels="7", max_paths="3", handshake_rate="2.5", max_handshakes="9", pending_queue="5",
        pending_expiry="4",
    ))
    assert cfg.settings(1472, 1400) == ServerSettings(
        datagram_mtu=1472,
        inner_mtu=1400,
        routes=(ipaddress.IPv4Network("10.0.0.0/8"), ipaddress.IPv4Network("192.0.2.0/24")),
        mode="backup",
        dedup_window=65536,
        linger=600.0,
        allowed_clients=frozenset({"alice", "bob"}),
        client_routes={"alice": [ipaddress.IPv4Network("192.168.7.0/24")]},
        client_to_client=True,
        unknown_destination="icmp",
        path=PathSettings(probe_interval=0.25, dead_interval=1.0, idle_probe_interval=0.5, timeout=7.5),
        limits=Limits(max_tunnels=7, max_paths=3, handshake_rate=2.5, max_handshakes=9, pending_queue=5,
                      pending_expiry=4.0),
    )


def test_server_settings_defaults(cfgdir: Path) -> None:
    """Without the keys in the file, the settings are tunnel/core/settings.py's defaults (only the
    idle probe interval is fitted to the timeout: 0.5 s with the default timings)."""
    from tunnel.core.settings import ServerSettings, fitted_idle_probe_interval

    settings = load_server_config(server(cfgdir)).settings(1472, 1400)
    assert settings == ServerSettings(datagram_mtu=1472, inner_mtu=1400)
    assert settings.allowed_clients is None and settings.routes == ()
    p = settings.path
    assert p.idle_probe_interval == fitted_idle_probe_interval(p.probe_interval, p.dead_interval, p.timeout)


def test_client_settings(cfgdir: Path) -> None:
    from tunnel.core.settings import ClientSettings, PathSettings

    assert load_client_config(client(cfgdir)).settings() == ClientSettings()
    cfg = load_client_config(client(
        cfgdir, mode='"redundant"', redundancy="3", pin_flows="true", dedup_window="1024",
        probe_interval="0.2", dead_interval="0.6", idle_probe_interval="0.4", timeout="5",
    ))
    assert cfg.settings() == ClientSettings(
        mode="redundant", redundancy=3, pin_flows=True, dedup_window=1024,
        path=PathSettings(probe_interval=0.2, dead_interval=0.6, idle_probe_interval=0.4, timeout=5.0),
    )


def test_fitted_idle_default_is_the_settings_one(cfgdir: Path) -> None:
    from tunnel.core.settings import fitted_idle_probe_interval

    cfg = load_client_config(client(cfgdir, timeout="0.6"))
    assert cfg.idle_probe_interval == fitted_idle_probe_interval(0.1, 0.3, 0.6) == 0.1
    assert cfg.settings().path.idle_probe_interval == cfg.idle_probe_interval
