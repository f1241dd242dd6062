"""The example training job: a small transformer language model trained with FSDP2 under torchrun,
checkpointing asynchronously with CheckpointManager and resuming from the latest checkpoint.

    torchrun --nproc_per_node=2 --max-restarts=1 launch/train.py --ckpt runs/x --steps 30 --crash-at 17

CPU + gloo by default; CUDA + NCCL when GPUs are present. ``--crash-at S`` makes one rank SIGKILL
itself at step S on the first attempt, so torchrun restarts the group, which resumes from the
latest committed checkpoint. ``--final F`` writes a digest of every final parameter to F.

For the node-loss scenario (launch/node_loss.py): ``--digests D`` writes, at every save, a digest
of the full parameters and optimizer state to D/step-N.json, and after every restore checks that
the restored state matches the saved step's digest bit for bit; ``--timeline T`` appends one line
per step (attempt, world size, step, the sampler's epoch and position) so that the data order can
be checked across restarts; ``--step-sleep`` slows the loop so that nodes can come and go.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import xxhash
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import shardckpt

VOCAB, SEQ, DIM, LAYERS, HEADS = 256, 32, 96, 3, 4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS, dropout=0.1, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM), nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.randn(SEQ, DIM) * 0.02)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def corpus(n: int, seed: int) -> torch.Tensor:
    """Sequences from a fixed random Markov chain: learnable, and the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    trans = torch.softmax(torch.randn(VOCAB, VOCAB, generator=g) * 3, dim=-1)
    out = torch.empty(n, SEQ + 1, dtype=torch.long)
    out[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(SEQ):
        out[:, t + 1] = torch.multinomial(trans[out[:, t]], 1, generator=g).squeeze(1)
    return out


def digest(model: nn.Module) -> dict[str, str]:
    """xxh3 of every full parameter (collective: gathers each shard)."""
    out = {}
    for name, p in model.named_parameters():
        full = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
        out[name] = xxhash.xxh3_64_hexdigest(full.cpu().contiguous().view(torch.uint8).numpy())
    return out


def state_digest(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, str]:
    """Digest of every full parameter and every full optimizer state tensor (collective)."""
    out = {f"param/{k}": v for k, v in digest(model).items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in sorted(opt.state.get(p, {}).items()):
                t = v.detach()
                full = t.full_tensor() if hasattr(t, "full_tensor") else t
                out[f"optim/{names[id(p)]}/{k}"] = xxhash.xxh3_64_hexdigest(full.cpu().reshape(-1).view(torch.uint8).numpy())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--save-interval", type=int, default=5)
    ap.add_argument("--keep-last", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    ap.add_argument("--crash-at", type=int, default=None)
    ap.add_argument("--crash-rank", type=int, default=1)
    ap.add_argument("--final", default=None)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--digests", default=None, help="directory for per-step state digests (checked at restore)")
    ap.add_argument("--timeline", default=None, help="file to append one line per step to (rank 0)")
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--memory-every", type=int, default=None,
                    help="also save into the memory tier every N steps (copied to another node)")
    ap.add_argument("--memory-root", default="/dev/shm/shardckpt", help="the memory tier's root (per host)")
    ap.add_argument("--memory-job", default="train", help="the memory tier's job name under its root")
    ap.add_argument("--hold", default=None,
                    help="scenario pacing: before the last step, wait while this file exists (so a replacement "
                         "node joins a job that still has steps to run)")
    ap.add_argument("--dim", type=int, default=None, help="model width (the recovery benchmark scales it up)")
    ap.add_argument("--layers", type=int, default=None)
    args = ap.parse_args()
    global DIM, LAYERS
    DIM, LAYERS = args.dim or DIM, args.layers or LAYERS
    t_start = time.time()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    t_init = time.time()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = TinyLM().to(device)
    mesh = init_device_mesh(device.type, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    data = corpus(4096, args.seed)
    sampler = shardckpt.ResumableSampler(len(data), rank=rank, world_size=world, seed=args.seed)
    shardckpt.seed_everything(args.seed + 1 + rank)  # per-rank dropout streams
    state = {
        "train": shardckpt.ModelOptimizerState(model, opt),
        "sched": sched,
        "sampler": sampler,
        "rng": shardckpt.RNGState(seed=args.seed + 1),
        "step": 0,
    }
    memory = None
    if args.memory_every:
        memory = shardckpt.MemoryTier(every=args.memory_every, keep_last=2, root=args.memory_root, job=args.memory_job)
    manager = shardckpt.CheckpointManager(args.ckpt, keep_last=args.keep_last, save_interval=args.save_interval,
                                          memory=memory)
    t_built = time.time()  # the model, optimizer and data are built: the restore starts
    resumed = manager.restore(state)
    t_restored = time.time()
    start = resumed or 0
    if rank == 0:
        report = manager.last_restore
        tier = f" ({report.tier} tier: {report.reason})" if report is not None and report.tier else ""
        how = f"resumed from step {resumed}{tier}" if resumed is not None else "fresh start"
        print(f"[train] attempt {attempt}: {world} ranks, {how}", flush=True)
    if resumed is not None and args.digests:
        saved = json.loads(open(os.path.join(args.digests, f"step-{resumed}.json")).read())
        now = state_digest(model, opt)
        differ = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
        if differ:
            raise SystemExit(f"restored state differs from the saved step {resumed}: {differ[:5]}")
        if rank == 0:
            print(f"[train] restore check: step {resumed} bit-identical at {world} ranks "
                  f"({sum(k.startswith('param/') for k in now)} parameters, "
                  f"{sum(k.startswith('optim/') for k in now)} optimizer tensors)", flush=True)

    if resumed is not None and resumed >= args.steps and rank == 0:
        # Restored at the last step (a node joined as the job finished): nothing is left to run,
        # and the restore itself is the whole recovery.
        print(f"[train] recovery marks: process start {t_start:.3f}, group up {t_init:.3f}, built {t_built:.3f}, "
              f"restored {t_restored:.3f}, first step done {t_restored:.3f} (no step left to run)", flush=True)
    stalls, memory_stalls, t_loop, loss = [], [], time.perf_counter(), float("nan")
    for step in range(start + 1, args.steps + 1):
        if args.timeline and rank == 0:
            with open(args.timeline, "a") as f:
                f.write(f"{attempt} {world} {step} {sampler.epoch} {sampler.position}\n")
        while args.hold and step == args.steps and os.path.exists(args.hold):
            time.sleep(0.05)
        batch = data[sampler.next_indices(args.batch)].to(device)
        logits = model(batch[:, :-1])
        loss_t = F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        loss_t.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        state["step"] = step
        if args.crash_at == step and rank == args.crash_rank and attempt == 0:
            print(f"[train] rank {rank}: SIGKILL at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        to_memory = memory is not None and step % memory.every == 0
        if args.digests and (manager.should_save(step) or to_memory or step == args.steps):
            # Before the save: once a save can commit, the digest of what it holds exists.
            sums = state_digest(model, opt)
            if rank == 0:
                with open(os.path.join(args.digests, f"step-{step}.json"), "w") as f:
                    json.dump(sums, f)
        handle = manager.save(step, state, force=step == args.steps)
        if handle is not None:
            durable = manager.should_save(step) or step == args.steps
            (stalls if durable else memory_stalls).append(handle.stall_seconds)
        loss = float(loss_t.detach())
        if step == start + 1 and rank == 0 and resumed is not None:
            # Wall-clock marks (time.time(), comparable across processes) for the recovery split.
            print(f"[train] recovery marks: process start {t_start:.3f}, group up {t_init:.3f}, built {t_built:.3f}, "
                  f"restored {t_restored:.3f}, first step done {time.time():.3f}", flush=True)
        if args.step_sleep:
            time.sleep(args.step_sleep)
    loop_s = time.perf_counter() - t_loop  # the training loop, saves' stalls included
    result = manager.wait()
    manager.close()
    elapsed = time.perf_counter() - t_loop
    final = digest(model)
    shardckpt.shutdown()
    steps_run = max(0, args.steps - start)
    if rank == 0:
        stall = f"{1e3 * sum(stalls) / len(stalls):.1f} ms mean stall over {len(stalls)} saves" if stalls else "no saves"
        if memory_stalls:
            stall += (f", {1e3 * sum(memory_stalls) / len(memory_stalls):.1f} ms over {len(memory_stalls)} "
                      "memory-tier saves")
        stall += f", {steps_run / loop_s:.3f} steps/s in the loop" if loop_s > 0 else ""
        tput = f", last save {result.rank_bytes_raw / 1e6:.2f} MB/rank at {result.throughput_mb_s:.0f} MB/s" if result else ""
        print(f"[train] steps {start + 1}..{args.steps} ({steps_run} steps, {elapsed:.1f}s), loss {loss:.3f}; "
              f"{stall}{tput}; committed steps {manager.steps()}", flush=True)
        if args.final:
            with open(args.final, "w") as f:
                json.dump({"world": world, "resumed": resumed, "loss": loss, "params": final}, f, indent=1)
    dist.destroy_process_group()
    if not math.isfinite(loss) and steps_run > 0:
        raise SystemExit("loss is not finite")


if __name__ == "__main__":
    main()
