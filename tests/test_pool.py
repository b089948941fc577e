"""Tests for tunnel.core.pool.AddressPool: static, sticky and dynamic inner addresses."""

from __future__ import annotations

from ipaddress import IPv4Address as A
from ipaddress import IPv4Interface as I

import pytest

from tunnel.core.pool import AddressPool, PoolExhausted

SERVER = I("100.64.0.1/24")


def test_lease_returns_interface_with_subnet_prefix() -> None:
    pool = AddressPool(SERVER)
    got = pool.lease("alice")
    assert got == I("100.64.0.2/24")
    assert got.network == SERVER.network


def test_dynamic_addresses_in_order_skip_server() -> None:
    pool = AddressPool(I("10.0.0.3/29"))  # hosts .1-.6, server .3
    assert [str(pool.lease(n).ip) for n in "abcde"] == ["10.0.0.1", "10.0.0.2", "10.0.0.4", "10.0.0.5", "10.0.0.6"]


def test_static_addresses_honoured_and_never_dynamic() -> None:
    static = AddressPool.parse_static([("alice", "100.64.0.2"), ("bob", "100.64.0.200")])
    assert static == {"alice": A("100.64.0.2"), "bob": A("100.64.0.200")}
    pool = AddressPool(SERVER, static)
    handed = {pool.lease(f"dyn{i}").ip for i in range(251)}  # 254 hosts - server - 2 static
    assert len(handed) == 251
    assert not handed & {A("100.64.0.1"), A("100.64.0.2"), A("100.64.0.200")}
    assert all(a in SERVER.network and a not in (SERVER.network.network_address, SERVER.network.broadcast_address)
               for a in handed)
    with pytest.raises(PoolExhausted):
        pool.lease("one-too-many")
    # static clients still get their address, even with the pool exhausted
    assert pool.lease("alice") == I("100.64.0.2/24")
    assert pool.lease("bob") == I("100.64.0.200/24")


def test_static_address_survives_release() -> None:
    pool = AddressPool(I("10.0.0.1/30"), {"alice": A("10.0.0.2")})  # no dynamic address left at all
    assert pool.lease("alice") == I("10.0.0.2/30")
    pool.release("alice")
    with pytest.raises(PoolExhausted):
        pool.lease("bob")  # alice's static address is not reused
    assert pool.lease("alice") == I("10.0.0.2/30")


def test_same_name_gets_same_address_back() -> None:
    pool = AddressPool(SERVER)
    a = pool.lease("alice")
    b = pool.lease("bob")
    assert pool.lease("alice") == a  # lease twice while connected
    pool.release("alice")
    pool.lease("carol")
    assert pool.lease("alice") == a
    pool.release("bob")
    pool.release("bob")  # releasing twice is harmless
    assert pool.lease("bob") == b
    pool.release("nobody")  # unknown names are ignored


def test_exhaustion_raises() -> None:
    pool = AddressPool(I("10.0.0.1/29"))  # 6 hosts, 5 for clients
    for n in "abcde":
        pool.lease(n)
    with pytest.raises(PoolExhausted, match="10.0.0.0/29"):
        pool.lease("f")


def test_exhaustion_reuses_oldest_idle_lease() -> None:
    pool = AddressPool(I("10.0.0.1/29"))
    addr = {n: pool.lease(n).ip for n in "abcde"}
    pool.release("d")
    pool.release("b")
    # both b and d are idle; b's lease is older (it was made first)
    assert pool.lease("f").ip == addr["b"]
    # b lost its lease: it gets the next idle one (d's)
    assert pool.lease("b").ip == addr["d"]
    with pytest.raises(PoolExhausted):
        pool.lease("d")  # nothing idle any more
    # addresses in use are never taken away
    assert {pool.lease(n).ip for n in "acef"} == {addr["a"], addr["c"], addr["e"], addr["b"]}


