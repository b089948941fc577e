"""DSCP policy: which traffic class a packet is in, and what that class gets.

A policy file (TOML) is an ordered list of ``[[class]]`` tables; each has a
``match`` (inner DSCP values or names, IP protocol, ports, addresses, what the
UDP payload is: :class:`PayloadKind`) and
actions: scheduling ``mode`` (with ``redundancy`` for redundant mode),
``outer_dscp`` (a value, a name, or ``"inherit"`` = copy the inner DSCP) and,
for balance mode, ``reorder``/``reorder_ms``.  The first matching class wins;
the last class must match everything (the default).

The file compiles once into a :class:`Policy` whose :meth:`Policy.classify`
reads the inner IPv4/IPv6 header in place (no copy, no regex, no per-packet
parsing of the policy): a 64-entry table by DSCP narrows the candidate
classes, then each candidate's few compiled checks run in order.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from tunnel.wire.frames import HOLD_UNIT_MS
from tunnel.core.scheduler import MODES


DSCP_NAMES = {
    "CS0": 0, "DF": 0, "BE": 0, "LE": 1,
    "CS1": 8, "AF11": 10, "AF12": 12, "AF13": 14,
    "CS2": 16, "AF21": 18, "AF22": 20, "AF23": 22,
    "CS3": 24, "AF31": 26, "AF32": 28, "AF33": 30,
    "CS4": 32, "AF41": 34, "AF42": 36, "AF43": 38,
    "CS5": 40, "VOICE-ADMIT": 44, "EF": 46,
    "CS6": 48, "CS7": 56,
}  # RFC 2474, 2597, 3246, 5865, 8622
PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "sctp": 132}
INHERIT = -1
CLASS_KEYS = {"name", "match", "mode", "redundancy", "outer_dscp", "reorder", "reorder_ms", "target_loss"}
MATCH_KEYS = {"dscp", "protocol", "ports", "src_ports", "dst_ports", "cidrs", "src", "dst", "payload"}
PAYLOAD_KINDS = ("rtp", "rtcp", "stun", "dtls", "turn-channel")  # match.payload (RFC 7983 demultiplexing)
STUN_COOKIE = b"\x21\x12\xa4\x42"  # RFC 5389: bytes 4-7 of every STUN message
SSRC_FLOWS = 4096  # flows whose RTP SSRCs the payload check remembers (all forgotten when full)
SSRCS_PER_FLOW = 16  # SSRCs remembered per flow (a bundled call has a few: audio, video, RTX)


class PolicyError(Exception):
    """A policy problem; str() names the file, the class and the key."""


@dataclass
class TrafficClass:
    name: str
    index: int
    mode: str = "balance"
    redundancy: int = 2
    outer_dscp: int = 0  # or INHERIT
    reorder: bool = False
    reorder_ms: int = 50
    dscp: Optional[frozenset] = None  # None: any
    checks: list = field(default_factory=list)  # compiled predicates on the packet
    hold_units: int = 13  # reorder_ms in DATA_ORDERED's 4 ms units, rounded up
    target_loss: Optional[float] = None  # duplicate/redundant: extra copies while the estimate is above (ratio)

    def __post_init__(self) -> None:
        self.hold_units = -(-self.reorder_ms // HOLD_UNIT_MS)

    @property
    def matches_all(self) -> bool:
        return self.dscp is None and not self.checks


# -- reading the inner header without copying -------------------------------
def _proto_and_l4(pkt: bytes) -> tuple[int, int]:
    """(IP protocol, offset of the transport header) or (-1, 0) if unknown."""
    v = pkt[0] >> 4
    if v == 4 and len(pkt) >= 20:
        return pkt[9], (pkt[0] & 0x0F) * 4
    if v == 6 and len(pkt) >= 40:
        return pkt[6], 40  # extension headers are not followed
    return -1, 0


def inner_dscp(pkt: bytes) -> int:
    if pkt[0] >> 4 == 6:
        return ((pkt[0] & 0x0F) << 2) | (pkt[1] >> 6)
    return pkt[1] >> 2


def _port_check(ranges: list[tuple[int, int]], which: str) -> Callable[[bytes], bool]:
    offsets = {"src": (0,), "dst": (2,), "any": (0, 2)}[which]

    def check(pkt: bytes) -> bool:
        proto, l4 = _proto_and_l4(pkt)
        if proto not in (6, 17, 132) or len(pkt) < l4 + 4:
            return False
        for off in offsets:
            port = (pkt[l4 + off] << 8) | pkt[l4 + off + 1]
            for lo, hi in ranges:
                if lo <= port <= hi:
                    return True
        return False

    return check


def _cidr_check(nets: list, which: str) -> Callable[[bytes], bool]:
    v4 = [(int(n.network_address), int(n.netmask)) for n in nets if n.version == 4]
    v6 = [(int(n.network_address), int(n.netmask)) for n in nets if n.version == 6]
    sides = ("src", "dst") if which == "any" else (which,)
    spans4 = [{"src": (12, 16), "dst": (16, 20)}[s] for s in sides]
    spans6 = [{"src": (8, 24), "dst": (24, 40)}[s] for s in sides]

    def check(pkt: bytes) -> bool:
        if pkt[0] >> 4 == 4 and len(pkt) >= 20:
            spans, table = spans4, v4
        elif pkt[0] >> 4 == 6 and len(pkt) >= 40:
            spans, table = spans6, v6
        else:
            return False
        for a, b in spans:
            value = int.from_bytes(pkt[a:b], "big")
            for net, mask in table:
                if value & mask == net:
                    return True
        return False

    return check


def _proto_check(protos: frozenset) -> Callable[[bytes], bool]:
    return lambda pkt: _proto_and_l4(pkt)[0] in protos


class PayloadKind:
    """What a UDP payload is, from its first bytes (RFC 7983's demultiplexing, tightened).

    Why a check of its own: WebRTC stacks mark no DSCP by default and take ephemeral
    ports, so neither a DSCP nor a port match finds a call; its packets are recognised by
    what they are.  The first byte says which protocol may follow (STUN 0-3, DTLS 20-63,
    TURN channel 64-79, RTP/RTCP 128-191) and one more cheap test per protocol makes a
    false positive unlikely: STUN's magic cookie, DTLS's version byte, a TURN channel's
    length field, RTCP's packet type and length, and for RTP an SSRC already seen on the
    same flow (the first packet of a stream is not RTP yet: one packet per stream goes to
    a later class).  Only the first bytes are read; the SSRC memory is bounded.  What else
    can look like these is in docs/POLICY.md.
    """

    __slots__ = ("_ssrcs",)

    def __init__(self) -> None:
        self._ssrcs: dict[bytes, list[bytes]] = {}  # flow (addresses and ports) -> SSRCs seen

    def of(self, pkt: bytes) -> Optional[str]:
        """The payload's kind (one of PAYLOAD_KINDS), or None; ``pkt`` is an IP packet."""
        v = pkt[0] >> 4
        if v == 4:
            if pkt[9] != 17 or (pkt[6] & 0x1F) | pkt[7]:  # not UDP, or a later fragment (no UDP header)
                return None
            l4 = (pkt[0] & 0x0F) * 4
        elif v == 6:
            if pkt[6] != 17:
                return None
            l4 = 40
        else:
            return None
        p = l4 + 8
        n = len(pkt) - p  # the UDP payload's length
        if n < 4:
            return None
        b0 = pkt[p]
        if b0 >= 128:
            if b0 > 191 or n < 8:
                return None
            b1 = pkt[p + 1]
            if 192 <= b1 <= 223:  # RTCP packet types (RFC 5761 section 4), its length in 32-bit words - 1
                return "rtcp" if ((pkt[p + 2] << 8 | pkt[p + 3]) + 1) * 4 <= n else None
            if 64 <= b1 & 0x7F <= 95 or n < 12:  # RTP payload types may not be 64-95 beside RTCP
                return None
            # the flow: addresses and ports (one slice when there are no IPv4 options)
            flow = pkt[8:44] if v == 6 else pkt[12:24] if l4 == 20 else pkt[12:20] + pkt[l4:l4 + 4]
            return "rtp" if self._seen(flow, pkt[p + 8:p + 12]) else None
        if b0 < 4:
            return "stun" if n >= 20 and pkt[p + 4:p + 8] == STUN_COOKIE else None
        if 20 <= b0 <= 63:
            return "dtls" if n >= 13 and pkt[p + 1] == 0xFE else None  # DTLS 1.0/1.2: 0xFEFF/0xFEFD
        if 64 <= b0 <= 79:  # a channel number 0x4000-0x4FFF; over UDP the padding may be left out
            return "turn-channel" if n - 7 <= (pkt[p + 2] << 8 | pkt[p + 3]) + 4 <= n else None
        return None

    def _seen(self, flow: bytes, ssrc: bytes) -> bool:
        ssrcs = self._ssrcs.get(flow)
        if ssrcs is None:
            if len(self._ssrcs) >= SSRC_FLOWS:
                self._ssrcs.clear()
            self._ssrcs[flow] = [ssrc]
            return False
        if ssrc in ssrcs:
            return True
        ssrcs.append(ssrc)
        if len(ssrcs) > SSRCS_PER_FLOW:
            del ssrcs[0]
        return False


def _payload_check(kinds: frozenset) -> Callable[[bytes], bool]:
    kind_of = PayloadKind().of
    return lambda pkt: kind_of(pkt) in kinds


class Policy:
    def __init__(self, classes: list[TrafficClass], source: str = "(built in)"):
        if not classes or not classes[-1].matches_all:
            raise PolicyError(f"{source}: the last class must match everything (a default class)")
        self.classes = classes
        self.source = source
        self._by_dscp: list[list[TrafficClass]] = [
            [c for c in classes if c.dscp is None or d in c.dscp] for d in range(64)
        ]
        self._only = classes[0] if len(classes) == 1 else None  # no policy file: nothing to decide

    @classmethod
    def single(cls, mode: str, redundancy: int = 2) -> "Policy":
        """No policy file: one class for everything, outer DSCP 0 (no leak), ECN only."""
        return cls([TrafficClass("default", 0, mode, redundancy, 0, reorder=mode == "balance")])

    def classify(self, pkt: bytes) -> TrafficClass:
        if self._only is not None:
            return self._only
        n = len(pkt)
        version = pkt[0] >> 4 if n else 0
        if not ((version == 4 and n >= 20) or (version == 6 and n >= 40)):
            return self.classes[-1]  # not a (whole) IP header: the default class
        for c in self._by_dscp[inner_dscp(pkt)]:
            for check in c.checks:
                if not check(pkt):
                    break
            else:
                return c
        return self.classes[-1]

    def outer_tos(self, c: TrafficClass, pkt: bytes) -> int:
        """RFC 6040 normal mode: the inner ECN field is copied; DSCP as the class says."""
        if len(pkt) >= 20 and pkt[0] >> 4 == 4:  # the common case first: IPv4
            return pkt[1] if c.outer_dscp == INHERIT else (c.outer_dscp << 2) | (pkt[1] & 3)
        if len(pkt) < 2 or pkt[0] >> 4 not in (4, 6):
            return max(c.outer_dscp, 0) << 2
        ecn = pkt[1] & 3 if pkt[0] >> 4 == 4 else (pkt[1] >> 4) & 3
        dscp = inner_dscp(pkt) if c.outer_dscp == INHERIT else c.outer_dscp
        return (dscp << 2) | ecn


# -- loading -----------------------------------------------------------------
def parse_policy(data: dict, source: str) -> Policy:
    unknown = set(data) - {"class"}
    if unknown:
        raise PolicyError(f"{source}: unknown key '{sorted(unknown)[0]}' (a policy is a list of [[class]] tables)")
    tables = data.get("class")
    if not isinstance(tables, list) or not tables:
        raise PolicyError(f"{source}: no [[class]] tables")
    classes, names = [], set()
    for i, table in enumerate(tables):
        c = _parse_class(table, i, source)
        if c.name in names:
            raise PolicyError(f"{source}: class '{c.name}': name: used twice")
        names.add(c.name)
        classes.append(c)
    for c in classes[:-1]:
        if c.matches_all:
            raise PolicyError(f"{source}: class '{c.name}' matches everything, so the classes after it never match")
    if not classes[-1].matches_all:
        raise PolicyError(
            f"{source}: class '{classes[-1].name}': match: the last class must match everything "
            "(add a default class without a match)"
        )
    return Policy(classes, source)


def _parse_class(table: Any, index: int, source: str) -> TrafficClass:
    if not isinstance(table, dict):
        raise PolicyError(f"{source}: class #{index + 1} is not a table")
    name = table.get("name", f"#{index + 1}")
    if not isinstance(name, str) or not name:
        raise PolicyError(f"{source}: class #{index + 1}: name: expected a non-empty string")

    def err(key: str, msg: str) -> PolicyError:
        return PolicyError(f"{source}: class '{name}': {key}: {msg}")

    for key in table:
        if key not in CLASS_KEYS:
            raise err(key, "unknown key")
    mode = table.get("mode", "balance")
    if mode not in MODES:
        raise err("mode", f"{mode!r} is not one of {', '.join(MODES)}")
    redundancy = table.get("redundancy", 2)
    if not isinstance(redundancy, int) or isinstance(redundancy, bool) or not 1 <= redundancy <= 16:
        raise err("redundancy", f"expected an integer from 1 to 16, got {redundancy!r}")
    outer = table.get("outer_dscp", 0)
    outer_dscp = INHERIT if outer == "inherit" else _dscp(outer, lambda m: err("outer_dscp", m))
    reorder = table.get("reorder", mode == "balance")  # balance reorders unless told not to
    if not isinstance(reorder, bool):
        raise err("reorder", f"expected true or false, got {reorder!r}")
    if reorder and mode != "balance":
        raise err("reorder", "only balance mode reorders")
    reorder_ms = table.get("reorder_ms", 50)
    if not isinstance(reorder_ms, int) or isinstance(reorder_ms, bool) or not 1 <= reorder_ms <= 1000:
        raise err("reorder_ms", f"expected milliseconds from 1 to 1000, got {reorder_ms!r}")
    target = table.get("target_loss")
    if target is not None:
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.001 <= target <= 50:
            raise err("target_loss", f"expected a loss in percent from 0.001 to 50, got {target!r}")
        if mode not in ("duplicate", "redundant"):
            raise err("target_loss", "only duplicate and redundant mode send extra copies")
    c = TrafficClass(name, index, mode, redundancy, outer_dscp, reorder, reorder_ms)
    c.target_loss = None if target is None else target / 100.0
    match = table.get("match", {})
    if not isinstance(match, dict):
        raise err("match", "expected a table")
    _compile_match(c, match, lambda key, m: err(f"match.{key}", m))
    return c


def _dscp(value: Any, err: Callable[[str], PolicyError]) -> int:
    if isinstance(value, bool):
        raise err(f"expected a DSCP value or name, got {value!r}")
    if isinstance(value, int):
        if not 0 <= value <= 63:
            raise err(f"DSCP {value} is out of range (0 to 63)")
        return value
    if isinstance(value, str) and value.upper() in DSCP_NAMES:
        return DSCP_NAMES[value.upper()]
    raise err(f"unknown DSCP name {value!r} (known: {', '.join(sorted(DSCP_NAMES))}, or 0 to 63)")


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _is_number(text: str) -> bool:
    text = text.strip()
    return text.isascii() and text.isdigit()


def _ports(value: Any, err: Callable[[str], PolicyError]) -> list[tuple[int, int]]:
    out = []
    for item in _as_list(value):
        if isinstance(item, int) and not isinstance(item, bool):
            lo = hi = item
        elif isinstance(item, str):
            lo_s, _, hi_s = item.partition("-")
            if not _is_number(lo_s) or (hi_s and not _is_number(hi_s)):
                raise err(f"bad port range {item!r} (expected \"LOW-HIGH\" or a port)")
            lo = int(lo_s)
            hi = int(hi_s) if hi_s else lo
        else:
            raise err(f"bad port {item!r}")
        if not 0 <= lo <= hi <= 65535:
            raise err(f"bad port range {item!r} (0 to 65535, low <= high)")
        out.append((lo, hi))
    return out


def _compile_match(c: TrafficClass, match: dict, err: Callable[[str, str], PolicyError]) -> None:
    for key in match:
        if key not in MATCH_KEYS:
            raise err(key, f"unknown match key (known: {', '.join(sorted(MATCH_KEYS))})")
    if "dscp" in match:
        c.dscp = frozenset(_dscp(v, lambda m: err("dscp", m)) for v in _as_list(match["dscp"]))
    if "protocol" in match:
        protos = set()
        for v in _as_list(match["protocol"]):
            if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255:
                protos.add(v)
            elif isinstance(v, str) and v.lower() in PROTOCOLS:
                protos.add(PROTOCOLS[v.lower()])
            else:
                raise err("protocol", f"unknown protocol {v!r} (known: {', '.join(PROTOCOLS)}, or 0 to 255)")
        c.checks.append(_proto_check(frozenset(protos)))
    for key, which in (("ports", "any"), ("src_ports", "src"), ("dst_ports", "dst")):
        if key in match:
            c.checks.append(_port_check(_ports(match[key], lambda m, k=key: err(k, m)), which))
    for key, which in (("cidrs", "any"), ("src", "src"), ("dst", "dst")):
        if key in match:
            nets = []
            for v in _as_list(match[key]):
                try:
                    if not isinstance(v, str):
                        raise TypeError(v)
                    nets.append(ipaddress.ip_network(v, strict=False))
                except (ValueError, TypeError):
                    raise err(key, f"bad address or CIDR {v!r} (expected a string like \"10.0.0.0/8\")") from None
            c.checks.append(_cidr_check(nets, which))
    if "payload" in match:
        kinds = _as_list(match["payload"])
        for v in kinds:
            if v not in PAYLOAD_KINDS:
                raise err("payload", f"unknown payload {v!r} (known: {', '.join(PAYLOAD_KINDS)})")
        c.checks.append(_payload_check(frozenset(kinds)))
