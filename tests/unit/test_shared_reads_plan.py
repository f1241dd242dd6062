"""plan_shared_reads: every needed block read exactly once, by a rank that needs it, balanced by
stored bytes; the rounds partition the shared blocks; the runs encoding round-trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardckpt.planning.shared_reads import from_runs, plan_shared_reads, to_runs

pytestmark = pytest.mark.timeout(60)


@st.composite
def _needs(draw: st.DrawFn) -> tuple[list[list[int]], list[int], list[int], int]:
    blocks = draw(st.integers(1, 40))
    world = draw(st.integers(1, 9))
    stored = draw(st.lists(st.integers(1, 1000), min_size=blocks, max_size=blocks))
    raw = [s + draw(st.integers(0, 500)) for s in stored]
    needs = [sorted(draw(st.sets(st.integers(0, blocks - 1), max_size=blocks))) for _ in range(world)]
    return needs, stored, raw, draw(st.integers(1, 3000))


@settings(max_examples=100, deadline=None)
@given(_needs())
def test_every_needed_block_is_read_once_by_a_rank_that_needs_it(case):
    needs, stored, raw, round_bytes = case
    plan = plan_shared_reads(needs, stored, raw, round_bytes)
    holders: dict[int, list[int]] = {}
    for r, bs in enumerate(needs):
        for b in bs:
            holders.setdefault(b, []).append(r)
    shared = {b for b, rs in holders.items() if len(rs) > 1}
    assert set(plan.readers) == shared == set(plan.needers)
    for b in shared:
        assert plan.readers[b] in holders[b] and plan.needers[b] == tuple(holders[b])
    # Rounds: every shared block in exactly one round, ascending, each round within budget
    # unless it is a single oversized block.
    flat = [b for rnd in plan.rounds for b in rnd]
    assert flat == sorted(shared)
    for rnd in plan.rounds:
        assert len(rnd) == 1 or sum(raw[b] for b in rnd) <= round_bytes
    # What travels: each shared block reaches every other rank that needs it, once.
    for rnd in plan.rounds:
        for dest in range(len(needs)):
            got = [b for src in range(len(needs)) for b in plan.sent(rnd, src, dest)]
            assert sorted(got) == [b for b in rnd if dest in holders[b] and plan.readers[b] != dest]
    # Balance: greedy largest-first onto the least loaded keeps every reader of a shared block
    # within that block's size of the least-loaded rank that could have taken it.
    load = [0] * len(needs)
    for b, rs in holders.items():
        load[plan.readers[b] if b in shared else rs[0]] += stored[b]
    assert sum(load) == sum(stored[b] for b in holders)


def test_replicated_reads_are_spread_evenly():
    # 8 ranks all need 64 equal blocks (a DDP model): each reads 8.
    plan = plan_shared_reads([list(range(64))] * 8, [100] * 64, [100] * 64, 10**9)
    per_rank = [sum(1 for r in plan.readers.values() if r == k) for k in range(8)]
    assert per_rank == [8] * 8
    # Unequal sizes: the largest first, onto the least loaded.
    plan = plan_shared_reads([[0, 1, 2, 3]] * 2, [50, 30, 20, 10], [1] * 4, 10**9)
    assert plan.readers == {0: 0, 1: 1, 2: 1, 3: 0}


def test_private_blocks_count_toward_balance():
    # Rank 0 must read block 0 (size 100) alone; the shared block 1 then goes to rank 1.
    plan = plan_shared_reads([[0, 1], [1]], [100, 10], [100, 10], 10**9)
    assert plan.readers == {1: 1}


@given(st.sets(st.integers(0, 200)))
def test_runs_round_trip(blocks):
    runs = to_runs(list(blocks))
    assert from_runs(runs, 201) == sorted(blocks)
    assert all(a[1] < b[0] for a, b in zip(runs, runs[1:]))


def test_runs_outside_the_index_are_refused():
    with pytest.raises(ValueError, match="outside"):
        from_runs([[3, 9]], 5)


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 9), st.lists(st.integers(1, 1000), min_size=1, max_size=60))
def test_replicated_load_is_balanced_within_one_block(world, stored):
    plan = plan_shared_reads([list(range(len(stored)))] * world, stored, stored, 10**9)
    load = [0] * world
    for b, r in plan.readers.items():
        load[r] += stored[b]
    assert max(load) - min(load) <= max(stored)


@settings(max_examples=100, deadline=None)
@given(_needs(), st.data())
def test_with_readable_sets_every_block_is_read_by_a_rank_that_can(case, data):
    # The memory tier: each block can be read only by the ranks on a node that holds its file.
    needs, stored, raw, round_bytes = case
    world = len(needs)
    readable = [frozenset(data.draw(st.sets(st.integers(0, world - 1), min_size=1))) for _ in stored]
    plan = plan_shared_reads(needs, stored, raw, round_bytes, readable)
    holders: dict[int, list[int]] = {}
    for r, bs in enumerate(needs):
        for b in bs:
            holders.setdefault(b, []).append(r)
    for b, rs in holders.items():
        if b in plan.readers:
            assert plan.readers[b] in readable[b]
            # A needer reads it whenever one can; otherwise some rank that can reads it for them.
            assert (plan.readers[b] in rs) == any(r in readable[b] for r in rs)
            for dest in rs:
                if dest != plan.readers[b]:
                    assert any(b in plan.sent(rnd, plan.readers[b], dest) for rnd in plan.rounds)
        else:  # private: its only needer reads it, and can
            assert len(rs) == 1 and rs[0] in readable[b]


def test_a_block_nobody_can_read_is_refused():
    with pytest.raises(ValueError, match="block 0 is needed by ranks \\[1\\] but no rank can read it"):
        plan_shared_reads([[], [0]], [10], [10], 100, [frozenset()])