def test_reused_lease_goes_to_the_back_of_the_queue() -> None:
    pool = AddressPool(I("10.0.0.1/30"))  # one client address: 10.0.0.2
    assert pool.lease("a").ip == A("10.0.0.2")
    pool.release("a")
    assert pool.lease("b").ip == A("10.0.0.2")
    with pytest.raises(PoolExhausted):
        pool.lease("a")
    pool.release("b")
    assert pool.lease("a").ip == A("10.0.0.2")


def test_pool_range_limits_addresses() -> None:
    pool = AddressPool(SERVER, first=A("100.64.0.100"), last=A("100.64.0.102"))
    assert [str(pool.lease(n).ip) for n in "abc"] == ["100.64.0.100", "100.64.0.101", "100.64.0.102"]
    with pytest.raises(PoolExhausted):
        pool.lease("d")


def test_pool_range_excludes_server_and_static() -> None:
    pool = AddressPool(
        I("100.64.0.101/24"), {"s": A("100.64.0.102")}, first=A("100.64.0.100"), last=A("100.64.0.104")
    )
    assert [str(pool.lease(n).ip) for n in "abc"] == ["100.64.0.100", "100.64.0.103", "100.64.0.104"]
    with pytest.raises(PoolExhausted):
        pool.lease("d")
    assert pool.lease("s").ip == A("100.64.0.102")


def test_pool_range_covering_whole_subnet_has_only_hosts() -> None:
    pool = AddressPool(I("10.0.0.1/29"), first=A("10.0.0.0"), last=A("10.0.0.7"))
    got = [str(pool.lease(n).ip) for n in "abcde"]
    assert got == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
    with pytest.raises(PoolExhausted):
        pool.lease("f")


def test_only_first_or_last() -> None:
    pool = AddressPool(I("10.0.0.1/29"), first=A("10.0.0.5"))
    assert [str(pool.lease(n).ip) for n in "ab"] == ["10.0.0.5", "10.0.0.6"]
    with pytest.raises(PoolExhausted):
        pool.lease("c")
    pool = AddressPool(I("10.0.0.1/29"), last=A("10.0.0.2"))
    assert pool.lease("a").ip == A("10.0.0.2")
    with pytest.raises(PoolExhausted):
        pool.lease("b")


# -- IPv6 ------------------------------------------------------------------
from ipaddress import IPv6Address as A6  # noqa: E402
from ipaddress import IPv6Interface as I6  # noqa: E402
from ipaddress import IPv6Network as N6  # noqa: E402

from tunnel.core.pool import AddressPool6  # noqa: E402


def test_pool6_server_first_clients_next_with_prefix_length() -> None:
    pool = AddressPool6(N6("fd00:6d70::/64"))
    assert pool.server == I6("fd00:6d70::1/64")
    assert pool.lease("alice") == I6("fd00:6d70::2/64")
    assert pool.lease("bob") == I6("fd00:6d70::3/64")


def test_pool6_sticky_per_name_and_static_skipped() -> None:
    pool = AddressPool6(N6("fd00:6d70::/64"), {"carol": A6("fd00:6d70::3"), "dave": A6("fd00:6d70::99")})
    a = pool.lease("alice")
    assert pool.lease("bob").ip == A6("fd00:6d70::4")  # ::3 is carol's, never dynamic
    pool.release("alice")
    assert pool.lease("erin").ip == A6("fd00:6d70::5")
    assert pool.lease("alice") == a  # back: same address
    assert pool.lease("dave").ip == A6("fd00:6d70::99")


def test_pool6_small_prefix_reuses_oldest_idle_then_exhausts() -> None:
    pool = AddressPool6(N6("fd00::/126"))  # ::1 server, ::2 and ::3 for clients
    assert [str(pool.lease(n).ip) for n in "ab"] == ["fd00::2", "fd00::3"]
    with pytest.raises(PoolExhausted):
        pool.lease("c")
    pool.release("a")
    assert str(pool.lease("c").ip) == "fd00::2"
    with pytest.raises(ValueError):
        AddressPool6(N6("fd00::/127"))
