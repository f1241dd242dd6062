"""The replica digests (replica_digest.py): the device digest's arithmetic, checked against plain
Python integers on the host, where the same code runs as on a GPU."""

from __future__ import annotations

import pytest
import torch

from shardckpt import replica_digest as rd


def _reference(t: torch.Tensor) -> str:
    """The digest's definition, in exact Python integers."""
    raw = t.contiguous().reshape(-1).view(torch.uint8).tolist()
    whole = len(raw) // 4 * 4
    words = [int.from_bytes(bytes(raw[i : i + 4]), "little") for i in range(0, whole, 4)] + raw[whole:]
    out = ""
    for a, b in rd._WEIGHTS:
        total = sum(w * ((((i & rd._MASK31) * a + b) & rd._MASK31) | 1) for i, w in enumerate(words))
        out += f"{total & rd._MASK64:016x}"
    return out


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(37, 5),
        torch.randn(11).to(torch.bfloat16),  # 22 bytes: a 2-byte tail
        torch.tensor([True, False, True]),  # 3 bytes: only a tail
        torch.arange(-50, 50, dtype=torch.int8),
        torch.tensor([-1, 2**62], dtype=torch.int64),
        torch.empty(0, 3),
    ],
    ids=["fp32", "bf16-tail", "bool", "int8", "int64", "empty"],
)
def test_device_digest_matches_its_definition(tensor):
    assert rd.device_digest(tensor) == _reference(tensor)


def test_device_digest_does_not_depend_on_the_chunk_size(monkeypatch):
    t = torch.randn(1001)
    whole = rd.device_digest(t)
    monkeypatch.setattr(rd, "_CHUNK_WORDS", 7)
    assert rd.device_digest(t) == whole


def test_every_single_bit_flip_and_a_swap_change_the_device_digest():
    t = torch.randint(-(2**31), 2**31 - 1, (64,), dtype=torch.int32)
    base = rd.device_digest(t)
    for word in (0, 31, 63):
        for bit in (0, 17, 31):
            flipped = t.clone()
            flipped[word] ^= torch.tensor(1 << bit if bit < 31 else -(2**31), dtype=torch.int32)
            assert rd.device_digest(flipped) != base, (word, bit)
    swapped = t.clone()
    swapped[[3, 4]] = swapped[[4, 3]]
    assert rd.device_digest(swapped) != base  # position matters, not only the multiset of words


def test_replica_digest_names_dtype_shape_and_the_kind_and_ignores_strides():
    t = torch.randn(6, 4)
    assert rd.replica_digest(t.t()) == rd.replica_digest(t.t().contiguous())
    assert rd.replica_digest(t).startswith("xxh3:torch.float32[6, 4]:")
    assert rd.replica_digest(t) != rd.replica_digest(t.reshape(4, 6))  # same bytes, other shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_tensor_is_digested_on_the_device_with_the_same_result():
    t = torch.randn(1 << 20)
    assert rd.replica_digest(t.cuda()) == f"dev:torch.float32[{1 << 20}]:{rd.device_digest(t)}"


def test_the_commit_compares_replica_digests_within_a_kind():
    from shardckpt.commit import check_replicas
    from shardckpt.errors import ReplicaMismatchError

    host, device = "xxh3:torch.float32[4]:aa", "dev:torch.float32[4]:bb"
    check_replicas([{"hashes": {"w": host}}, {"hashes": {"w": device}}])  # host and device copies
    with pytest.raises(ReplicaMismatchError, match="plain tensor 'w' holds different values on rank 0 and rank 1"):
        check_replicas([{"hashes": {"w": host}}, {"hashes": {"w": "xxh3:torch.float32[4]:ab"}}])
