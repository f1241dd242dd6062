"""Node loss under real torchrun: two agents on 127.0.0.1, each a "node" with 2 workers, training
launch/train.py with async checkpoints into one directory both reach.

    python3 launch/node_loss.py --out runs/node_loss [--steps 60]

1. Both agents rendezvous (c10d backend, ``--nnodes=1:2``): 4 ranks train.
2. Node loss: the second agent and its workers are SIGKILLed, while a save is in flight. With
   ``--memory-every N`` the job also checkpoints into the memory tier (each agent is a node,
   named by SHARDCKPT_NODE_ID), and the killed node's tier is wiped at the same moment.
3. Shrink: the surviving agent re-rendezvouses at 2 ranks and resumes from the latest committed
   step, re-sharded 4 -> 2.
4. Grow: a replacement agent joins; the group restarts at 4 ranks and re-shards 2 -> 4.

At every restore train.py checks the parameters and AdamW state against the digest taken when the
step was saved (bit for bit). Here we check that the data order went on with no sample skipped or
repeated (the sampler's global position, step by step, across every restart), and that every
committed step verifies. Prints the time from node loss to the first step after the restore, split
into detection and rendezvous, process group init, load, and the first step; writes the figures to
OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import shardckpt

ROOT = Path(__file__).resolve().parents[1]
BATCH, DATA = 8, 4096  # train.py's defaults: sequences per rank per step, corpus size


def evict(path: Path) -> None:
    """Drop the files under ``path`` from the page cache (they are clean: every save fsyncs)."""
    for root, _, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue  # a file a save in flight is replacing
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def wait_listening(port: int, node: Node, timeout: float = 120.0) -> None:
    """Wait until ``node``'s agent accepts connections on ``port`` (its rendezvous store is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            raise SystemExit(f"[node-loss] {node.name} exited with {node.proc.returncode}; see {node.log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"[node-loss] {node.name}'s rendezvous store did not come up on port {port}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    """One torchrun agent and its workers, in a session of their own so that a node loss can take
    them all at once."""

    def __init__(self, name: str, out: Path, port: int, train_args: list[str]) -> None:
        self.name = name
        self.log = out / f"{name}.log"
        # The node's name for the memory tier: both "nodes" share this host and its /dev/shm.
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SHARDCKPT_NODE_ID=name)
        # torchrun's shared rendezvous store lets torch's own init_process_group read a dead
        # attempt's addresses after a restart (pytorch/pytorch#135712): a private store per round.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=2",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=node-loss",
               # A silent node is declared dead after 1 s x 3 missed keep-alives (torch's default: 5 s x 3).
               "--rdzv-conf=join_timeout=60,last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3",
               "--max-restarts=5", "--monitor-interval=0.5",
               str(ROOT / "launch" / "train.py"), *train_args]
        self._file = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._file, stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the agent and every process under it at once (torchrun starts its workers in
        sessions of their own, so killing the agent's process group would leave them running).

        Only while the agent is unreaped (``returncode`` still None): until then its pid cannot be
        reused. Once reaped, the pid may already belong to another process (pid_max is 32768
        here and a test run wraps it), and its "descendants" would be somebody else's: a
        concurrent test's ranks were once killed that way."""
        if self.proc.returncode is not None:
            return
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def stop(self) -> None:
        self.kill()  # a no-op for an agent that has exited and been reaped: it waited for its workers
        self._file.close()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def wait_for(what: str, check, timeout: float, nodes: list[Node]) -> object:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        for n in nodes:
            if n.proc.poll() not in (None, 0):
                raise SystemExit(f"[node-loss] {n.name} exited with {n.proc.returncode} while waiting for {what}; "
                                 f"see {n.log}\n{n.text()[-3000:]}")
        time.sleep(0.01)
    raise SystemExit(f"[node-loss] timed out after {timeout:.0f}s waiting for {what}")


def save_in_flight(ckpt: Path) -> bool:
    """A step directory whose index is not written yet: a save is between snapshot and commit."""
    try:
        return any(d.name.startswith("step-") and not (d / "index.json").exists() for d in ckpt.iterdir())
    except FileNotFoundError:
        return False


def timeline(path: Path) -> dict[int, tuple[int, int, int, int]]:
    """step -> (attempt, world, epoch, position) as the job last ran it: steps re-run after a
    restore replace the ones rolled back."""
    out: dict[int, tuple[int, int, int, int]] = {}
    for line in path.read_text().split("\n"):
        if line.strip():
            attempt, world, step, epoch, position = map(int, line.split())
            out[step] = (attempt, world, epoch, position)
    return out


def last_world(path: Path) -> int | None:
    lines = path.read_text().split() if path.exists() else []
    return int(lines[-4]) if len(lines) >= 5 else None


def check_data_order(steps: dict[int, tuple[int, int, int, int]], last: int) -> None:
    """Each step takes the next BATCH * world samples of the epoch's order: the position the job
    logged at each step must be where the previous step left it, whatever the world sizes."""
    epoch, position = 0, 0
    for step in range(1, last + 1):
        if step not in steps:
            raise SystemExit(f"[node-loss] step {step} never ran")
        _attempt, world, got_epoch, got_position = steps[step]
        if (got_epoch, got_position) != (epoch, position):
            raise SystemExit(f"[node-loss] data order broken at step {step}: position {got_epoch}/{got_position}, "
                             f"expected {epoch}/{position} (samples skipped or repeated)")
        if position + BATCH * world > DATA:
            epoch, position = epoch + 1, 0
        position += BATCH * world


def recovery(text: str, t_loss: float) -> dict[str, float]:
    """The recovery split of the first restore logged in ``text``."""
    m = re.search(r"recovery marks: process start ([\d.]+), group up ([\d.]+), built ([\d.]+), restored ([\d.]+), "
                  r"first step done ([\d.]+)", text)
    if not m:
        raise SystemExit("[node-loss] no recovery marks in the surviving node's log")
    start, up, built, restored, first = map(float, m.groups())
    return {"detect_and_rendezvous_s": start - t_loss, "init_s": up - start, "build_s": built - up,
            "load_s": restored - built, "first_step_s": first - restored, "total_s": first - t_loss}


def await_restore(nodes: list[Node], world: int, t_event: float, timeout: float,
                  marks: dict[str, int] | None = None) -> dict[str, float]:
    """Wait for the job to restore at ``world`` ranks and run its first step; return the restored
    step and the recovery split since ``t_event``. Only what the nodes logged after ``marks`` (or
    from now) counts; rank 0, which prints, may be on any live node."""
    marks = marks if marks is not None else {n.name: len(n.text()) for n in nodes}

    def since() -> str:
        return "".join(n.text()[marks.get(n.name, 0):] for n in nodes)

    found = wait_for(f"the {world}-rank restore", lambda: re.search(
        rf"attempt \d+: {world} ranks, resumed from step (\d+)", since()), timeout, nodes)
    step = int(found.group(1))  # type: ignore[union-attr]
    tier = re.search(rf"attempt \d+: {world} ranks, resumed from step {step} \((\w+) tier", since())
    wait_for(f"the {world}-rank restore check and first step", lambda: "recovery marks" in since(), timeout, nodes)
    if f"restore check: step {step} bit-identical at {world} ranks" not in since():
        raise SystemExit(f"[node-loss] the {world}-rank restore was not checked")
    return {"resumed_step": step, "tier": tier.group(1) if tier else "durable", **recovery(since(), t_event)}


def split(r: object) -> str:
    assert isinstance(r, dict)
    return (f"from the {r['tier']} tier, recovery {r['total_s']:.1f} s = "
            f"rendezvous {r['detect_and_rendezvous_s']:.1f} + init {r['init_s']:.2f} + build {r['build_s']:.2f} "
            f"+ load {r['load_s']:.2f} + first step {r['first_step_s']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/node_loss")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--save-interval", type=int, default=5)
    ap.add_argument("--step-sleep", type=float, default=0.15)
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--memory-every", type=int, default=None,
                    help="also checkpoint into the memory tier every N steps; a killed node's tier is wiped with it")
    ap.add_argument("--dim", type=int, default=None, help="train.py's model width (default: the demo's)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="train.py's sequences per rank per step")
    ap.add_argument("--cold", action="store_true",
                    help="evict the durable checkpoints from the page cache at the node loss (a real node's restart)")
    ap.add_argument("--durable", default=None,
                    help="the durable tier's root URL (s3://bucket/prefix; credentials and endpoint from the "
                         "environment) instead of OUT/ckpt on the local disk")
    ap.add_argument("--shrink-only", action="store_true", help="stop after the first step of the 2-rank restore")
    args = ap.parse_args()

    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    (out / "digests").mkdir(parents=True)
    line_file = out / "timeline.txt"
    local = args.durable is None
    ckpt = out / "ckpt" if local else args.durable.rstrip("/")
    port = free_port()
    train = ["--ckpt", str(ckpt), "--steps", str(args.steps), "--save-interval", str(args.save_interval),
             "--keep-last", "3", "--digests", str(out / "digests"), "--timeline", str(line_file),
             "--step-sleep", str(args.step_sleep)]
    # The 2-rank job waits before its last step until the replacement node has joined: else, on a
    # busy machine, it can finish before node2 is up and the grow meets a job with nothing to run.
    hold = out / "hold"
    hold.touch()
    train += ["--hold", str(hold)]
    for flag in ("dim", "layers", "batch"):
        if getattr(args, flag) is not None:
            train += [f"--{flag}", str(getattr(args, flag))]
    memory_root = Path(f"/dev/shm/shardckpt-node-loss-{os.getpid()}")
    if args.memory_every:
        train += ["--memory-every", str(args.memory_every), "--memory-root", str(memory_root), "--memory-job", "job"]
    node0 = Node("node0", out, port, train)
    # node0 must host the rendezvous store: the agent that binds the port first hosts it, and if
    # node1 did (node0 slow to start on a busy machine), killing node1 would take the store along.
    wait_listening(port, node0)
    node1 = Node("node1", out, port, train)
    nodes = started = [node0, node1]
    summary: dict[str, object] = {}
    try:
        # 1. Four ranks train and commit a couple of steps.
        wait_for("4 ranks training", lambda: last_world(line_file) == 4, args.timeout, nodes)
        wait_for("two committed steps", lambda: len(shardckpt.committed_steps(ckpt)) >= 2, args.timeout, nodes)
        # 2. Node loss, while a save is in flight (or, if none shows up in 20 s, mid-training).
        summary["killed_mid_save"] = False
        if local:  # an object store shows nothing of a save before its commit
            try:
                wait_for("a save in flight", lambda: save_in_flight(ckpt), 20, nodes)
                summary["killed_mid_save"] = True
            except SystemExit:
                pass
        node1.kill()
        t_loss = time.time()
        # The node's host memory goes with it: its memory tier is gone at the moment of the loss.
        shutil.rmtree(memory_root / "job" / node1.name, ignore_errors=True)
        if args.cold and local:
            evict(ckpt)
        before = shardckpt.committed_steps(ckpt)
        summary["durable_at_loss"] = before
        print(f"[node-loss] node1 SIGKILLed (agent and both workers); committed steps {before}", flush=True)
        nodes = [node0]
        # 3. Shrink: node0 alone, 2 ranks, resumed and checked.
        summary["shrink"] = await_restore(nodes, 2, t_loss, args.timeout)
        resumed2 = int(summary["shrink"]["resumed_step"])
        print(f"[node-loss] shrink: 2 ranks resumed from step {resumed2} (4 -> 2), bit-identical; "
              f"{split(summary['shrink'])}", flush=True)
        if args.shrink_only:
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
            return
        # 4. Grow: once the 2-rank job has committed a step of its own, a replacement node joins.
        wait_for("a step committed at 2 ranks", lambda: max(shardckpt.committed_steps(ckpt), default=0) > resumed2,
                 args.timeout, nodes)
        marks = {n.name: len(n.text()) for n in nodes}
        t_join = time.time()
        node2 = Node("node2", out, port, train)
        started.append(node2)
        nodes = [node0, node2]
        summary["grow"] = await_restore(nodes, 4, t_join, args.timeout, marks)
        print(f"[node-loss] grow: 4 ranks resumed from step {summary['grow']['resumed_step']} (2 -> 4), "
              f"bit-identical; {split(summary['grow'])}", flush=True)
        # 5. The job finishes at 4 ranks.
        hold.unlink()
        for n in nodes:
            try:
                n.proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                raise SystemExit(f"[node-loss] {n.name} did not finish") from None
            if n.proc.returncode != 0:
                raise SystemExit(f"[node-loss] {n.name} exited with {n.proc.returncode}; see {n.log}")
        check_data_order(timeline(line_file), args.steps)
        steps = shardckpt.committed_steps(ckpt)
        for step in steps:
            shardckpt.verify(f"{ckpt}/step-{step:08d}")
        if not steps or steps[-1] != args.steps:
            raise SystemExit(f"[node-loss] the last step {args.steps} is not committed: {steps}")
        summary.update(committed_steps=steps, data_order="continuous", verified=len(steps))
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"[node-loss] done: data order continuous over {args.steps} steps (no sample skipped or repeated); "
              f"committed steps {steps} all verify", flush=True)
    finally:
        hold.unlink(missing_ok=True)
        for n in started:
            n.stop()
        shutil.rmtree(memory_root, ignore_errors=True)


if __name__ == "__main__":
    main()
