"""Migration from DCP keeps optimizer and scheduler state exactly; inspect --json stays unambiguous;
a key the target has and the checkpoint lacks is a MissingKeysError, never a raw KeyError."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

import shardckpt
from shardckpt.cli import main

pytestmark = pytest.mark.timeout(120)


class Decay:
    """A callable object with nothing in its __dict__: LambdaLR saves it as {}, which DCP drops."""

    def __call__(self, epoch: int) -> float:
        return 0.5**epoch


class Scaled:
    def __init__(self, rate: float) -> None:
        self.rate = rate

    def __call__(self, epoch: int) -> float:
        return self.rate * (epoch + 1)


def _build(
    seed: int, optimizer: str, lr: float = 0.1, lambdas: str = "mixed"
) -> tuple[nn.Module, torch.optim.Optimizer, LambdaLR]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": lr / 2}]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    # "empty": lr_lambdas is [{}, {}], which DCP drops whole; "mixed": [{}, {"rate": 0.5}], of
    # which DCP records only the second element.
    return model, opt, LambdaLR(opt, Decay() if lambdas == "empty" else [Decay(), Scaled(0.5)])


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, sched: LambdaLR, step: int) -> torch.Tensor:
    x, y = _batch(step)
    loss = (model(x) - y).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.detach()


def _dcp_save(state: dict[str, object], path: str) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process"
        dcp.save(state, checkpoint_id=path, no_dist=True)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("target", ["get_state_dict", "objects"])
@pytest.mark.parametrize("lambdas", ["mixed", "empty"])
def test_dcp_migration_resumes_training_bit_identically(tmp_path, optimizer, target, lambdas):
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt, sched = _build(0, optimizer, lambdas=lambdas)
    for step in range(3):
        _train_step(model, opt, sched, step)
    msd, osd = get_state_dict(model, opt)
    assert sched.state_dict()["lr_lambdas"] == ([{}, {}] if lambdas == "empty" else [{}, {"rate": 0.5}])
    _dcp_save({"model": msd, "optim": osd, "sched": sched.state_dict(), "step": 3}, str(tmp_path / "dcp"))
    want_loss = _train_step(model, opt, sched, 3)  # the original run's next step
    want_lrs = [g["lr"] for g in opt.param_groups]
    want_params = [p.detach().clone() for p in model.parameters()]

    assert main(["convert", "--from", "dcp", str(tmp_path / "dcp"), str(tmp_path / "conv")]) == 0
    index = shardckpt.read_index(tmp_path / "conv")
    groups = next(v for v in index.values if v.key == "optim/param_groups")
    assert isinstance(groups.value, list) and len(groups.value) == 2  # a list, not a dict with 0 and "0"

    model2, opt2, sched2 = _build(7, optimizer, lr=0.9, lambdas=lambdas)  # other weights, other lr
    if target == "objects":
        state: dict[str, object] = {"model": model2, "optim": opt2, "sched": sched2, "step": 0}
        shardckpt.load(state, tmp_path / "conv")
    else:
        msd2, osd2 = get_state_dict(model2, opt2)
        state = {"model": msd2, "optim": osd2, "sched": sched2, "step": 0}
        shardckpt.load(state, tmp_path / "conv")
        set_state_dict(model2, opt2, model_state_dict=msd2, optim_state_dict=osd2)
    assert state["step"] == 3
    assert sched2.state_dict() == sched.state_dict() | {"last_epoch": 3, "_step_count": 4,
                                                         "_last_lr": sched2.state_dict()["_last_lr"]}
    assert [g["lr"] for g in opt2.param_groups] == sched2.get_last_lr()

    got_loss = _train_step(model2, opt2, sched2, 3)
    assert torch.equal(_bits(got_loss), _bits(want_loss))
    assert [g["lr"] for g in opt2.param_groups] == want_lrs
    for got, want in zip(model2.parameters(), want_params):
        assert torch.equal(_bits(got), _bits(want))


def test_dcp_migration_of_a_plain_optimizer_state_dict_keeps_int_ids(tmp_path):
    # optimizer.state_dict() keys its state by int ids; DCP records them as strings.
    model, opt, sched = _build(0, "adamw")
    for step in range(2):
        _train_step(model, opt, sched, step)
    _dcp_save({"model": model.state_dict(), "optim": opt.state_dict()}, str(tmp_path / "dcp"))
    want_loss = _train_step(model, opt, sched, 2)

    assert main(["convert", "--from", "dcp", str(tmp_path / "dcp"), str(tmp_path / "conv")]) == 0
    paths = {t.path for t in shardckpt.read_index(tmp_path / "conv").tensors}
    assert ("optim", "state", 0, "exp_avg") in paths
    model2, opt2, sched2 = _build(5, "adamw")
    sched2.load_state_dict(sched.state_dict() | {"last_epoch": 2, "_step_count": 3})
    # No module in the state: the optimizer keeps its own (int-keyed) state_dict.
    shardckpt.load({"model": model2.state_dict(), "optim": opt2}, tmp_path / "conv")
    assert set(opt2.state) == set(model2.parameters())
    assert torch.equal(_bits(_train_step(model2, opt2, sched2, 2)), _bits(want_loss))


def test_dcp_list_elements_that_dcp_dropped_come_back_empty(tmp_path):
    from shardckpt.interop.dcp import read_dcp

    _dcp_save({"a": [{}, {"x": torch.ones(2)}, {}], "b": {"c": [1, 2]}}, str(tmp_path / "dcp"))
    got = read_dcp(tmp_path / "dcp")
    assert list(got) == ["a", "b"] and got["b"] == {"c": [1, 2]}
    assert got["a"][0] == {} and torch.equal(got["a"][1]["x"], torch.ones(2)) and len(got["a"]) == 2


def test_convert_from_dcp_of_a_shardckpt_directory_is_a_clean_error(tmp_path, capsys):
    shardckpt.save({"w": torch.ones(3)}, tmp_path / "native")
    assert main(["convert", "--from", "dcp", str(tmp_path / "native"), str(tmp_path / "out")]) == 2
    assert "CheckpointNotFoundError" in capsys.readouterr().err


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"duplicate JSON keys: {keys}"
    return dict(pairs)


def test_inspect_json_has_no_duplicate_keys(tmp_path, capsys):
    shardckpt.save({"w": torch.ones(2), "ids": {0: "int zero", "0": "str zero"}, "t": (1, 2)}, tmp_path / "c")
    assert main(["inspect", str(tmp_path / "c"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out, object_pairs_hook=_no_duplicate_keys)
    assert doc["values"]["ids"] == {"$dict": [[0, "int zero"], ["0", "str zero"]]}  # the stored typed form
    assert doc["values"]["t"] == {"$tuple": [1, 2]}


def test_a_key_the_checkpoint_lacks_under_a_stateful_is_missing_keys_error(tmp_path):
    opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    saved = LambdaLR(opt, Scaled(0.5)).state_dict()
    del saved["lr_lambdas"]
    shardckpt.save({"sched": saved}, tmp_path / "c")
    with pytest.raises(shardckpt.MissingKeysError, match="'sched/lr_lambdas'"):
        shardckpt.load({"sched": LambdaLR(opt, Scaled(2.0))}, tmp_path / "c")
    with pytest.raises(shardckpt.MissingKeysError, match="'sched/lr_lambdas'"):
        shardckpt.load({"sched": LambdaLR(opt, lambda e: 1.0)}, tmp_path / "c")  # saves [None]
    # An entry that holds nothing is kept from the target: there is nothing to load into it.
    sched = LambdaLR(opt, Decay())
    shardckpt.load({"sched": sched}, tmp_path / "c")
    assert sched.state_dict()["lr_lambdas"] == [{}] and sched.last_epoch == saved["last_epoch"]
    # strict=False loads the rest and leaves the target's entry alone.
    sched = LambdaLR(opt, Scaled(2.0))
    shardckpt.load({"sched": sched}, tmp_path / "c", strict=False)
    assert sched.lr_lambdas[0].rate == 2.0


def test_missing_keys_in_a_plain_value_dict(tmp_path):
    shardckpt.save({"cfg": {"lr": 0.5, "nested": {"a": 1}}}, tmp_path / "c")
    state: dict[str, object] = {"cfg": {"lr": 0.0, "nested": {"a": 0, "b": 0}, "extra": {}}}
    with pytest.raises(shardckpt.MissingKeysError, match="'cfg/nested/b'"):
        shardckpt.load(state, tmp_path / "c")
    state = {"cfg": {"lr": 0.0, "nested": {"a": 0}, "extra": {}}}
    shardckpt.load(state, tmp_path / "c")
    assert state["cfg"] == {"lr": 0.5, "nested": {"a": 1}, "extra": {}}
