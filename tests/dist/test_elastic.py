"""The main scenario under real torchrun: SIGKILL of a worker, elastic restart from the latest
committed checkpoint with bit-identical final parameters, then a restart on another world size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import shardckpt

ROOT = Path(__file__).resolve().parents[2]


def _torchrun(nproc: int, *args: str, restarts: int = 0) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={restarts}", str(ROOT / "launch" / "train.py"), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_sigkill_elastic_restart_is_bit_identical_then_reshards(tmp_path):
    common = ["--steps", "12", "--save-interval", "5"]
    ref_out = _torchrun(2, *common, "--ckpt", str(tmp_path / "ref"), "--final", str(tmp_path / "ref.json"))
    assert "fresh start" in ref_out
    out = _torchrun(2, *common, "--ckpt", str(tmp_path / "el"), "--crash-at", "8",
                    "--final", str(tmp_path / "el.json"), restarts=1)
    assert "SIGKILL at step 8" in out and "attempt 1: 2 ranks, resumed from step 5" in out
    ref, el = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ref", "el"))
    assert el["resumed"] == 5
    assert el["params"] == ref["params"], "resumed run diverged from the uninterrupted one"
    assert el["loss"] == ref["loss"]

    out = _torchrun(3, "--steps", "14", "--save-interval", "5", "--ckpt", str(tmp_path / "el"),
                    "--final", str(tmp_path / "re.json"))
    assert "3 ranks, resumed from step 12" in out
    re = json.loads((tmp_path / "re.json").read_text())
    assert re["world"] == 3 and re["resumed"] == 12
    assert shardckpt.committed_steps(tmp_path / "el") == [10, 12, 14]
    assert sorted(d for d in os.listdir(tmp_path / "el") if d.startswith("step-")) == [f"step-{s:08d}" for s in (10, 12, 14)]
