"""ModelOptimizerState remembers the names of get_state_dict's answer across saves (state_recipe.py).

Each case checks that the answer it gives is the one torch gives at that moment (same names, same
order, the same bytes, the optimizer's own state dicts, the current hyperparameters), and whether
torch was asked: a remembered answer must never be stale, and a changed model or optimizer must
be asked again."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint.state_dict as dcp_state_dict
from torch import nn

import shardckpt
from shardckpt.state_recipe import StateRecipe

pytestmark = pytest.mark.timeout(120)

_REAL_GET_STATE_DICT = dcp_state_dict.get_state_dict  # uncounted: what torch answers


class Net(nn.Module):
    def __init__(self, tie: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.body = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 6))
        self.head = nn.Linear(6, 11, bias=False)
        if tie:
            self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(6))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(x) * self.scale))


def _trained(tie: bool = False) -> shardckpt.ModelOptimizerState:
    torch.manual_seed(0)
    model = Net(tie)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, optim)
    return shardckpt.ModelOptimizerState(model, optim)


def _step(model: nn.Module, optim: torch.optim.Optimizer) -> None:
    model(torch.arange(8).reshape(2, 4)).sum().backward()
    optim.step()
    optim.zero_grad()


@pytest.fixture
def asked(monkeypatch):
    """How many times torch's get_state_dict ran."""
    calls = []
    real = dcp_state_dict.get_state_dict

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dcp_state_dict, "get_state_dict", counting)
    return calls


def _same_value(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))  # type: ignore[arg-type]
    return a == b


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _assert_torch_agrees(mos: shardckpt.ModelOptimizerState) -> None:
    """The answer for a save equals get_state_dict's, asked now (outside the count)."""
    got = mos.state_dict_for_save()
    want_model, want_optim = _REAL_GET_STATE_DICT(mos.model, mos.optimizer)
    model, optim = got["model"], got["optim"]
    assert list(model) == list(want_model)
    for name, tensor in model.items():
        mine, want = _local(tensor), _local(want_model[name])
        assert mine.data_ptr() == want.data_ptr() and torch.equal(mine, want), name
        assert getattr(tensor, "placements", None) == getattr(want_model[name], "placements", None), name
    assert list(optim["state"]) == list(want_optim["state"])
    for name, per_param in optim["state"].items():
        assert per_param is want_optim["state"][name], name  # the optimizer's own dict, as torch gives
    assert len(optim["param_groups"]) == len(want_optim["param_groups"])
    for group, want in zip(optim["param_groups"], want_optim["param_groups"]):
        assert list(group) == list(want)
        assert all(_same_value(group[k], want[k]) for k in want), (group, want)


def test_a_repeated_save_does_not_ask_torch_and_gives_its_answer(asked):
    mos = _trained()
    mos.state_dict_for_save()
    assert len(asked) == 1
    for _ in range(3):
        _step(mos.model, mos.optimizer)
        mos.optimizer.param_groups[0]["lr"] *= 0.5  # a scheduler: the hyperparameters are read live
        _assert_torch_agrees(mos)
    assert len(asked) == 1
    assert mos.optimizer.param_groups[0]["lr"] == 1e-2 / 8
    assert mos.state_dict_for_save()["optim"]["param_groups"][0]["lr"] == 1e-2 / 8


def test_tied_weights_keep_both_names():
    mos = _trained(tie=True)
    mos.state_dict_for_save()
    assert mos._recipe is not None
    _assert_torch_agrees(mos)
    assert mos.state_dict_for_save()["model"]["head.weight"] is mos.model.embed.weight


def test_a_compiled_model_is_named_like_torch_names_it(asked):
    mos = _trained()
    mos.model = torch.compile(mos.model)  # wrapped in _orig_mod, never run: no compiling here
    mos.state_dict_for_save()
    _assert_torch_agrees(mos)
    assert "body.0.weight" in mos.state_dict_for_save()["model"]
    assert len(asked) == 1


def test_the_public_state_dict_is_detached(asked):
    mos = _trained()
    mos.state_dict()
    sd = mos.state_dict()
    assert len(asked) == 1
    assert all(not t.requires_grad for t in sd["model"].values())
    assert sd["model"]["body.0.weight"].data_ptr() == mos.model.body[0].weight.data_ptr()


