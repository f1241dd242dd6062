"""Goodput (issue 11, item 6): training throughput while checkpointing every k steps, against no
checkpointing, for shardckpt async, DCP async_save and torch.save, in one run.

    python3 benchmarks/goodput.py --ranks 2 --mb 300 --steps 24 --every 4 --repeats 3
    python3 benchmarks/goodput.py --diagnose   # adds compression "zstd" and SHARDCKPT_IO_THREADS=1 rows

The model is the demo's transformer (launch/train.py, FSDP2 over gloo on CPU, AdamW), widened so that
weights + both Adam moments come to --mb MB over all ranks. Each mode trains --steps steps and saves
after every --every steps (not after the last: the loop ends by waiting for the last save, which is
timed, so every save is paid for in full). Modes run interleaved, in a rotated order each repeat, in
the same processes on the same model; each figure is the slowest rank's. Reported per mode: steps/s
(median and min..max over repeats), the loss 1 - mode/none, the stall per save (time the loop was
blocked in the save call; for DCP also the wait for the previous save), and where the rest went:
steps that ran while a save was in flight vs steps that did not, the training thread's CPU time vs
its wall time on those steps (off-CPU time is run-queue wait, the GIL, or waiting in a collective for
a slower rank), its involuntary context switches (preemption: CPU contention), and the CPU time that
the process's other threads used (the encoders and writers). Writes goodput.md and goodput.json to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "launch"))

import torch
import torch.distributed as dist
from spawn import run_workers

# name -> (system, compression, SHARDCKPT_IO_THREADS or None for the default,
#          nice of shardckpt's background threads or None for the library's own, 19)
Mode = tuple[str, str, int | None, int | None]
MODES: dict[str, Mode] = {
    "none": ("none", "", None, None),
    "shardckpt async auto": ("shardckpt", "auto", None, None),
    "shardckpt async none": ("shardckpt", "none", None, None),
    "dcp async_save": ("dcp", "", None, None),
    "torch.save": ("torch", "", None, None),
}
# Where shardckpt's loss comes from: more encoding CPU (zstd), fewer writer threads (io1), and the
# background threads at nice 0, the training's own priority (the library runs them at 19, so that
# the kernel gives them only CPU the training leaves idle; nice does not touch the GIL). Setting
# nice 0 back needs root (or CAP_SYS_NICE); without it those rows equal the defaults.
DIAGNOSE: dict[str, Mode] = {
    "shardckpt async zstd": ("shardckpt", "zstd", None, None),
    "shardckpt async auto io1": ("shardckpt", "auto", 1, None),
    "shardckpt async none io1": ("shardckpt", "none", 1, None),
    "shardckpt async auto nice0": ("shardckpt", "auto", None, 0),
    "shardckpt async none nice0": ("shardckpt", "none", None, 0),
}
LAYERS = 8


def model_dim(mb: float, layers: int, vocab: int, seq: int) -> int:
    """The width whose weights + two fp32 Adam moments come closest to ``mb`` MB (a multiple of 32,
    so the demo's 4 heads divide it)."""
    # Per block: attention 4*d^2 + 4d, MLP 8*d^2 + 5d, two LayerNorms 4d; plus embeddings and head.
    def params(d: int) -> int:
        return layers * (12 * d * d + 13 * d) + 2 * vocab * d + seq * d + 2 * d

    target = mb * 1e6 / 12  # 4 bytes weight + 8 bytes of Adam moments per parameter
    d = int(math.sqrt(target / (12 * layers)))
    return min(range(32, d + 65, 32), key=lambda x: abs(params(x) - target))


def _thread_switches() -> tuple[int, int]:
    """The calling thread's (voluntary, involuntary) context switches."""
    vol = invol = 0
    with open(f"/proc/self/task/{threading.get_native_id()}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches"):
                vol = int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches"):
                invol = int(line.split()[1])
    return vol, invol


def _process_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _to_local(obj: object) -> object:
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return obj.to_local()
    if isinstance(obj, dict):
        return {k: _to_local(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_local(v) for v in obj]
    return obj


class _Saver:
    """One mode's save calls. ``save`` returns the time the loop was blocked; ``in_flight`` says
    whether a background save is still running; ``finish`` waits for the last one (timed by the caller)."""

    def __init__(self, system: str, compression: str, model: torch.nn.Module, opt: torch.optim.Optimizer,
                 rank: int, side_group: dist.ProcessGroup | None = None, nice: int | None = None) -> None:
        import shardckpt

        self.system, self.compression, self.rank, self.side_group = system, compression, rank, side_group
        self.nice = nice
        self.model, self.opt = model, opt
        self.state = {"train": shardckpt.ModelOptimizerState(model, opt), "step": 0}
        self.pending: object = None
        self.handles: list[object] = []  # shardckpt's save handles, read for their stored / raw bytes

    def save(self, path: Path, step: int) -> float:
        t = time.perf_counter()
        if self.system == "shardckpt":
            import shardckpt

            self.state["step"] = step
            self.pending = shardckpt.async_save(self.state, path, compression=self.compression)
            self.handles.append(self.pending)
            _renice_shardckpt_threads(shardckpt.options.background_nice() if self.nice is None else self.nice)
        elif self.system == "dcp":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            if self.pending is not None:
                self.pending.result()  # type: ignore[attr-defined]  # as users do: one save in flight
            msd, osd = get_state_dict(self.model, self.opt)
            # DCP's background thread runs collectives: on the training group they would interleave
            # with FSDP's (a collective mismatch), so it gets a gloo group of its own, as torchtitan does.
            self.pending = dcp.async_save({"model": msd, "optim": osd, "step": step}, checkpoint_id=str(path),
                                          process_group=self.side_group)
        elif self.system == "torch":
            from torch.distributed.checkpoint.state_dict import get_state_dict

            msd, osd = get_state_dict(self.model, self.opt)
            path.mkdir(parents=True, exist_ok=True)
            with open(path / f"rank{self.rank}.pt", "wb") as f:
                torch.save(_to_local({"model": msd, "optim": osd, "step": step}), f)
                f.flush()
                os.fsync(f.fileno())  # as durable as the others' saves (both fsync their files)
        return time.perf_counter() - t

    def in_flight(self) -> bool:
        return self.pending is not None and not self.pending.done()  # type: ignore[attr-defined]

    def finish(self) -> None:
        if self.pending is None:
            return
        if self.system == "shardckpt":
            self.pending.wait()  # type: ignore[attr-defined]
        else:
            self.pending.result()  # type: ignore[attr-defined]
        self.pending = None

    def stored_share(self) -> float:
        """Stored / raw bytes over this run's shardckpt saves (1.0 for the others: never compressed)."""
        results = [h.wait() for h in self.handles]  # type: ignore[attr-defined]  # all done: finish() waited
        raw = sum(r.bytes_raw for r in results)
        return sum(r.bytes_stored for r in results) / raw if raw else 1.0


def _renice_shardckpt_threads(nice: int) -> None:
    """Set the nice value of the threads shardckpt lowers, its encoder and writer pool (their OS
    threads, by native id; Linux keeps a nice value per thread). The modes share those threads,
    and pool threads start on demand, so this runs after every save, with the library's own value
    for the modes that do not set one."""
    for t in threading.enumerate():
        if t.name.startswith("shardckpt-write") and t.native_id is not None:
            try:
                os.setpriority(os.PRIO_PROCESS, t.native_id, nice)
            except (OSError, ProcessLookupError):  # the thread ended meanwhile, or no permission to lower it
                pass


def _build(args: argparse.Namespace, world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    import train  # launch/train.py: the demo's model, widened (its globals size the blocks it builds)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    train.LAYERS = args.layers
    train.DIM = args.dim
    torch.manual_seed(0)
    model = train.TinyLM()
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    params = sum(p.numel() for p in model.parameters())
    return model, opt, params


def _slowest(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def worker(rank: int, world: int, args: argparse.Namespace, init: str, results: object) -> None:
    os.environ["LOCAL_WORLD_SIZE"] = str(world)  # as torchrun sets it: shardckpt sizes its pools by it
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    import torch.nn.functional as F
    import train

    import shardckpt

    model, opt, params = _build(args, world)
    dcp_group = dist.new_group(backend="gloo")
    data = train.corpus(512, seed=1)
    g = torch.Generator().manual_seed(100 + rank)
    work = Path(args.work)
    modes = {name: spec for name, spec in {**MODES, **DIAGNOSE}.items() if name in args.modes}
    default_io = os.environ.get("SHARDCKPT_IO_THREADS")
    io_now: list[int | None] = [None]

    def step() -> None:
        batch = data[torch.randint(0, len(data), (args.batch,), generator=g)]
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, train.VOCAB), batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def use_io_threads(io: int | None) -> bool:
        """Point shardckpt at this mode's writer-thread count; True when its saver was recreated."""
        if io == io_now[0]:
            return False
        shardckpt.shutdown()  # the saver reads SHARDCKPT_IO_THREADS when it is created
        if io is None:
            os.environ.pop("SHARDCKPT_IO_THREADS", None)
            if default_io is not None:
                os.environ["SHARDCKPT_IO_THREADS"] = default_io
        else:
            os.environ["SHARDCKPT_IO_THREADS"] = str(io)
        io_now[0] = io
        return True

    def ckpt_dir(name: str) -> Path:
        return work / name.replace(" ", "_").replace(".", "")

    def clean(name: str) -> None:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(ckpt_dir(name), ignore_errors=True)
        dist.barrier()

    # Warm-up: Adam's moments exist after the first step; each mode saves once untimed (page faults,
    # thread start-up and shardckpt's staging pool, which a training job pays once).
    for _ in range(2):
        step()
    for name, (system, compression, io, nice) in modes.items():
        if system == "none":
            continue
        if system == "shardckpt":
            use_io_threads(io)
        saver = _Saver(system, compression, model, opt, rank, dcp_group, nice)
        saver.save(ckpt_dir(name) / "warm", 0)
        saver.finish()
        clean(name)

    runs: dict[str, list[dict[str, float]]] = {name: [] for name in modes}
    order = list(modes)
    for rep in range(args.repeats):
        rotated = order[rep % len(order):] + order[: rep % len(order)]
        for name in rotated:
            system, compression, io, nice = modes[name]
            if system == "shardckpt" and use_io_threads(io):  # a fresh saver: warm its pool untimed
                warm = _Saver(system, compression, model, opt, rank, dcp_group, nice)
                warm.save(ckpt_dir(name) / "warm", 0)
                warm.finish()
            saver = _Saver(system, compression, model, opt, rank, dcp_group, nice) if system != "none" else None
            stalls: list[float] = []
            overlapped: list[tuple[float, float]] = []  # (wall, training-thread CPU) per step
            clean_steps: list[tuple[float, float]] = []
            dist.barrier()
            vol0, invol0 = _thread_switches()
            cpu_all0, cpu_main0 = _process_cpu(), time.thread_time()
            t0 = time.perf_counter()
            for s in range(1, args.steps + 1):
                busy = saver is not None and saver.in_flight()
                ts, cs = time.perf_counter(), time.thread_time()
                step()
                (overlapped if busy else clean_steps).append((time.perf_counter() - ts, time.thread_time() - cs))
                if saver is not None and s % args.every == 0 and s < args.steps:
                    stalls.append(saver.save(ckpt_dir(name) / f"r{rep}-s{s}", s))
            t_drain = time.perf_counter()
            if saver is not None:
                saver.finish()
            elapsed = time.perf_counter() - t0
            drain = time.perf_counter() - t_drain
            cpu_main = time.thread_time() - cpu_main0
            cpu_other = _process_cpu() - cpu_all0 - cpu_main
            vol1, invol1 = _thread_switches()

            def mean(rows: list[tuple[float, float]], i: int) -> float:
                return statistics.fmean(r[i] for r in rows) if rows else float("nan")

            row = [elapsed, drain, sum(stalls), max(stalls, default=0.0), mean(clean_steps, 0), mean(clean_steps, 1),
                   mean(overlapped, 0), mean(overlapped, 1), float(len(overlapped)), cpu_main, cpu_other,
                   float(vol1 - vol0), float(invol1 - invol0)]
            # nan (no overlapped steps) must not win the max: carry it as -1.
            slow = _slowest([-1.0 if math.isnan(v) else v for v in row])
            keys = ["seconds", "drain_s", "stall_total_s", "stall_max_s", "clean_step_s", "clean_step_cpu_s",
                    "overlapped_step_s", "overlapped_step_cpu_s", "overlapped_steps", "main_cpu_s", "other_cpu_s",
                    "voluntary_switches", "involuntary_switches"]
            rec = {k: (float("nan") if v == -1.0 else v) for k, v in zip(keys, slow)}
            rec["saves"] = float(len(stalls))
            rec["stored_share"] = saver.stored_share() if saver is not None else 1.0
            rec["steps_per_s"] = args.steps / rec["seconds"]
            runs[name].append(rec)
            clean(name)
    shardckpt.shutdown()
    if rank == 0:
        state_mb = 12 * params / 1e6
        results.put({"runs": runs, "params": params, "state_mb": state_mb})  # type: ignore[attr-defined]
    dist.destroy_process_group()


def _within_run_loss(r: dict[str, float]) -> float:
    """The share of a run's time that its saves cost, measured inside the run: the stalls, the final
    drain, and how much longer the steps that ran beside a save took than that run's other steps.
    Pairing steps of one run cancels the drift between runs that the run-against-run loss suffers
    from on a small shared machine (the steps of "none" vary by several percent from run to run)."""
    ov = r["overlapped_step_s"]
    inflation = 0.0 if math.isnan(ov) else r["overlapped_steps"] * (ov - r["clean_step_s"])
    return (r["stall_total_s"] + r["drain_s"] + inflation) / r["seconds"]


def summarize(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Medians per mode, the spread of steps/s, and the loss against "none" (per repeat, then median:
    the modes of one repeat ran back to back, so pairing them cancels slow drifts of the machine)."""
    base = runs["none"]
    out: dict[str, dict[str, float]] = {}
    for name, recs in runs.items():
        sps = [r["steps_per_s"] for r in recs]
        losses = [1 - r["steps_per_s"] / b["steps_per_s"] for r, b in zip(recs, base)]
        within = [_within_run_loss(r) for r in recs]
        saves = sum(r["saves"] for r in recs)
        row = {k: statistics.median(r[k] for r in recs) for k in recs[0] if not math.isnan(recs[0][k])}
        row.update({
            "steps_per_s": statistics.median(sps), "steps_per_s_min": min(sps), "steps_per_s_max": max(sps),
            "loss": statistics.median(losses), "loss_min": min(losses), "loss_max": max(losses),
            "within_loss": statistics.median(within), "within_loss_min": min(within), "within_loss_max": max(within),
            "stall_per_save_s": sum(r["stall_total_s"] for r in recs) / saves if saves else 0.0,
            "saves_per_run": recs[0]["saves"],
        })
        ov = [r["overlapped_step_s"] for r in recs if not math.isnan(r["overlapped_step_s"])]
        if ov:
            row["overlapped_step_s"] = statistics.median(ov)
            row["overlapped_step_cpu_s"] = statistics.median(
                r["overlapped_step_cpu_s"] for r in recs if not math.isnan(r["overlapped_step_cpu_s"]))
        out[name] = row
    return out


def markdown(report: dict) -> str:
    med: dict[str, dict[str, float]] = report["median"]
    cfg = report["config"]
    none = med["none"]
    lines = [
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']['cpu_count']} CPUs, {report['machine']['platform']}, "
        f"Python {report['machine']['python']}, torch {report['machine']['torch']}  ",
        f"Model: the demo's transformer at {cfg['layers']} layers x {cfg['dim']} wide, {report['params'] / 1e6:.1f}M "
        f"parameters, FSDP2 over {cfg['ranks']} gloo ranks on CPU, AdamW: {report['state_mb']:.0f} MB of weights + "
        f"Adam moments ({report['state_mb'] / cfg['ranks']:.0f} MB per rank); batch {cfg['batch']} x "
        f"{report['seq']} tokens per rank. {cfg['steps']} steps per run, a save after every {cfg['every']} "
        f"(the last one waited for inside the timed run); {cfg['repeats']} repeats, modes interleaved; the "
        "slowest rank's figures; median [min..max] over repeats.",
        "",
        "| mode | steps/s | loss vs none | loss within the run | saves/run | stall per save s | drain s "
        "| clean step s | step during a save s | its training-thread CPU s | other threads' CPU s/run | stored / raw |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in med.items():
        loss = "–" if name == "none" else f"{m['loss']:.3f} [{m['loss_min']:.3f}..{m['loss_max']:.3f}]"
        within = "–" if name == "none" else (
            f"{m['within_loss']:.3f} [{m['within_loss_min']:.3f}..{m['within_loss_max']:.3f}]")
        ov = f"{m['overlapped_step_s']:.3f}" if "overlapped_step_s" in m else "–"
        ovc = f"{m['overlapped_step_cpu_s']:.3f}" if "overlapped_step_cpu_s" in m else "–"
        lines.append(
            f"| {name} | {m['steps_per_s']:.3f} [{m['steps_per_s_min']:.3f}..{m['steps_per_s_max']:.3f}] | {loss} | "
            f"{within} | {m['saves_per_run']:.0f} | {m['stall_per_save_s']:.3f} | {m['drain_s']:.3f} | {m['clean_step_s']:.3f} | "
            f"{ov} | {ovc} | {m['other_cpu_s'] - none['other_cpu_s']:+.2f} | {m.get('stored_share', 1.0):.2f} |"
        )
    lines += ["", "Where each mode's extra time went (seconds per run, medians; extra = run time - none's run time; "
              "the last columns are the training thread's context switches per run, voluntary ones are waits "
              "(the GIL, a collective), involuntary ones preemption (CPU contention)):", "",
              "| mode | extra | stalls | drain | steps during a save, beyond the run's clean steps | clean step's training-thread"
              " CPU s | voluntary switches (none: {:.0f}) | involuntary switches (none: {:.0f}) |".format(
                  none["voluntary_switches"], none["involuntary_switches"]),
              "|---|---|---|---|---|---|---|---|"]
    for name, m in med.items():
        if name == "none":
            continue
        inflation = m.get("overlapped_steps", 0) * (m.get("overlapped_step_s", 0) - m["clean_step_s"])
        lines.append(f"| {name} | {m['seconds'] - none['seconds']:.2f} | {m['stall_total_s']:.2f} | {m['drain_s']:.2f} "
                     f"| {inflation:.2f} ({m.get('overlapped_steps', 0):.0f} steps) | {m['clean_step_cpu_s']:.3f} | "
                     f"{m['voluntary_switches']:.0f} | {m['involuntary_switches']:.0f} |")
    goal = report.get("goal")
    if goal:
        lines += ["", "Goal (issue 11, item 6): shardckpt's loss <= 0.5x DCP async's. Run against run: "
                  f"shardckpt async auto {goal['auto']}; shardckpt async none {goal['none']}. Within the run: "
                  f"shardckpt async auto {goal['auto_within']}; shardckpt async none {goal['none_within']}."]
    return "\n".join(lines) + "\n"


def _goal(med: dict[str, dict[str, float]], name: str, key: str = "loss") -> str:
    if name not in med or "dcp async_save" not in med:
        return "not run"
    ours, theirs = med[name][key], med["dcp async_save"][key]
    if theirs <= 0:
        return f"loss {ours:.3f} vs DCP's {theirs:.3f} (DCP lost nothing measurable: no ratio)"
    ratio = ours / theirs
    return f"{ratio:.2f}x DCP's loss ({'met' if ratio <= 0.5 else 'not met'})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--mb", type=float, default=300.0, help="weights + Adam moments over all ranks, MB")
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    ap.add_argument("--steps", type=int, default=24, help="steps per run")
    ap.add_argument("--every", type=int, default=4, help="save after every N steps")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join({**MODES, **DIAGNOSE})}")
    ap.add_argument("--diagnose", action="store_true", help="add the rows that say where shardckpt's loss comes from")
    ap.add_argument("--out", default="benchmarks/out/goodput")
    ap.add_argument("--work", default=None, help="checkpoint directory (default: a temp dir under --out)")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.diagnose:
        modes += [m for m in DIAGNOSE if m not in modes]
    unknown = [m for m in modes if m not in MODES and m not in DIAGNOSE]
    if unknown:
        ap.error(f"unknown modes {unknown}")
    if "none" not in modes:
        modes.insert(0, "none")
    args.modes = modes
    if args.every >= args.steps:
        ap.error("--every must be smaller than --steps (a run saves after every N steps, not after the last)")
    import train

    args.dim = model_dim(args.mb, args.layers, train.VOCAB, train.SEQ)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="goodput-", dir=str(out)))
    args.work = str(work)
    t0 = time.time()
    try:
        got = run_workers(worker, args.ranks, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = summarize(got["runs"])  # type: ignore[index]
    report = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "config": {k: v for k, v in vars(args).items() if k != "work"},
        "params": got["params"], "state_mb": got["state_mb"], "seq": train.SEQ,  # type: ignore[index]
        "median": med,
        "goal": {"auto": _goal(med, "shardckpt async auto"), "none": _goal(med, "shardckpt async none"),
                 "auto_within": _goal(med, "shardckpt async auto", "within_loss"),
                 "none_within": _goal(med, "shardckpt async none", "within_loss")},
        "runs": got["runs"],  # type: ignore[index]
        "seconds": time.time() - t0,
    }
    (out / "goodput.json").write_text(json.dumps(report, indent=1))
    (out / "goodput.md").write_text(markdown(report))
    print((out / "goodput.md").read_text())


if __name__ == "__main__":
    main()
