"""packaging/mptun-server.nft, the example ruleset that limits what clients reach: nft accepts
it, and loaded in the server namespace of a real lab tunnel it drops what a client sends
outside the pushed routes and to the server host's services, while the pushed routes and a
ping of the server's inner address go through."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tunnel.lab.netns import Host, wait_for
from tunnel.lab.stack import SERVER_INNER

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (nftables)"),
]

RULESET = Path(__file__).resolve().parent.parent / "packaging" / "mptun-server.nft"
PUSHED = "198.18.8.0/30"  # a network behind the server that it pushes: srv .1, host "lanin" .2
NOT_PUSHED = "198.18.12.0/30"  # another one it does not push: srv .1, host "lanout" .2
PORT = 5599  # a TCP service of the server host, listening on 0.0.0.0


def render(**values: str) -> str:
    """The shipped ruleset with its ``define`` lines set to ``values`` (as an operator edits it)."""
    text = RULESET.read_text()
    for name, value in values.items():
        text, n = re.subn(rf"^define {name} = .*$", f"define {name} = {value}", text, flags=re.M)
        assert n == 1, f"the ruleset has no variable {name!r}"
    return text


def load(host: Host, text: str, tmp_path: Path, check: bool = False) -> subprocess.CompletedProcess:
    path = tmp_path / "mptun-server.nft"
    path.write_text(text)
    return host.run(["nft", *(["-c"] if check else []), "-f", str(path)], check=False)


def test_the_shipped_ruleset_is_valid_as_is_and_with_ipv6(lab, tmp_path: Path) -> None:
    host = lab.add_host("nft")
    res = load(host, RULESET.read_text(), tmp_path, check=True)
    assert res.returncode == 0, res.stderr
    text = render(mptun_if='"vpn7"', server6="fd00:6d70::1", pushed4="{ 10.0.0.0/8, 192.168.1.0/24 }",
                  pushed6="{ fd00:99::/48, 2001:db8::/32 }")
    for _ in range(2):  # loading twice replaces the table (delete + create in one transaction)
        res = load(host, text, tmp_path)
        assert res.returncode == 0, res.stderr
    listed = host.run(["nft", "list", "table", "inet", "mptun_server"]).stdout
    assert 'iifname != "vpn7" accept' in listed and "fd00:99::/48" in listed and listed.count("chain input") == 1
    # a broken value is refused, not half-loaded
    assert load(host, render(pushed4="{ 10.0.0.0/33 }"), tmp_path, check=True).returncode != 0


def can_connect(host: Host, addr: str, port: int) -> bool:
    code = f"import socket; socket.create_connection(({addr!r}, {port}), timeout=1.0).close()"
    return host.run([sys.executable, "-c", code], check=False, timeout=15).returncode == 0


def test_ruleset_limits_a_client_to_the_pushed_routes(lab, tunnel_stack, tmp_path: Path) -> None:
    hosts = tunnel_stack.hosts
    srv, cli = hosts.server, hosts.client
    lanin, lanout = lab.add_host("lanin"), lab.add_host("lanout")
    for lan, subnet in ((lanin, PUSHED), (lanout, NOT_PUSHED)):
        link = lab.link(srv, lan, subnet)
        lan.add_route("default", link.a_addr)
    srv.sysctl("net.ipv4.ip_forward", 1)
    srv.popen([sys.executable, "-c",
               "import socket\n"
               f"s = socket.create_server(('0.0.0.0', {PORT}))\n"
               "while True:\n    s.accept()[0].close()\n"])
    wait_for(lambda: srv.is_listening(PORT), 10, message="test service did not start")
    tunnel_stack.server_overrides["routes"] = [PUSHED]
    tunnel_stack.start()
    # a client that routes more into the tunnel than it was given (it owns its routing table)
    with cli.ipr() as ipr:
        ipr.route("add", dst=NOT_PUSHED, oif=ipr.link_lookup(ifname="mptun0")[0])
    lan_in, lan_out, srv_lan = "198.18.8.2", "198.18.12.2", "198.18.8.1"

    # today, without the ruleset: all of it is reachable
    assert cli.ping(lan_in) and cli.ping(lan_out)
    assert can_connect(cli, SERVER_INNER, PORT) and can_connect(cli, srv_lan, PORT)

    res = load(srv, render(mptun_if='"mptun0"', server4=SERVER_INNER, pushed4=f"{{ {PUSHED} }}"), tmp_path)
    assert res.returncode == 0, res.stderr

    assert cli.ping(lan_in, count=3)  # the pushed route
    assert cli.ping(SERVER_INNER, count=3)  # ICMP echo to the server's inner address
    assert not cli.ping(lan_out, count=2, timeout=0.5)  # outside the pushed routes
    assert not can_connect(cli, SERVER_INNER, PORT)  # the server host's services ...
    assert not can_connect(cli, srv_lan, PORT)  # ... on any of its addresses
    assert cli.ping(lan_in)  # and the tunnel is still fine
    # the drops are counted, and traffic that does not come from the tunnel is not touched
    listed = srv.run(["nft", "list", "table", "inet", "mptun_server"]).stdout
    drops = [int(n) for n in re.findall(r"counter packets (\d+) bytes \d+ drop", listed)]
    assert len(drops) == 2 and all(n > 0 for n in drops), listed
    assert lanin.ping(srv_lan) and can_connect(lanin, srv_lan, PORT)
