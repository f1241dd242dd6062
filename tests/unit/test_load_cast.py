"""load(dtype_cast=True): an fp32 checkpoint fills a bf16 model (and back), cast; without it a
dtype change is refused with an error that names the tensor and the keyword."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import shardckpt

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("compression", ["none", "zstd"])  # raw blocks are otherwise read straight into the target
def test_fp32_checkpoint_fills_a_bf16_model_only_when_asked(tmp_path, compression):
    torch.manual_seed(0)
    saved = nn.Sequential(nn.Linear(33, 70), nn.Linear(70, 5))
    shardckpt.save({"model": saved, "step": torch.tensor(7)}, tmp_path / "c", compression=compression)
    model = nn.Sequential(nn.Linear(33, 70), nn.Linear(70, 5)).bfloat16()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(shardckpt.StateMismatchError, match="'model/0.weight'.*float32.*bfloat16.*dtype_cast=True"):
        shardckpt.load({"model": model}, tmp_path / "c")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # refused before any read
    step = torch.tensor(0.0)
    state = {"model": model, "step": step}
    with pytest.raises(shardckpt.StateMismatchError, match="'step'.*int64.*float32"):  # not floating: never cast
        shardckpt.load(state, tmp_path / "c", dtype_cast=True)
    shardckpt.load({"model": model}, tmp_path / "c", dtype_cast=True)
    for k, v in saved.state_dict().items():
        assert model.state_dict()[k].dtype == torch.bfloat16 and torch.equal(model.state_dict()[k], v.bfloat16()), k


def test_bf16_checkpoint_into_fp32_is_exact(tmp_path):
    w = torch.randn(300, 17).bfloat16()
    shardckpt.save({"w": w}, tmp_path / "c", compression="none")
    target = {"w": torch.zeros(300, 17)}
    shardckpt.load(target, tmp_path / "c", dtype_cast=True)
    assert torch.equal(target["w"], w.float())


@pytest.mark.parametrize("case", ["cast", "transposed view", "compressed"])
def test_parameters_are_filled_in_place_whatever_the_read_path(tmp_path, case):
    # Bytes read straight into a target never met autograd; a copy into one did, and a parameter
    # that requires grad (or a view of one) refused it: "a view of a leaf Variable that requires
    # grad is being used in an in-place operation".
    w = torch.randn(13, 7)
    codec = "zstd" if case == "compressed" else "none"
    shardckpt.save({"w": w}, tmp_path / "c", compression=shardckpt.CompressionOptions(codec=codec))
    if case == "cast":
        p = torch.nn.Parameter(torch.zeros(13, 7, dtype=torch.bfloat16))
        target, want = p, w.to(torch.bfloat16)
    elif case == "transposed view":
        p = torch.nn.Parameter(torch.zeros(7, 13))
        target, want = p.t(), w
    else:
        p = torch.nn.Parameter(torch.zeros(13, 7))
        target, want = p, w
    shardckpt.load({"w": target}, tmp_path / "c", dtype_cast=case == "cast")
    assert torch.equal(target.detach(), want) and p.requires_grad and p.grad_fn is None
