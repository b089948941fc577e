"""Benchmark mptun against its peers and the bare link, single- and multipath; writes docs/BENCH.md.

Why: mptun's foundation targets are relative ("TCP >= 0.8x OpenVPN", ...)
and its multipath claims are about what happens when links are bad or die,
and the machine it is developed on is small, shared and noisy, so absolute
figures mean little.  This module measures everything on the impairment
lab's topology (:class:`~tunnel.lab.topology.MultipathTopology`: client,
router, server), repeats every figure, reports medians with their spread,
and puts the ratios next to them.

Sections (``--sections``):

- ``single``: the foundation figures (TCP throughput, UDP packets/s at 100
  and 1200 bytes, CPU per packet, RTT) for each *setup* over one routed path
  at zero impairment, interleaved run by run so slow phases of the machine
  hit all of them.  Setups (``--only``): ``raw`` (the router's forwarding,
  the ceiling), ``openvpn`` (OpenVPN 2.6, user space), ``wireguard``
  (wireguard-go), ``openconnect`` (openconnect against ocserv, DTLS 1.2, with
  the share of bytes its DTLS channel carried next to every figure, since it
  falls back to its TLS channel) and ``mptun``;
- ``loss``: residual loss of a media stream in duplicate mode over two paths
  with independent random loss, against the product p1*p2;
- ``failover``: longest gap and packets lost when the path carrying a 100/s
  stream is blackholed, for each scheduler mode;
- ``aggregation``: one TCP flow through mptun's balance mode over two
  rate-limited paths, against the sum of the link rates, one raw link and
  Linux MPTCP on the same links;
- ``unequal``: the same on two paths that differ (rates, delays, random or burst loss,
  cellular traces; the profiles are data, tunnel/lab/bench/profiles.py): best single raw
  path, Linux MPTCP, mptun ``balance`` and ``lowest-rtt``, and a UDP stream through
  ``balance`` at 1.3x the faster path's capacity;
- ``cpu``: CPU per packet of duplicate mode over two paths against one path
  at the same offered load.
- ``server``: server memory per tunnel (tunnel/lab/servermem.py);
- ``fleet``: aggregate packets/s of 20 clients flooding one server at once
  against the same 20 namespaces over the raw underlay, and the server's CPU
  per packet (tunnel/lab/fleetpps.py);
- ``hostile``: a real client's time to its tunnel while silent half-open
  handshakes flood the server (80/s from 16 and 500/s from 64 addresses),
  against no flood (tunnel/lab/starve.py);
- ``marking``: cost of per-packet DSCP/ECN marking and of classification;
- ``webrtc``: a real aiortc call (tunnel/lab/webrtc.py) over the raw link and
  through mptun per mode, under 10 % random loss on both paths and with the
  call's path blackholed mid-call: RTP loss, jitter, longest gap.

One driver measures every setup; a setup (a small class) only knows how to
start and stop itself, which address to send to, which processes do the
tunnelling, which TUN devices they use and which cipher they negotiated.
Every namespace and process lives in a :class:`~tunnel.lab.netns.Lab`, so
everything is torn down on any error or Ctrl-C.  A peer that cannot be
started here is reported in BENCH.md with the reason, not given a number.

BENCH.md is rewritten entirely by each full run from one generator function
per section.  Partial runs (``--quick``, ``--sections``, ``--only``) print
their report instead, unless ``--output`` is given.

The UDP echo used for round-trip times runs as sub-commands of this package
inside the namespaces: ``python -m tunnel.lab.bench echo-server PORT`` and
``python -m tunnel.lab.bench echo-client ADDR PORT SECONDS RATE``.

Modules, each importing only those above it:

- ``plan``: what a run sends (:class:`Plan`, ``--quick``'s plan), names, ports, sizes;
- ``profiles``: the unequal-paths section's profiles (two paths each, as data);
- ``results``: every figure of every run and its median/min/max; progress lines;
- ``setups``: the peers and tunnels under test (raw, MPTCP, OpenVPN, WireGuard,
  OpenConnect, mptun), each started and stopped in a lab topology;
- ``traffic``: iperf3, the UDP echo and the CPU-per-packet probe, driven through a setup;
- ``measure``: one runner per section, filling the results;
- ``report``: BENCH.md and the JSON output, from the results alone;
- ``cli``: the command line and :func:`main` (``scripts/bench``, ``python -m tunnel.lab.bench``).
"""

from tunnel.lab.bench.cli import main

__all__ = ["main"]
