"""The node-loss scenario, bounded: two torchrun agents of 2 workers each on 127.0.0.1; one agent
and its workers are SIGKILLed mid-save; the survivor resumes at 2 ranks (4 -> 2), a replacement
agent joins and the job resumes at 4 ranks (2 -> 4). launch/node_loss.py checks every restore
bit for bit against the saved step, the data order across restarts, and verify on every step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_node_loss_shrinks_then_grows_with_exact_restores(tmp_path):
    cmd = [sys.executable, str(ROOT / "launch" / "node_loss.py"), "--out", str(tmp_path / "run"),
           "--steps", "40", "--step-sleep", "0.1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=480, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    shrink, grow = summary["shrink"], summary["grow"]
    # Resumed from a committed step at each change of size, and the job finished at 4 ranks.
    assert 0 < shrink["resumed_step"] < grow["resumed_step"] < 40
    assert summary["committed_steps"][-1] == 40 and summary["verified"] == len(summary["committed_steps"])
    assert summary["data_order"] == "continuous"
    out = proc.stdout
    assert f"shrink: 2 ranks resumed from step {shrink['resumed_step']} (4 -> 2), bit-identical" in out
    assert f"grow: 4 ranks resumed from step {grow['resumed_step']} (2 -> 4), bit-identical" in out


def test_node_loss_with_a_memory_tier_restores_the_survivors_from_memory(tmp_path):
    # Every step also goes into the memory tier, copied to the other node. The killed node's tier
    # is wiped with it; the survivors restore from their own node's memory (their copies of the
    # dead node's files), 4 -> 2, bit for bit. After the shrink the job runs on one node, where no
    # copy can go to another node: memory saves are refused and the grow restores from durable.
    cmd = [sys.executable, str(ROOT / "launch" / "node_loss.py"), "--out", str(tmp_path / "run"),
           "--steps", "30", "--step-sleep", "0.1", "--memory-every", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=480, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["shrink"]["tier"] == "memory" and summary["grow"]["tier"] == "durable"
    # Memory holds every step: at least as new as the newest durable one at the loss.
    assert summary["shrink"]["resumed_step"] >= max(summary["durable_at_loss"])
    assert summary["committed_steps"][-1] == 30 and summary["data_order"] == "continuous"
    assert "from the memory tier" in proc.stdout
