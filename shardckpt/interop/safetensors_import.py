"""Import Hugging Face safetensors: straight into a sharded state, or as plain tensors.

``load_safetensors(state, path)`` fills the tensors of ``state`` (a module, or a nested dict of
tensors and DTensors) in place from a ``model.safetensors`` file or a sharded directory
(``model.safetensors.index.json`` and its files), re-sharded to each tensor's current placement:
FSDP2's ``Shard(0)``, tensor parallel's column/row shards, 2-D strided layouts. This is what
DCP's ``HuggingFaceStorageReader`` does, without DCP.

Each rank reads only its own bytes. safetensors holds each tensor as raw row-major bytes, so the
part of a tensor a rank holds (one box of the global tensor per ``layout.local_layout``, several
for a strided shard) is a set of contiguous byte runs: one run per index of the box's leading
dimensions, down to the last dimension it does not span whole; the runs are maximal, adjacent
bytes are always one run. A ``Shard(0)`` shard is one run; a column shard (``Shard(1)``) is one
run per row. Runs are read with ranged reads through the ``Storage`` protocol (local paths and
``s3://`` alike), in pieces of at most ``PIECE_BYTES``, and copied into the local shard (straight
into it where dtype and memory allow).

Names: a tensor's name in the file is ``prefix`` plus its path in ``state`` joined with ``.``; a
module contributes the names of ``get_model_state_dict`` (DDP's ``module.`` and ``torch.compile``'s
``_orig_mod.`` dropped), so a ``transformers`` model matches what ``save_pretrained`` wrote. A
module's tied parameters (an LM head tied to the embedding, which ``save_pretrained`` writes
once) are filled through whichever of their names the file holds.

``read_safetensors(path)`` is the template-free reader: every tensor (or the named ones) as plain
CPU tensors, allocated only once the header holding it has been validated against the file.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from shardckpt.dist import Comm
from shardckpt.errors import CheckpointError, CorruptCheckpointError, MissingKeysError, StateMismatchError
from shardckpt.flatten import MAX_NESTING, tied_names, unstorable
from shardckpt.interop.safetensors_format import Run, SafetensorsSource, TensorInfo, from_le
from shardckpt.layout import local_layout
from shardckpt.module_state import ModuleRoute
from shardckpt.options import io_threads
from shardckpt.pipeline.reader import run_bounded
from shardckpt.planning.boxes import Box, split_box
from shardckpt.storage.s3 import S3Options

log = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]
# Bytes of one ranged read job (and of its staging buffer where it cannot read in place).
PIECE_BYTES = 16 << 20


@dataclass(frozen=True)
class ImportResult:
    """What ``load_safetensors`` did on this rank."""

    path: str
    tensors: int  # tensors of the state filled (tied names count once)
    bytes_read: int  # tensor data read by this rank: its shards' bytes, nothing more
    missing: tuple[str, ...] = ()  # names in the state that the file lacks (strict=False)
    unexpected: tuple[str, ...] = ()  # names under prefix in the file that the state lacks (strict=False)
    cast: tuple[str, ...] = ()  # names whose dtype differed, cast (dtype_cast=True)


def load_safetensors(
    state: nn.Module | dict[str, object],
    path: PathLike,
    *,
    prefix: str = "",
    strict: bool = True,
    dtype_cast: bool = False,
    process_group: dist.ProcessGroup | None = None,
    s3: S3Options | None = None,
) -> ImportResult:
    """Fill ``state`` in place from Hugging Face safetensors at ``path``; collective.

    - ``state``: an ``nn.Module`` (plain, FSDP2, tensor parallel) or a nested dict of tensors and
      DTensors (a state dict). Each rank reads only the bytes of its own shards.
    - ``path``: a ``.safetensors`` file, a ``model.safetensors.index.json``, or a directory holding
      one of them; local, or ``s3://bucket/prefix``. Links in a local directory are followed (the
      Hugging Face cache is made of them).
    - ``prefix``: prepended to the state's names to find them in the file
      (``load_safetensors(model.model, path, prefix="model.")`` fills the base model from a
      ``...ForCausalLM`` checkpoint). Names in the file outside ``prefix`` are ignored.
    - ``strict``: names of the state that the file lacks raise ``MissingKeysError``, and names
      under ``prefix`` in the file that the state lacks raise ``StateMismatchError``; with
      ``strict=False`` both are reported in the result and the rest is loaded.
    - ``dtype_cast``: a tensor stored in another dtype than its target raises
      ``StateMismatchError`` unless this is set and both are floating point; then it is cast.

    Every header is validated before any byte of data is read or any target changed; when one
    rank fails, every rank raises.

    Example::

        model = LlamaForCausalLM(config)            # or on the meta device, then to_empty()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        shardckpt.load_safetensors(model, "hf_out")  # the directory save_pretrained wrote
    """
    comm = Comm.for_group(process_group)
    where = os.fspath(path)
    sources: list[SafetensorsSource] = []

    def plan() -> tuple[_Plan, object]:
        source = SafetensorsSource(path, s3=s3)
        sources.append(source)
        return _plan(state, source, prefix, strict, dtype_cast, comm.rank), None

    try:
        chosen, _ = comm.run(f"import of {where}: planning", plan)

        def read() -> tuple[int, object]:
            return _execute(sources[0], chosen.jobs, where), None

        bytes_read, _ = comm.run(f"import of {where}", read)
    finally:
        for s in sources:
            s.close()

    def apply() -> tuple[None, object]:
        for route, template in chosen.modules:
            try:
                route.load_state_dict(template)
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise StateMismatchError(f"{where}: rank {comm.rank}: loading the module's filled state dict failed: "
                                         f"{type(e).__name__}: {e}") from e
        return None, None

    comm.run(f"import of {where}: load_state_dict", apply)
    if comm.is_coordinator:
        log.info("imported %s: %d tensors, %d bytes read on rank 0", where, chosen.filled, bytes_read)
    return ImportResult(where, chosen.filled, bytes_read, tuple(chosen.missing), tuple(chosen.unexpected),
                        tuple(chosen.cast))


def read_safetensors(
    path: PathLike, names: Iterable[str] | None = None, *, s3: S3Options | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor at ``path`` (a file, an index or a directory, as for ``load_safetensors``),
    or only ``names``, as plain CPU tensors (in the order of the weight map or the file's header). A name the files lack raises
    ``MissingKeysError``. Memory is allocated per tensor once its header has been validated
    against the file's size.

    Example::

        state = shardckpt.read_safetensors("hf_out")   # {"model.embed_tokens.weight": tensor, ...}
    """
    where = os.fspath(path)
    with SafetensorsSource(path, s3=s3) as source:
        wanted = list(source.names) if names is None else list(dict.fromkeys([names] if isinstance(names, str) else names))
        absent = [n for n in wanted if n not in source.names]
        if absent:
            raise MissingKeysError(f"{where}: no tensor named {', '.join(map(repr, absent[:20]))} "
                                   f"(it holds {len(source.names)}, like {next(iter(source.names), 'none')!r})")
        out: dict[str, torch.Tensor] = {}
        jobs: list[_Job] = []
        for name in wanted:
            file, info = source.info(name)
            tensor = torch.empty(info.shape, dtype=info.dtype)  # bounded: the header fits the file
            out[name] = tensor
            jobs.extend(_jobs(file, info, Box.full(info.shape), tensor, Box.full(info.shape)))
        _execute(source, jobs, where)
    return out


