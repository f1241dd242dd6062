"""The "auto" codec policy (issue 11, item 2): pool sizing from the cores a rank may use, the
encoder/sink balance, block selection, and that a checkpoint mixing raw and compressed blocks
loads bit-exactly."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import shardckpt
from shardckpt.options import CompressionOptions, compression_options, io_threads, rank_cores
from shardckpt.pipeline import adaptive
from shardckpt.pipeline.adaptive import (
    CodecBalance,
    Estimates,
    SaveBalance,
    balance_for,
    compress_fraction,
    contention,
    cpu_cost,
    save_cost,
)
from shardckpt.pipeline.writer import StagedWrite, finish_data, storage_kind, write_blocks
from shardckpt.planning.boxes import Box
from shardckpt.planning.save_plan import WriteItem
from shardckpt.storage.local import LocalStorage

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def _affinity(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)))


def test_pool_is_sized_from_the_cores_this_rank_may_use(monkeypatch):
    monkeypatch.delenv("SHARDCKPT_IO_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    _affinity(monkeypatch, 16)
    assert rank_cores() == 16.0 and io_threads() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert rank_cores() == 4.0 and io_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    _affinity(monkeypatch, 2)  # ranks outnumber cores: a fraction of a core, still 2 threads for overlap
    assert rank_cores() == 0.25 and io_threads() == 2
    _affinity(monkeypatch, 512)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert io_threads() == 32
    monkeypatch.setenv("SHARDCKPT_IO_THREADS", "3")
    assert io_threads() == 3


def test_auto_is_the_default_and_zstd_none_stay(tmp_path):
    import inspect

    for fn in (shardckpt.save, shardckpt.async_save, shardckpt.CheckpointManager.__init__):
        assert inspect.signature(fn).parameters["compression"].default == "auto", fn
    assert compression_options("auto").codec == "auto"
    assert compression_options("zstd").codec == "zstd" and compression_options(None).codec == "none"
    with pytest.raises(shardckpt.StateMismatchError, match="'auto', 'zstd' or 'none'"):
        CompressionOptions(codec="lz4")


def _est(wait_mb_s: float | None, zstd_mb_s: float = 450.0, ratio: float = 0.67, finish_mb_s: float = 1e9,
         write_mb_s: float = 4000.0) -> Estimates:
    return Estimates(zstd_cpu_s=1 / (zstd_mb_s * 1e6), raw_cpu_s=1 / 20e9, ratio=ratio, write_cpu_s=1 / (write_mb_s * 1e6),
                     wait_s=None if wait_mb_s is None else 1 / (wait_mb_s * 1e6), finish_s=1 / (finish_mb_s * 1e6))


def test_fraction_balances_encoder_and_sink():
    assert compress_fraction(_est(100.0), 1.0) == 1.0  # slow disk: compress everything
    assert compress_fraction(_est(20_000.0), 1.0) == 0.0  # page cache: nothing
    assert compress_fraction(_est(None), 1.0) == 1.0  # sink unknown: compress to learn
    assert compress_fraction(_est(100.0, ratio=1.0), 1.0) == 0.0  # nothing to gain
    est = _est(800.0)
    for cores in (1.0, 0.5):
        f = compress_fraction(est, cores)
        assert 0.0 < f < 1.0
        stored = 1 - f * (1 - est.ratio)
        cpu = (est.raw_cpu_s + f * (est.zstd_cpu_s - est.raw_cpu_s) + est.write_cpu_s * stored) / cores
        assert cpu == pytest.approx(est.wait_s * stored, rel=1e-9)  # type: ignore[operator]  # stages equal
        assert save_cost(est, cores, f) < min(save_cost(est, cores, 0.0), save_cost(est, cores, 1.0))
    assert compress_fraction(est, 2.0) > compress_fraction(est, 1.0)  # more cores: more compression
    # A slow fsync after the appends overlaps nothing: it pays for compression only when it saves
    # more than the encoder costs (here 0.33 x 1/300 MB/s > 1/450 MB/s: no; at 100 MB/s: yes).
    assert compress_fraction(_est(20_000.0, finish_mb_s=300.0), 1.0) == 0.0
    assert compress_fraction(_est(20_000.0, finish_mb_s=100.0), 1.0) == 1.0


def test_background_save_prices_cpu_taken_from_a_busy_machine():
    """An async save beside a training loop that keeps the cores busy spends the least CPU it can;
    with spare cores it is balanced for speed like a blocking save (goodput, issue 11 item 6)."""
    est = _est(800.0)  # a page cache + fsync: the fastest save compresses part of the state
    f = compress_fraction(est, 1.0)
    assert 0.0 < f < 1.0
    assert compress_fraction(est, 1.0, busy=0.0) == f
    assert compress_fraction(est, 1.0, busy=1.0) == 0.0  # every encoder second is a training second
    assert cpu_cost(est, 0.0) < cpu_cost(est, f)
    # A 100 MB/s disk: the save takes 1.5x longer raw; half-contended cores still pay for that...
    assert compress_fraction(_est(100.0), 1.0, busy=0.5) == 1.0
    # ...fully contended ones do not: compressing costs more CPU than the writes it saves.
    assert compress_fraction(_est(100.0), 1.0, busy=1.0) == 0.0
    # ...unless compression saves CPU too (an upload whose own CPU per byte exceeds the encoder's).
    assert compress_fraction(_est(100.0, write_mb_s=100.0), 1.0, busy=1.0) == 1.0


def test_contention_is_the_share_of_cores_the_encoders_did_not_get():
    base = _est(800.0)
    measured = lambda got, threads: Estimates(**{**base.__dict__, "cores": got, "threads": threads})  # noqa: E731
    assert contention(base, 1.0) == 0.0  # nothing measured
    assert contention(measured(1.0, 2), 1.0) == 0.0  # two threads shared this rank's one core
    assert contention(measured(0.25, 2), 1.0) == pytest.approx(0.75)  # training took the rest
    assert contention(measured(4.0, 4), 16.0) == 0.0  # 4 threads on 16 cores, never waiting
    assert contention(measured(2.0, 4), 16.0) == pytest.approx(0.5)


def _contended_save(background: bool) -> float:
    """The fraction a save starts at after one whose encoder thread waited 3 s for a core per 1 s
    it ran, behind a 30 MB/s disk (its fsync)."""
    balance = CodecBalance()
    save = balance.start_save(cores=1.0, background=background)
    stored_total = 0
    for _ in range(8):
        take = save.choose(4 * MiB)
        stored = int(4 * MiB * 0.67) if take else 4 * MiB
        cpu = (4 * MiB / 450e6) if take else 4 * MiB / 20e9
        save.record_block(4 * MiB, stored, cpu, take, queued_s=3 * cpu)
        save.sink_enter()
        save.sink_exit(stored, 0.0, 0.0, 0.0)
        stored_total += stored
    save.finished(stored_total / 30e6)
    return balance.start_save(cores=1.0, background=background).fraction


def test_background_save_measures_its_contention():
    assert _contended_save(background=False) == 1.0  # blocking: the disk is the bottleneck
    assert _contended_save(background=True) == 0.0  # beside training: the CPU is


def test_run_delay_reads_each_threads_own_schedstat_and_closes_it():
    """The descriptor run_delay keeps is the calling thread's (a shared one would time another
    thread's waits) and goes when the thread ends (a pool restarted per save must not leak)."""
    if not os.path.exists("/proc/thread-self/schedstat"):
        pytest.skip("no schedstat on this kernel")
    seen: dict[int, str] = {}

    def probe() -> None:
        adaptive.run_delay()
        seen[threading.get_native_id()] = os.readlink(f"/proc/self/fd/{adaptive._thread_stat.fd.fd}")

    before = set(os.listdir("/proc/self/fd"))
    threads = [threading.Thread(target=probe) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 3
    for tid, target in seen.items():
        assert target.endswith(f"/task/{tid}/schedstat"), (tid, target)
    assert set(os.listdir("/proc/self/fd")) <= before


def test_async_save_balances_as_a_background_save(tmp_path, monkeypatch):
    seen: list[bool] = []
    start = adaptive.CodecBalance.start_save

    def spy(self: CodecBalance, cores: float | None = None, background: bool = False) -> SaveBalance:
        seen.append(background)
        return start(self, cores, background)

    monkeypatch.setattr(adaptive.CodecBalance, "start_save", spy)
    state = {"w": torch.randn(64, 64)}
    shardckpt.save(state, tmp_path / "a")
    shardckpt.async_save(state, tmp_path / "b").wait()
    assert seen == [False, True]


def test_blocks_are_picked_to_hit_the_fraction():
    est = _est(800.0)
    picks = []
    for _ in range(2):
        b = SaveBalance(None, est, 1.0)
        picks.append([b.choose(4 * MiB) for _ in range(200)])
    assert picks[0] == picks[1]  # the same estimates pick the same blocks
    f = compress_fraction(est, 1.0)
    assert abs(sum(picks[0]) - f * 200) <= 1


class _Throttled:
    """A real local data file behind a sink of ``rate`` bytes/s shared by all writer threads: each
    append waits (sleeps) until the bytes before it and its own have drained at that rate."""

    def __init__(self, inner: object, rate: float) -> None:
        self.inner, self.rate = inner, rate
        self._lock = threading.Lock()
        self._free_at = 0.0

    def append(self, data: bytes | memoryview) -> int:
        off: int = self.inner.append(data)  # type: ignore[attr-defined]
        with self._lock:
            self._free_at = max(self._free_at, time.perf_counter()) + len(data) / self.rate
            done = self._free_at
        time.sleep(max(0.0, done - time.perf_counter()))
        return off

    def finish(self) -> int:
        return int(self.inner.finish())  # type: ignore[attr-defined]

    def abort(self) -> None:
        self.inner.abort()  # type: ignore[attr-defined]


def _write(tmp_path, name: str, wrapper: type[_Throttled], rate: float, tensor: torch.Tensor) -> list[str]:
    storage = LocalStorage(tmp_path)
    out = wrapper(storage.create(name), rate)
    item = WriteItem(key="w", box=Box.full(tuple(tensor.shape)), entry_rank=None)
    sw = StagedWrite(item=item, dtype="bfloat16", data=tensor)
    with ThreadPoolExecutor(2) as pool:
        blocks = write_blocks([sw], out, CompressionOptions(codec="auto", block_bytes=64 << 10), pool)  # type: ignore[arg-type]
    finish_data(out)  # type: ignore[arg-type]
    return [str(b[7]) for b in blocks]


def _one_save(balance: CodecBalance, sink_s: float, blocks: int = 8) -> list[bool]:
    """A save of ``blocks`` 4 MiB bf16 blocks whose encoder ran at 450 MB/s per thread, stored 0.67
    of raw, and whose finish (fsync) took ``sink_s``; its appends took no time."""
    save = balance.start_save(cores=1.0)
    picks = []
    for _ in range(blocks):
        take = save.choose(4 * MiB)
        stored = int(4 * MiB * 0.67) if take else 4 * MiB
        save.record_block(4 * MiB, stored, (4 * MiB / 450e6) if take else 4 * MiB / 20e9, take)
        save.sink_enter()
        save.sink_exit(stored, 0.0, 0.0, 0.0)
        picks.append(take)
    save.finished(sink_s)
    return picks


def test_policy_chooses_from_what_earlier_saves_measured():
    fast, slow = CodecBalance(), CodecBalance()
    disk = 32 * MiB / 100e6  # 100 MB/s: the encoder outruns the disk
    assert _one_save(fast, 0.001)[0] and _one_save(slow, disk)[0]  # nothing known: compress to learn
    assert fast.estimates is not None and fast.estimates.wait_s == 0.0
    assert fast.estimates.finish_s < 0.002 / (30 * MiB)  # the finish time is the sink's
    assert _one_save(fast, 0.001) == [False] * 8  # 30 GB/s of durable sink: storing raw is fastest
    assert _one_save(slow, disk) == [True] * 8
    assert _one_save(fast, disk) == [False] * 8  # the fast sink slowed down: raw was measured...
    assert _one_save(fast, disk) == [True] * 8  # ...so the next save compresses


def test_policy_compresses_for_a_throttled_sink(tmp_path, monkeypatch):
    monkeypatch.setattr(adaptive, "_registry", {})
    monkeypatch.setattr(adaptive, "rank_cores", lambda: 1.0)
    w = (torch.randn(MiB // 2) * 0.02).to(torch.bfloat16)  # 1 MiB: 16 blocks
    for name in ("slow0", "slow1"):
        # 2 MB/s: slower than the encoder even on a machine so loaded that it gets 1% of a core
        assert set(_write(tmp_path, name, _Throttled, 2e6, w)) == {"planes"}
    est = balance_for(storage_kind(_Throttled(None, 1.0))).estimates  # type: ignore[arg-type]
    assert est is not None and est.wait_s is not None and est.wait_s > 1 / 2.5e6  # learnt the slow sink


def test_mixed_auto_checkpoint_loads_bit_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(adaptive, "_registry", {})
    from shardckpt.storage.local import DataFileWriter

    # Teach the local sink's balance a speed at which half the bytes are worth compressing.
    est = _est(800.0)
    f = compress_fraction(est, 1.0)
    assert 0.2 < f < 0.8
    monkeypatch.setattr(adaptive, "rank_cores", lambda: 1.0)
    balance_for(f"{DataFileWriter.__module__}.{DataFileWriter.__qualname__}").estimates = est
    # This save's own timings would move the fraction (to all-raw on a busy 2-core machine: the
    # test failed 1 run in ~3 that way). Hold it at the taught value: what is under test here is
    # that the writer follows the policy and that a mixed checkpoint loads, not the estimates.
    monkeypatch.setattr(adaptive.SaveBalance, "_refresh", lambda self: None)
    state = {"w": (torch.randn(256, 1024) * 0.02).to(torch.bfloat16), "m": torch.randn(128, 1024),
             "i": torch.arange(5000)}
    path = tmp_path / "ckpt"
    shardckpt.save(state, path, compression=CompressionOptions(codec="auto", block_bytes=64 << 10))
    codecs = {b.codec for t in shardckpt.read_index(path).tensors for b in t.blocks}
    assert {"raw", "planes"} <= codecs, codecs
    shardckpt.verify(path)
    got = {k: torch.zeros_like(v) for k, v in state.items()}
    shardckpt.load(got, path)
    for k, v in state.items():
        assert torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)), k


def test_plane_tuning_keeps_long_matches_in_whole_blocks():
    """Exponent planes use a tiny match table (near Huffman-only: fast, and smaller there); whole
    blocks keep the larger one, which finds repeats a few KiB apart (text, repeated records)."""
    from shardckpt.codec import decode_block, encode_block

    record = torch.randint(0, 256, (8 << 10,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    data = record.repeat(256).numpy()  # 2 MiB: an 8 KiB random record, repeated
    codec, payload = encode_block(data, "uint8", 1, "zstd", 1)
    assert codec == "zstd" and len(payload) < 0.05 * data.nbytes
    w = (torch.randn(MiB) * 0.02).to(torch.bfloat16)
    raw = w.view(torch.uint8).numpy()
    codec, payload = encode_block(raw, "bfloat16", 2, "zstd", 1)
    assert codec == "planes" and len(payload) < 0.7 * raw.nbytes
    out = torch.empty_like(w).view(torch.uint8).numpy()
    decode_block(codec, payload, out, 2)
    assert (out == raw).all()