def _replace_optimizer(mos):
    mos.optimizer = torch.optim.AdamW(mos.model.parameters(), lr=1e-3)
    _step(mos.model, mos.optimizer)


def _replace_param(mos):
    mos.model.body[0].weight = nn.Parameter(torch.randn(6, 6))
    _replace_optimizer(mos)


def _swap_data(mos):
    mos.model.body[0].weight.data = torch.randn(6, 6)


def _add_group(mos):
    extra = nn.Linear(6, 2)
    mos.model.extra = extra
    mos.optimizer.add_param_group({"params": list(extra.parameters()), "lr": 0.5})
    _step(mos.model, mos.optimizer)
    mos.model.extra(torch.ones(1, 6)).sum().backward()
    mos.optimizer.step()


def _reload_optimizer(mos):
    mos.optimizer.load_state_dict(mos.optimizer.state_dict())


def _new_buffer(mos):
    mos.model.body[1].register_buffer("seen", torch.zeros(2))


def _persist_scratch(mos):
    mos.model._non_persistent_buffers_set.discard("scratch")


def _reorder_children(mos):
    body = mos.model.body
    mos.model.body = nn.Sequential(body[2], body[1], body[0])


@pytest.mark.parametrize(
    "change",
    [_replace_optimizer, _replace_param, _swap_data, _add_group, _reload_optimizer, _new_buffer, _persist_scratch,
     _reorder_children],
)
def test_a_change_gives_torch_answer_again(change, asked):
    mos = _trained()
    mos.state_dict_for_save()
    change(mos)
    _assert_torch_agrees(mos)
    _assert_torch_agrees(mos)


def _state_dict_hook(mos):
    mos.model.body[0].register_state_dict_post_hook(lambda module, sd, prefix, local: None)


def _state_dict_pre_hook(mos):
    mos.model.register_state_dict_pre_hook(lambda module, prefix, keep_vars: None)


def _optimizer_hook(mos):
    mos.optimizer.register_state_dict_post_hook(lambda optim, sd: sd)


class _Extra(nn.Linear):
    def get_extra_state(self) -> object:
        return {"calls": 1}

    def set_extra_state(self, state: object) -> None:
        pass


def _extra_state(mos):
    mos.model.body[0] = _Extra(6, 6)
    _replace_optimizer(mos)


@pytest.mark.parametrize("change", [_state_dict_hook, _state_dict_pre_hook, _optimizer_hook, _extra_state])
def test_anything_beyond_renaming_always_asks_torch(change, asked):
    mos = _trained()
    change(mos)
    for _ in range(3):
        mos.state_dict_for_save()
    assert len(asked) == 3
    assert mos._recipe is None


def test_an_optimizer_without_state_is_not_remembered():
    torch.manual_seed(0)
    model = Net()
    optim = torch.optim.SGD(model.parameters(), lr=0.1)  # stateless: nothing to name
    msd, osd = dcp_state_dict.get_state_dict(model, optim)
    assert StateRecipe.learn(model, optim, msd, osd) is None


def test_repeated_saves_round_trip(tmp_path):
    mos = _trained()
    for i in range(3):
        _step(mos.model, mos.optimizer)
        shardckpt.save({"train": mos, "step": i}, tmp_path / f"c{i}")
    assert mos._recipe is not None
    want = {k: v.clone() for k, v in mos.model.state_dict().items()}
    moments = [v["exp_avg"].clone() for v in mos.optimizer.state.values()]
    torch.manual_seed(9)
    fresh = shardckpt.ModelOptimizerState(Net(), None)
    fresh.optimizer = torch.optim.AdamW(fresh.model.parameters(), lr=1e-2)
    shardckpt.load({"train": fresh, "step": 0}, tmp_path / "c2")
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(v, want[k]), k
    got = [v["exp_avg"] for v in fresh.optimizer.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(got, moments, strict=True))


def _items(mos: shardckpt.ModelOptimizerState) -> dict[str, object]:
    from shardckpt.flatten import flatten_state

    tensors, _ = flatten_state({"train": mos}, 0)
    return {t.key: t for t in tensors}


def test_flatten_reuses_the_items_of_unchanged_tensors():
    mos = _trained()
    _items(mos)  # learns the recipe (its items are of torch's detached tensors)
    first = _items(mos)
    _step(mos.model, mos.optimizer)
    again = _items(mos)
    assert again.keys() == first.keys()
    assert all(again[k] is first[k] for k in first)  # nothing recomputed for a live tensor


