"""The ``"auto"`` compression policy: compress exactly as much as keeps the save fastest.

Why. Compression only pays while the storage is slower than the encoder. On a 2-core machine
writing into a warm page cache, zstd over every float block (about 450 MB/s per thread for bf16
byte planes) is slower than the page cache and fsync, so ``"zstd"`` makes the save slower than
``"none"``; behind a 100 MB/s disk or an object store it is the other way round. Which case holds
depends on the machine, the rank count and the storage, so it is measured, not configured.

The model. Per raw byte, a rank spends CPU on every block (checksum: ``c_raw`` thread-seconds
per byte), more on a compressed one (encode + checksum: ``c_z``), and on every stored byte the
write itself costs ``c_w`` (the copy into the page cache or an upload buffer); this is spread over
``P`` cores (``options.rank_cores``). The storage adds waits that are not CPU: ``d_a`` seconds per
stored byte while appends run (dirty-page throttling, a slow disk, a network), which overlaps the
encoder threads, and ``d_f`` in ``finish`` (fsync, upload completion), which comes after them. A
compressed block stores ``r`` of its raw bytes, so with a fraction ``f`` of the bytes compressed,
``s(f) = 1 - f (1 - r)`` bytes are stored per raw byte and a save costs

    T(f) = max((c_raw + f (c_z - c_raw) + c_w s(f)) / P,  d_a s(f))  +  d_f s(f)

per raw byte. ``T`` is convex and piecewise linear, so its minimum is at ``f = 0``, ``f = 1`` or
where the two overlapped stages take equally long; all three are evaluated and the cheapest taken
(on a tie, the one storing fewer bytes). A first version took the whole sink time (appends +
finish) as one stage overlapped with encoding; measured on 2 cores with 2 ranks, it compressed
everything into a warm page cache and the save was 1.5x the uncompressed one, because the copy
into the page cache is CPU that competes with the encoder and the fsync at the end overlaps
nothing. Hence the split: per append, wall time minus the thread's CPU time minus the time it
waited for a core (``/proc/thread-self/schedstat``) is the storage's own wait. The same run
delay gives ``P`` as measured: the share of time the encoder threads ran while runnable, times
the number of threads, capped by this rank's share of the cores; on a machine busy with other
work, encoding costs more wall time than its CPU time says, and the policy compresses less.

Background saves. An ``async_save`` runs beside the training loop, so its wall time costs training
nothing while its CPU time may cost it everything: on a machine whose cores the training loop keeps
busy, every encoder second is taken from a training step (measured with benchmarks/goodput.py on 2
cores: a policy minimising ``T`` alone compressed while waiting for the disk and lost training
throughput to it). So a background save minimises ``(1 - k) T(f) + k C(f) / P``, where ``C(f)`` is
the CPU thread-seconds per raw byte (the numerator of the first term of ``T``) and ``k`` the
measured contention: the share of this rank's cores its encoder threads did not get while they
were runnable (``1 - got / P``, from the same run delays). With spare cores (a GPU job whose
training thread leaves the host cores idle) ``k`` is 0 and nothing changes; on a machine saturated
by training, ``k`` nears 1 and a background save spends as little CPU as it can, storing raw unless
compression costs less CPU than the writes it saves. The objective is still convex and piecewise
linear with the same breakpoints, so the same three candidates are evaluated.

Which blocks. A running byte budget picks blocks in the order the encoder threads take them:
a block is compressed while the compressed raw bytes stay within ``f`` of the bytes seen (error
diffusion, so any ``f`` is met to within one block). The rest are stored ``"raw"``, still
checksummed; the index records each block's codec, so loads need nothing new.

Where the figures come from. ``c_z``, ``c_raw`` and ``r`` are thread CPU time and sizes of the
blocks themselves; ``s`` is the sink's busy time. Estimates live per storage kind (the type of
the data writer: a local file, an S3 upload, a benchmark's throttled wrapper) in a module-level
registry, so a process's later saves start from what its earlier ones measured; during a save
they are updated block by block (a sink found slower than the last estimate is believed at
once; ``finish`` is only seen at the end, so a faster one only counts from the next save). The
first save of a process compresses its first blocks to learn ``c_z`` and ``r``, and balances as
soon as it has seen one write. The choice depends on this rank's timings only: ranks may choose
differently, and nothing collective is added.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from shardckpt.options import rank_cores

__all__ = [
    "CodecBalance", "Estimates", "SaveBalance", "balance_for", "compress_fraction", "contention", "cpu_cost",
    "run_delay", "save_cost", "usable_cores",
]

_PRIOR_BYTES = 64 << 20  # how many raw bytes the previous saves' estimates weigh inside a new save


@dataclass(frozen=True)
class Estimates:
    """Measured costs, all per byte (module docstring). ``wait_s`` is None until a write has been timed."""

    zstd_cpu_s: float  # c_z: thread CPU seconds per raw byte of a compressed block (encode + checksum)
    raw_cpu_s: float  # c_raw: thread CPU seconds per raw byte of a block stored raw (checksum)
    ratio: float  # r: stored / raw over compressed blocks
    write_cpu_s: float  # c_w: thread CPU seconds per stored byte inside append
    wait_s: float | None  # d_a: storage wait per stored byte while appends run (overlaps encoding)
    finish_s: float  # d_f: finish (fsync / upload completion) seconds per stored byte
    cores: float | None = None  # P as measured: the cores the encoder threads actually got
    threads: int = 0  # how many encoder threads that was measured over


def usable_cores(est: Estimates | None, cores: float) -> float:
    """``P``: this rank's share of the machine, or less where its threads measurably got less
    (other processes, a training loop beside an async save)."""
    if est is None or est.cores is None:
        return cores
    return max(min(cores, est.cores), 1e-3)


def cpu_cost(est: Estimates, f: float) -> float:
    """``C(f)``: CPU thread-seconds per raw byte (checksums, encoding, the writes' own CPU)."""
    stored = 1.0 - f * (1.0 - est.ratio)
    return est.raw_cpu_s + f * (est.zstd_cpu_s - est.raw_cpu_s) + est.write_cpu_s * stored


def save_cost(est: Estimates, cores: float, f: float) -> float:
    """Seconds per raw byte of a save that compresses the fraction ``f`` of its bytes (``T(f)``)."""
    stored = 1.0 - f * (1.0 - est.ratio)
    return max(cpu_cost(est, f) / max(cores, 1e-3), (est.wait_s or 0.0) * stored) + est.finish_s * stored


def contention(est: Estimates | None, cores: float) -> float:
    """``k``: the share of the cores its encoder threads could have had (this rank's ``cores``, or
    fewer where fewer threads ran) that they did not get while runnable."""
    if est is None or est.cores is None or cores <= 0.0:
        return 0.0
    could = min(cores, est.threads) if est.threads else cores
    return min(1.0, max(0.0, 1.0 - est.cores / could))


def compress_fraction(est: Estimates, cores: float, busy: float = 0.0) -> float:
    """The fraction of raw bytes to compress that makes the save cheapest (module docstring): the
    fastest for ``busy`` 0 (a blocking save, or spare cores), the least CPU for ``busy`` 1 (a
    background save on cores the training loop needs). 1.0 while the sink is unknown (compress,
    to learn the encoder), 0.0 when compression saves nothing."""
    if est.wait_s is None:
        return 1.0
    if est.ratio >= 1.0:
        return 0.0
    p = max(cores, 1e-3)
    candidates = [0.0, 1.0]
    slope = (est.zstd_cpu_s - est.raw_cpu_s - est.write_cpu_s * (1.0 - est.ratio)) / p + est.wait_s * (1.0 - est.ratio)
    if slope > 0.0:  # where the encoder stage (rising with f) meets the append stage (falling)
        crossing = (est.wait_s - (est.raw_cpu_s + est.write_cpu_s) / p) / slope
        if 0.0 < crossing < 1.0:
            candidates.append(crossing)
    costs = {f: (1.0 - busy) * save_cost(est, p, f) + busy * cpu_cost(est, f) / p for f in candidates}
    best = min(costs.values())
    return max(f for f, c in costs.items() if c <= best * (1.0 + 1e-9))


class _Sums:
    """Byte and time totals of one kind of measurement."""

    __slots__ = ("zstd_raw", "zstd_cpu", "zstd_stored", "raw_raw", "raw_cpu", "sink_bytes", "busy_s",
                 "append_wall", "append_cpu", "append_wait", "finish_s", "ran", "queued", "threads")

    def __init__(self) -> None:
        self.zstd_raw = self.zstd_stored = self.raw_raw = self.sink_bytes = 0
        self.zstd_cpu = self.raw_cpu = self.busy_s = self.append_wall = self.append_cpu = 0.0
        self.append_wait = self.finish_s = self.ran = self.queued = 0.0
        self.threads: set[int] = set()


def run_delay() -> float:
    """Seconds this thread has waited for a core so far (Linux schedstat; 0.0 where unavailable)."""
    global _schedstat
    if not _schedstat:
        return 0.0
    try:
        # One pread on a descriptor kept per thread: open + read + close each released and retook
        # the GIL, four times per block, and the training thread beside an async save paid for
        # every handoff (goodput.py counted its voluntary context switches).
        fd = getattr(_thread_stat, "fd", None)
        if fd is None:
            fd = _ThreadStat(os.open("/proc/thread-self/schedstat", os.O_RDONLY))
            _thread_stat.fd = fd
        return int(os.pread(fd.fd, 128, 0).split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        _schedstat = False  # not this kernel: waits for a core then count as storage waits
        return 0.0


class _ThreadStat:
    """A thread's schedstat descriptor, closed when the thread ends (its thread-local goes)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        os.close(self.fd)


_schedstat = True
_thread_stat = threading.local()


def _forget_thread_stat() -> None:
    global _thread_stat
    _thread_stat = threading.local()  # a forked child's thread must not read its parent thread's file


os.register_at_fork(after_in_child=_forget_thread_stat)


class CodecBalance:
    """What one storage kind has measured across this process's saves (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.estimates: Estimates | None = None

    def start_save(self, cores: float | None = None, background: bool = False) -> SaveBalance:
        """A per-save policy starting from the current estimates; ``background`` for a save that
        runs beside the training loop (its CPU time is priced, module docstring)."""
        with self._lock:
            prior = self.estimates
        return SaveBalance(self, prior, rank_cores() if cores is None else cores, background)

    def _fold(self, est: Estimates) -> None:
        with self._lock:
            self.estimates = est


_registry: dict[str, CodecBalance] = {}
_registry_lock = threading.Lock()


def balance_for(kind: str) -> CodecBalance:
    """The process-wide balance of one storage kind (created on first use)."""
    with _registry_lock:
        found = _registry.get(kind)
        if found is None:
            found = _registry[kind] = CodecBalance()
        return found


class SaveBalance:
    """One save's policy: picks blocks to compress and records what each block and write cost."""

    def __init__(self, owner: CodecBalance | None, prior: Estimates | None, cores: float,
                 background: bool = False) -> None:
        self._owner = owner
        self._prior = prior
        self.cores = cores
        self.background = background
        self._lock = threading.Lock()
        self._sums = _Sums()
        self._seen = 0  # raw bytes decided so far
        self._compressed = 0  # of which compressed
        self._busy = 0  # writer threads inside append
        self._busy_since = 0.0
        self._fraction = self._target(prior) if prior is not None else 1.0

    @property
    def fraction(self) -> float:
        """The compressed fraction currently aimed at."""
        return self._fraction

    def choose(self, raw_bytes: int) -> bool:
        """True when the next block of ``raw_bytes`` should be compressed."""
        with self._lock:
            self._seen += raw_bytes
            # Error diffusion: compress while that keeps the compressed share at most half a block
            # above the target, so the realised fraction tracks ``f`` to within one block.
            take = self._compressed + raw_bytes / 2 <= self._fraction * self._seen
            if take:
                self._compressed += raw_bytes
            return take

    def record_block(self, raw_bytes: int, stored_bytes: int, cpu_s: float, compressed: bool,
                     queued_s: float = 0.0) -> None:
        """A block's encode + checksum thread CPU time, as compressed (asked for zstd) or raw, and
        how long its thread waited for a core meanwhile."""
        with self._lock:
            s = self._sums
            s.ran += cpu_s
            s.queued += queued_s
            s.threads.add(threading.get_ident())
            if compressed:
                s.zstd_raw += raw_bytes
                s.zstd_stored += stored_bytes
                s.zstd_cpu += cpu_s
            else:
                s.raw_raw += raw_bytes
                s.raw_cpu += cpu_s
            self._refresh()

    def sink_enter(self) -> None:
        """A writer thread starts an append (the sink is busy while any thread is inside one)."""
        with self._lock:
            if self._busy == 0:
                self._busy_since = time.perf_counter()
            self._busy += 1

    def sink_exit(self, stored_bytes: int, wall_s: float, cpu_s: float, queued_s: float) -> None:
        """The append of ``stored_bytes`` took ``wall_s``, of which ``cpu_s`` on this thread's CPU
        and ``queued_s`` waiting for a core; the rest was the storage's own wait."""
        with self._lock:
            self._busy -= 1
            if self._busy == 0:
                self._sums.busy_s += time.perf_counter() - self._busy_since
            s = self._sums
            s.sink_bytes += stored_bytes
            s.append_wall += wall_s
            s.append_cpu += cpu_s
            s.append_wait += max(0.0, wall_s - cpu_s - queued_s)
            self._refresh()

    def finished(self, finish_s: float) -> Estimates | None:
        """The save's ``finish`` took ``finish_s``: fold this save into the storage kind's estimates
        (returned; None when nothing was written)."""
        with self._lock:
            self._sums.finish_s += finish_s
            est = self._estimate(final=True)
        if est is not None and self._owner is not None:
            self._owner._fold(est)
        return est

    def estimate(self) -> Estimates | None:
        """The estimates this save balances with now."""
        with self._lock:
            return self._estimate(final=False)

    def _refresh(self) -> None:
        est = self._estimate(final=False)
        if est is not None:
            self._fraction = self._target(est)

    def _target(self, est: Estimates) -> float:
        busy = contention(est, self.cores) if self.background else 0.0
        return compress_fraction(est, usable_cores(est, self.cores), busy)

    def _estimate(self, final: bool) -> Estimates | None:
        s, p = self._sums, self._prior
        w = 0.0 if p is None else float(_PRIOR_BYTES)

        def blend(prior: float | None, total: float, nbytes: int) -> float | None:
            # Bytes-weighted: the previous saves count as _PRIOR_BYTES of evidence.
            if prior is None or w == 0.0:
                return total / nbytes if nbytes else None
            return (prior * w + total) / (w + nbytes)

        zstd_cpu = blend(None if p is None else p.zstd_cpu_s, s.zstd_cpu, s.zstd_raw)
        ratio = blend(None if p is None else p.ratio, float(s.zstd_stored), s.zstd_raw)
        raw_cpu = blend(None if p is None else p.raw_cpu_s, s.raw_cpu, s.raw_raw)
        if zstd_cpu is None or ratio is None:
            return None  # nothing compressed yet: keep compressing to learn the encoder
        wait: float | None = None
        write_cpu = None if p is None else p.write_cpu_s
        if s.sink_bytes:
            busy = s.busy_s
            if self._busy and not final:
                # Writers overlap, so the busy span may not have closed yet: count it up to now.
                busy += time.perf_counter() - self._busy_since
            # Overlapping appends wait on the same storage: the union of their spans, in the share
            # that was neither CPU nor waiting for a core, is the storage's wait.
            share = s.append_wait / s.append_wall if s.append_wall > 0 else 0.0
            wait = busy * share / s.sink_bytes
            write_cpu = s.append_cpu / s.sink_bytes
        finish = s.finish_s / s.sink_bytes if final and s.sink_bytes else (None if p is None else p.finish_s)
        if not final and p is not None and p.wait_s is not None:
            # Mid-save a slower storage is believed as evidence builds up (bytes-weighted against
            # the previous saves, so a slow first append moves little); a faster one only from the
            # next save (a few appends into a page cache say little about the throttling to come).
            wait = p.wait_s if wait is None else max(p.wait_s, blend(p.wait_s, wait * s.sink_bytes, s.sink_bytes) or 0.0)
        elif wait is None and p is not None:
            wait = p.wait_s
        got, threads = (None, 0) if p is None else (p.cores, p.threads)
        if s.ran > 0.0:
            got, threads = len(s.threads) * s.ran / (s.ran + s.queued), len(s.threads)
        return Estimates(zstd_cpu, raw_cpu if raw_cpu is not None else 0.0, ratio,
                         write_cpu if write_cpu is not None else 0.0, wait, finish if finish is not None else 0.0, got,
                         threads)
