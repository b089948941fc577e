"""Sliding sequence window that drops duplicates and too-old packets.

It sits above the crypto layer: every path has its own DTLS replay window, but
only a tunnel-wide window sees the copies that duplicate mode sends over
several paths (the role WireGuard's RFC 6479 window plays for engarde).

One slot per sequence number modulo the window size holds the last sequence
number seen there; a packet is a duplicate exactly when its slot already holds
its own number.  O(1) per packet, no shifting of bitmaps.
"""

from __future__ import annotations

DEFAULT_WINDOW = 4096


class DedupWindow:
    __slots__ = ("size", "highest", "_slots", "delivered", "duplicates", "too_old")

    def __init__(self, size: int = DEFAULT_WINDOW):
        if size < 1:
            raise ValueError("window size must be positive")
        self.size = size
        self.highest = -1
        self._slots = [-1] * size
        self.delivered = 0
        self.duplicates = 0
        self.too_old = 0

    def accept(self, seq: int) -> bool:
        """True if ``seq`` is new and inside the window (and remember it)."""
        if seq > self.highest:
            self.highest = seq
        elif seq <= self.highest - self.size:
            self.too_old += 1
            return False
        i = seq % self.size
        if self._slots[i] == seq:
            self.duplicates += 1
            return False
        self._slots[i] = seq
        self.delivered += 1
        return True
