"""Route table: longest-prefix match and pending queues, with a manual clock."""

import ipaddress

from tunnel.core.routes import RouteTable


def net(text):
    return ipaddress.IPv4Network(text)


def ip(text):
    return ipaddress.IPv4Address(text).packed


def test_longest_prefix_wins_and_hosts_first():
    rt = RouteTable()
    rt.add(net("10.0.0.0/8"), "wide")
    rt.add(net("10.1.0.0/16"), "narrow")
    rt.add(net("10.1.2.3/32"), "host")
    assert rt.lookup(ip("10.1.2.3")) == "host"
    assert rt.lookup(ip("10.1.9.9")) == "narrow"
    assert rt.lookup(ip("10.200.0.1")) == "wide"
    assert rt.lookup(ip("11.0.0.1")) is None
    rt.remove("narrow")
    assert rt.lookup(ip("10.1.9.9")) == "wide" and len(rt) == 2


def test_pending_queue_is_bounded_ordered_and_expires():
    rt = RouteTable(pending_size=3, pending_expiry=10.0)
    now = 100.0
    assert [rt.enqueue("t", bytes([i]), now + i) for i in range(4)] == [True, True, True, False]
    assert rt.pending_dropped == 1
    assert rt.flush("t", now + 5) == [b"\x00", b"\x01", b"\x02"]
    assert rt.flush("t", now + 5) == []
    rt.enqueue("t", b"a", now)
    rt.enqueue("t", b"b", now + 9)
    assert rt.flush("t", now + 10) == [b"b"]  # the first expired at now + 10
    assert rt.pending_expired == 1
    rt.enqueue("u", b"x", now)
    rt.expire(now + 10)
    assert rt.pending("u") == 0 and rt.pending_expired == 2


def test_removing_a_target_drops_its_queue():
    rt = RouteTable()
    rt.add(net("100.64.0.2/32"), "t")
    rt.enqueue("t", b"p", 0.0)
    rt.remove("t")
    assert rt.lookup(ip("100.64.0.2")) is None and rt.pending("t") == 0


def test_ipv6_longest_prefix_match_beside_ipv4():
    rt = RouteTable()
    n6 = ipaddress.IPv6Network
    a6 = lambda t: ipaddress.IPv6Address(t).packed  # noqa: E731
    rt.add(net("10.0.0.0/8"), "v4wide")
    rt.add(n6("fd00:1::/32"), "wide")
    rt.add(n6("fd00:1:2::/48"), "narrow")
    rt.add(n6("fd00:6d70::2/128"), "host")
    assert rt.lookup(a6("fd00:6d70::2")) == "host"
    assert rt.lookup(a6("fd00:6d70::3")) is None
    assert rt.lookup(a6("fd00:1:2::9")) == "narrow"
    assert rt.lookup(a6("fd00:1:3::9")) == "wide"
    assert rt.lookup(a6("fd00:2::1")) is None
    # an IPv4 destination never matches an IPv6 prefix (and the other way round)
    assert rt.lookup(ip("10.1.2.3")) == "v4wide"
    assert rt.lookup(a6("::a01:203")) is None  # the same bits as 10.1.2.3 in the low 32
    assert len(rt) == 4
    rt.remove("narrow")
    rt.remove("host")
    assert rt.lookup(a6("fd00:1:2::9")) == "wide" and rt.lookup(a6("fd00:6d70::2")) is None and len(rt) == 2