@dataclass
class _Job:
    """One ranged read: runs of ``file`` that fill the box ``target`` of ``tensor`` (row-major)."""

    file: str
    info: TensorInfo
    runs: list[Run]
    target: torch.Tensor  # the piece's slice of the local tensor


@dataclass
class _Plan:
    jobs: list[_Job] = field(default_factory=list)
    modules: list[tuple[ModuleRoute, dict[str, object]]] = field(default_factory=list)
    filled: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    cast: list[str] = field(default_factory=list)
    memory: dict[tuple[object, ...], str] = field(default_factory=dict)  # where a plain tensor's data is -> name


def _plan(state: nn.Module | dict[str, object], source: SafetensorsSource, prefix: str, strict: bool,
          dtype_cast: bool, rank: int) -> _Plan:
    """Match the state's tensors to the files' and plan this rank's reads; nothing is read yet
    but headers, nothing written."""
    plan = _Plan()
    targets: dict[str, torch.Tensor] = {}
    ties: dict[str, str] = {}  # a later name -> the first name of the same tensor
    _collect(state, prefix, (), targets, ties, plan)
    where = source.where
    held = set(source.names)
    for name in targets:
        if name in held:
            continue
        group = {name, ties.get(name, name)} | {later for later, first in ties.items() if first == name}
        if not group & held:
            plan.missing.append(name)
    plan.missing.sort()
    plan.unexpected = sorted(n for n in source.names if n.startswith(prefix) and n not in targets)
    if strict and plan.missing:
        raise MissingKeysError(
            f"{where}: rank {rank}: {len(plan.missing)} tensor(s) of the state are not in the file: "
            f"{', '.join(map(repr, plan.missing[:20]))} (the file holds names like {next(iter(source.names), 'none')!r}; "
            "pass prefix= to match, or strict=False to load the rest)")
    if strict and plan.unexpected:
        raise StateMismatchError(
            f"{where}: rank {rank}: {len(plan.unexpected)} tensor(s) in the file are not in the state: "
            f"{', '.join(map(repr, plan.unexpected[:20]))} (pass strict=False to leave them out)")
    for name, tensor in targets.items():
        if name in held:
            _plan_tensor(plan, source, name, tensor, dtype_cast, rank)
    return plan


