"""Tests for tunnel.core.dedup.DedupWindow: the tunnel-wide duplicate/too-old filter."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.core.dedup import DEFAULT_WINDOW, DedupWindow


class Model:
    """Reference: a set of every number seen plus the highest one."""

    def __init__(self, size: int):
        self.size = size
        self.highest = -1
        self.seen: set[int] = set()
        self.delivered = self.duplicates = self.too_old = 0

    def accept(self, seq: int) -> bool:
        self.highest = max(self.highest, seq)
        if seq <= self.highest - self.size:
            self.too_old += 1
            return False
        if seq in self.seen:
            self.duplicates += 1
            return False
        self.seen.add(seq)
        self.delivered += 1
        return True


def counters(w) -> tuple[int, int, int]:
    return w.delivered, w.duplicates, w.too_old


def test_defaults_and_bad_size() -> None:
    w = DedupWindow()
    assert w.size == DEFAULT_WINDOW == 4096
    assert w.highest == -1 and counters(w) == (0, 0, 0)
    for bad in (0, -1):
        with pytest.raises(ValueError):
            DedupWindow(bad)


def test_in_order() -> None:
    w = DedupWindow(8)
    assert all(w.accept(s) for s in range(1, 1001))
    assert w.highest == 1000 and counters(w) == (1000, 0, 0)


def test_seq_zero_is_a_valid_first_number() -> None:
    w = DedupWindow(8)
    assert w.accept(0)
    assert not w.accept(0)
    assert counters(w) == (1, 1, 0)


def test_duplicates() -> None:
    w = DedupWindow(16)
    assert w.accept(5)
    assert not w.accept(5)
    assert w.accept(6)
    assert not w.accept(5) and not w.accept(6)
    assert counters(w) == (2, 3, 0)


def test_reorder_inside_window() -> None:
    w = DedupWindow(16)
    assert w.accept(10)
    for s in (3, 9, 1, 7):
        assert w.accept(s), s
    for s in (3, 9, 1, 7, 10):
        assert not w.accept(s), s
    assert w.highest == 10
    assert counters(w) == (5, 5, 0)


def test_too_old_outside_window() -> None:
    w = DedupWindow(16)
    assert w.accept(100)
    assert not w.accept(84)  # 100 - 16
    assert not w.accept(1)
    assert not w.accept(0)
    assert counters(w) == (1, 0, 3)


@pytest.mark.parametrize("size", [1, 2, 8, 64, 4096])
def test_window_edge_exact(size: int) -> None:
    w = DedupWindow(size)
    top = 10 * size + 3
    assert w.accept(top)
    assert not w.accept(top - size)  # exactly one window back: too old
    assert w.too_old == 1
    if size > 1:
        assert w.accept(top - size + 1)  # the oldest number still inside: accepted once
        assert not w.accept(top - size + 1)
        assert w.duplicates == 1
    # every number inside the window is accepted exactly once
    fresh = [s for s in range(top - size + 1, top) if s != top - size + 1]
    assert all(w.accept(s) for s in fresh)
    assert not any(w.accept(s) for s in range(top - size + 1, top + 1))


def test_window_of_one_only_accepts_new_highest() -> None:
    w = DedupWindow(1)
    assert w.accept(5)
    assert not w.accept(5)
    assert not w.accept(4)
    assert w.accept(7)
    assert not w.accept(6)
    assert counters(w) == (2, 1, 2)


def test_big_jump_forward() -> None:
    w = DedupWindow(8)
    for s in range(1, 9):
        assert w.accept(s)
    assert w.accept(1_000_000)
    assert w.highest == 1_000_000
    # the old numbers are now far outside the window
    assert not any(w.accept(s) for s in range(1, 9))
    assert w.too_old == 8
    # numbers just below the jump were never seen: accepted once, although their
    # slots still hold stale numbers from before the jump
    for s in range(1_000_000 - 7, 1_000_000):
        assert w.accept(s)
        assert not w.accept(s)
    assert not w.accept(1_000_000 - 8)
    assert w.accept(2**62 - 1)
    assert not w.accept(2**62 - 1)


def test_stale_slot_with_same_residue_is_not_a_duplicate() -> None:
    w = DedupWindow(8)
    assert w.accept(3)  # slot 3
    assert w.accept(11)  # slot 3 again, 3 is now too old
    assert not w.accept(3)
    assert w.accept(19) and w.accept(18) and w.accept(12)
    assert not w.accept(11)  # too old now (19 - 8)
    assert counters(w) == (5, 0, 2)


def _check_against_model(size: int, seqs: list[int]) -> None:
    w, m = DedupWindow(size), Model(size)
    for i, s in enumerate(seqs):
        assert w.accept(s) == m.accept(s), (i, s)
        assert w.highest == m.highest
    assert counters(w) == (m.delivered, m.duplicates, m.too_old)


@pytest.mark.parametrize("seed", range(20))
def test_randomized_against_model(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.choice([1, 2, 3, 8, 32, 100, 4096])
    seqs, base = [], 1
    for _ in range(3000):
        r = rng.random()
        if r < 0.5:  # mostly in order with jitter (reordering across paths)
            base += 1
            seqs.append(max(0, base + rng.randint(-size - 2, 3)))
        elif r < 0.75:  # duplicates (duplicate mode sends copies over several paths)
            seqs.append(rng.choice(seqs) if seqs else 0)
        elif r < 0.8:  # big jump
            base += rng.randint(size, 50 * size)
            seqs.append(base)
        else:  # anything around the window edge
            seqs.append(max(0, base + rng.randint(-2 * size, size)))
    _check_against_model(size, seqs)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 12), st.lists(st.integers(0, 60), max_size=80))
def test_property_against_model(size: int, seqs: list[int]) -> None:
    _check_against_model(size, seqs)