def test_flatten_sees_data_replaced_under_a_kept_tensor():
    mos = _trained()
    _items(mos)
    _items(mos)
    mos.model.scale.data = torch.arange(7.0)  # same buffer object, other storage and shape
    bias = mos.model.body[0].bias
    bias.data = torch.full((6,), 3.0)
    items = _items(mos)
    scale = items["train/model/scale"]
    assert scale.shape == (7,) and torch.equal(scale.local, torch.arange(7.0))
    assert torch.equal(items["train/model/body.0.bias"].local, torch.full((6,), 3.0))


def test_metadata_rows_are_reused_only_for_the_same_items():
    from shardckpt.flatten import flatten_state
    from shardckpt.plan_exchange import fingerprint, metadata_rows

    mos = _trained()
    _items(mos)
    first, _ = flatten_state({"train": mos}, 0)
    rows, fp = metadata_rows(first)
    again, _ = flatten_state({"train": mos}, 0)
    assert metadata_rows(again)[0] is rows  # the same items: nothing recomputed
    mos.model.scale.data = torch.arange(7.0)  # one item is made anew, with another shape
    changed, _ = flatten_state({"train": mos}, 0)
    new_rows, new_fp = metadata_rows(changed)
    assert new_rows == [t.meta() for t in changed] and new_fp == fingerprint(new_rows) != fp


def _flat(state: dict[str, object], rank: int = 0) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """flatten_state's items, comparable: every field, and where each item's bytes are."""
    from shardckpt.flatten import flatten_state

    tensors, values = flatten_state(state, rank)
    return (
        [(*t.meta(), t.local.data_ptr(), t.local.dtype) for t in tensors],
        [(v.key, v.path, v.value, v.per_rank) for v in values],
    )


def _walked(mos: shardckpt.ModelOptimizerState, wrap) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """What the walk over the answer's dicts gives, at the same path."""
    return _flat({"train": wrap(mos.state_dict_for_save()), "step": 3})


@pytest.mark.parametrize("wrap", [lambda x: x, shardckpt.PerRank], ids=["shared", "per_rank"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_a_remembered_answer_flattens_as_its_walk_does(wrap, tie):
    mos = _trained(tie)
    _flat({"train": wrap(mos)})  # learns the recipe
    assert mos.leaves_for_save() is not None
    for _ in range(2):
        got = _flat({"train": wrap(mos), "step": 3})
        assert got == _walked(mos, wrap)
        _step(mos.model, mos.optimizer)


def test_a_remembered_answer_is_flattened_without_asking_for_it(monkeypatch):
    mos = _trained()
    want = _flat({"train": mos})

    def asked() -> dict[str, object]:
        raise AssertionError("state_dict_for_save asked while the recipe holds")

    monkeypatch.setattr(mos, "state_dict_for_save", asked)
    assert _flat({"train": mos}) == want


def _new_moment(mos):
    state = next(iter(mos.optimizer.state.values()))
    state["exp_avg"] = torch.full_like(state["exp_avg"], 7.0)  # rebound, not changed in place


def _new_state_key(mos):
    next(iter(mos.optimizer.state.values()))["extra"] = torch.ones(2)


def _plain_values_state(mos):
    state = next(iter(mos.optimizer.state.values()))
    state.clear()
    state["step"] = 4.0  # no tensor: the walk stores the whole dict as one value


def _mixed_state(mos):
    next(iter(mos.optimizer.state.values()))["count"] = 4


def _scheduled_lr(mos):
    mos.optimizer.param_groups[0]["lr"] = 0.125


def _tensor_lr(mos):
    mos.optimizer.param_groups[0]["lr"] = torch.tensor(0.25)  # the walk goes into the groups


@pytest.mark.parametrize(
    "change", [_new_moment, _new_state_key, _plain_values_state, _mixed_state, _scheduled_lr, _tensor_lr, _swap_data]
)
def test_a_remembered_answer_flattens_as_its_walk_does_after(change):
    mos = _trained()
    _flat({"train": mos})
    _flat({"train": mos})
    change(mos)
    assert _flat({"train": mos, "step": 3}) == _walked(mos, lambda x: x)