def _collect(node: object, prefix: str, path: tuple[str, ...], targets: dict[str, torch.Tensor],
             ties: dict[str, str], plan: _Plan) -> None:
    if len(path) > MAX_NESTING:
        raise StateMismatchError(f"the state is nested deeper than {MAX_NESTING} levels at {'.'.join(path[:8])}...")
    name = prefix + ".".join(path)
    if isinstance(node, nn.Module):
        route = ModuleRoute(node)
        template = route.state_dict()
        plan.modules.append((route, template))
        below = prefix + "".join(p + "." for p in path)
        ties.update({below + later: below + first for later, first in tied_names(node).items()})
        _collect(template, prefix, path, targets, ties, plan)
    elif isinstance(node, torch.Tensor):
        targets[name] = node
        if not hasattr(node, "to_local") and node.numel() and not node.is_meta:
            # Two names for one tensor's memory (a state dict of a tied model): filled once,
            # through whichever name the file holds, as a module's tied parameters are.
            memory = (node.untyped_storage().data_ptr(), node.storage_offset(), tuple(node.shape),
                      tuple(node.stride()), node.dtype)
            first = plan.memory.setdefault(memory, name)
            if first != name:
                ties.setdefault(name, first)
    elif isinstance(node, dict):
        for k, child in node.items():
            if not isinstance(k, str | int) or isinstance(k, bool):
                raise StateMismatchError(f"key {k!r} under {name!r} is not a str or int; safetensors names are strings")
            _collect(child, prefix, path + (str(k),), targets, ties, plan)
    elif isinstance(node, list | tuple):
        for i, child in enumerate(node):
            _collect(child, prefix, path + (str(i),), targets, ties, plan)
    elif isinstance(node, torch.optim.Optimizer) or hasattr(node, "load_state_dict"):
        raise StateMismatchError(f"{name or 'the state'} is a {type(node).__name__}: safetensors holds tensors "
                                 "only; pass the model, or a dict of tensors")
    else:
        plan.missing.append(name)  # a value (a step count): no safetensors file holds one


def _plan_tensor(plan: _Plan, source: SafetensorsSource, name: str, tensor: torch.Tensor, dtype_cast: bool,
                 rank: int) -> None:
    file, info = source.info(name)
    reason = unstorable(tensor)
    if reason is not None:
        raise StateMismatchError(f"{source.where}: cannot load tensor {name!r} on rank {rank} into {reason}")
    shape, parts, local = local_layout(tensor, name, rank)
    if shape != info.shape:
        raise StateMismatchError(f"{source.where}: tensor {name!r}: the file holds shape {list(info.shape)}, the "
                                 f"target's is {list(shape)}")
    if local.dtype != info.dtype:
        floating = local.dtype.is_floating_point and info.dtype.is_floating_point
        if not (dtype_cast and floating):
            # As shardckpt.load: only floating point is cast; an integer or bool never changes dtype.
            hint = "pass dtype_cast=True to cast" if floating else "only floating-point tensors are cast"
            raise StateMismatchError(f"{source.where}: tensor {name!r} on rank {rank}: the file holds {info.dtype}, "
                                     f"the target is {local.dtype}; {hint}")
        plan.cast.append(name)
    plan.filled += 1
    for part in parts:
        plan.jobs.extend(_jobs(file, info, part.box, local, part.local))


