"""Start-up time of the commands that only read JSON (``--help``, ``ls``, ``inspect``), as ratios.

    python3 benchmarks/cli_start.py --repeats 7

Each figure is the median wall time of a fresh ``python3 -m shardckpt.cli ...`` process. The goal
(issue 14): these commands never import torch, so each takes well under a quarter of what
``import torch`` alone takes on the same machine (and under 0.5 s on a 2-core machine), where
they used to take more than ``import torch`` itself. A loaded machine slows every figure alike,
which is why the goal is a ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _median_s(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    import torch

    import shardckpt

    with tempfile.TemporaryDirectory() as tmp:
        m = shardckpt.CheckpointManager(Path(tmp) / "root", async_save=False)
        m.save(1, {"w": torch.randn(256, 256), "step": 1})
        m.close()
        step = str(Path(tmp) / "root" / "step-00000001")
        cli = [sys.executable, "-m", "shardckpt.cli"]
        bare = _median_s([sys.executable, "-c", "pass"], args.repeats)
        torch_s = _median_s([sys.executable, "-c", "import torch"], args.repeats)
        print(f"python -c pass      {bare:6.3f} s")
        print(f"import torch        {torch_s:6.3f} s")
        for name, argv in (("--help", ["--help"]), ("ls", ["ls", str(Path(tmp) / "root")]),
                           ("inspect", ["inspect", step]), ("inspect --json", ["inspect", "--json", step])):
            s = _median_s(cli + argv, args.repeats)
            goal = "ok" if s < 0.25 * torch_s else "MISSED (goal: < 0.25x import torch)"
            print(f"{name:<18}  {s:6.3f} s  {s / torch_s:5.2f}x import torch  {goal}")


if __name__ == "__main__":
    main()