def _jobs(file: str, info: TensorInfo, box: Box, local: torch.Tensor, local_box: Box) -> Iterator[_Job]:
    """The reads that fill ``box`` (global coordinates) of ``info`` into ``local_box`` of ``local``,
    in pieces of at most ``PIECE_BYTES``."""
    whole = Box.full(tuple(local.shape))
    for piece in split_box(box, info.dtype.itemsize, PIECE_BYTES):
        at = Box(tuple(lo + p - b for lo, p, b in zip(local_box.offsets, piece.box.offsets, box.offsets)),
                 piece.box.sizes)
        target = local[at.slices_within(whole)] if local.dim() else local
        yield _Job(file, info, box_runs(info.shape, piece.box, info.dtype.itemsize, info.start), target)


def box_runs(shape: tuple[int, ...], box: Box, itemsize: int, start: int) -> list[Run]:
    """The contiguous byte runs, in row-major order of ``box``, of a row-major tensor of ``shape``
    whose data starts at byte ``start``. Maximal: the dimensions that ``box`` spans whole from the
    last one inwards, and the first one it does not, make one run; the dimensions before walk.

    >>> box_runs((4, 6), Box((1, 2), (2, 3)), 4, 100)   # rows 1-2, columns 2-4 of a 4x6 fp32
    [(132, 12), (156, 12)]
    """
    if math.prod(box.sizes) == 0:
        return []
    k = len(shape)
    while k > 0 and box.offsets[k - 1] == 0 and box.sizes[k - 1] == shape[k - 1]:
        k -= 1
    if k == 0:
        return [(start, math.prod(shape) * itemsize)]
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    length = box.sizes[k - 1] * strides[k - 1] * itemsize
    first = sum(o * s for o, s in zip(box.offsets, strides))
    runs: list[Run] = []
    # Walk the leading dimensions 0..k-2 over the box, like an odometer.
    index = [0] * (k - 1)
    while True:
        runs.append((start + (first + sum(i * s for i, s in zip(index, strides))) * itemsize, length))
        d = k - 2
        while d >= 0:
            index[d] += 1
            if index[d] < box.sizes[d]:
                break
            index[d] = 0
            d -= 1
        if d < 0:
            return runs


def _execute(source: SafetensorsSource, jobs: list[_Job], where: str) -> int:
    """Run the reads in parallel (bounded in flight) and return the bytes read."""
    threads = io_threads()
    with ThreadPoolExecutor(threads, thread_name_prefix="shardckpt-import") as pool:
        run_bounded(pool, (partial(_read_job, source, job) for job in jobs), 2 * threads, where)
    return sum(n for job in jobs for _, n in job.runs)


def _read_job(source: SafetensorsSource, job: _Job) -> None:
    info, target = job.info, job.target
    nbytes = sum(n for _, n in job.runs)
    direct = (target.dtype == info.dtype and target.device.type == "cpu" and target.is_contiguous()
              and info.dtype != torch.bool and sys.byteorder == "little")
    with torch.no_grad():
        if direct:
            # Straight into the target's memory: no staging buffer, no copy.
            source.read_runs(job.file, job.runs, _byte_view(target))
            return
        buf = torch.empty(nbytes, dtype=torch.uint8)
        source.read_runs(job.file, job.runs, _byte_view(buf))
        if info.dtype == torch.bool and bool((buf > 1).any()):
            # Any other byte is not a bool; copying it would give a tensor whose values lie.
            raise CorruptCheckpointError(f"{source.where}: tensor {info.name!r} (BOOL) holds bytes other than 0 and 1")
        target.copy_(from_le(buf, info.dtype).reshape(target.shape))


def _byte_view(t: torch.Tensor) -> memoryview:
    flat = t.detach().reshape(-1)
    if flat.numel() and flat.data_ptr() != t.data_ptr():
        raise CheckpointError("import: internal error: a byte view of the target is not its memory")
    return flat.view(torch.uint8).numpy().data

