"""``diff``: how two checkpoints differ, tensor by tensor, streamed.

Entries are matched by key (and saving rank, for per-rank entries). For each tensor both hold:
a dtype or shape change, or else the largest absolute and relative difference and how many
elements differ beyond ``--atol + --rtol * |b|`` (exactly: bit for bit, NaN payloads and -0.0
included, when both are 0, the default). Values are compared in their stored typed-JSON form, so
``nan`` equals ``nan`` and a tuple differs from a list. Tensors are read one piece of one tensor
at a time (``PIECE_BYTES`` from each side), so memory does not grow with the checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import TYPE_CHECKING

from shardckpt.cli.output import emit_json, progress
from shardckpt.errors import CheckpointError, MissingKeysError

if TYPE_CHECKING:
    import torch

    from shardckpt.api import CheckpointReader
    from shardckpt.format.schema import TensorEntry, ValueEntry

# Small: each side is widened to float64 for the arithmetic (4x a bf16 piece), with a few temporaries.
PIECE_BYTES = 8 << 20
Ident = tuple[str, "int | None"]


def cmd_diff(args: argparse.Namespace) -> int:
    """Compare A and B: exit 0 when they hold the same entries and values, 1 when they differ."""
    from shardckpt.api import CheckpointReader

    if args.rtol < 0 or args.atol < 0 or math.isnan(args.rtol) or math.isnan(args.atol):
        raise CheckpointError(f"diff: --rtol and --atol must be >= 0 (got {args.rtol}, {args.atol})")
    with CheckpointReader(args.a) as a, CheckpointReader(args.b) as b:
        ta, va = _select(a, args.keys)
        tb, vb = _select(b, args.keys)
        if args.keys and not (ta or va or tb or vb):
            raise MissingKeysError(f"diff: {', '.join(map(repr, args.keys))} selects nothing in {args.a} or {args.b} "
                                   "(nested keys are joined with '/')")
        common = [(ta[k], tb[k]) for k in ta if k in tb]
        a.check([x for x, _ in common])  # every data file, before the first read
        b.check([y for _, y in common])
        changed: list[dict[str, object]] = []
        bar = progress(args, sum(x.itemsize * _numel(x.shape) for x, y in common if _same_layout(x, y)), "diff")
        try:
            for x, y in common:
                row = _compare_tensors(a, b, x, y, args.rtol, args.atol, bar)
                if row is not None:
                    changed.append(row)
        finally:
            bar.close()
        values_changed = [{"key": k[0], "rank": k[1], "a": va[k].value, "b": vb[k].value}
                          for k in va if k in vb and _typed(va[k].value) != _typed(vb[k].value)]
    only_a = [_named(k, "tensor") for k in ta if k not in tb] + [_named(k, "value") for k in va if k not in vb]
    only_b = [_named(k, "tensor") for k in tb if k not in ta] + [_named(k, "value") for k in vb if k not in va]
    same = not (changed or values_changed or only_a or only_b)
    if args.json:
        emit_json({"a": str(args.a), "b": str(args.b), "same": same, "rtol": args.rtol, "atol": args.atol,
                   "tensors_compared": len(common), "values_compared": sum(k in vb for k in va),
                   "only_in_a": only_a, "only_in_b": only_b, "tensors_changed": changed,
                   "values_changed": values_changed})
    else:
        _print_text(args, same, len(common), only_a, only_b, changed, values_changed)
    return 0 if same else 1


def _select(reader: CheckpointReader, keys: list[str] | None) -> tuple[dict[Ident, TensorEntry], dict[Ident, ValueEntry]]:
    """The entries under ``keys`` by (key, rank); a key missing on this side selects nothing here
    (it shows as only in the other checkpoint)."""
    wanted = [k for k in keys or [] if _has(reader, k)] if keys else None
    if keys and not wanted:
        return {}, {}
    tensors, values = reader.select(wanted)
    return {(t.key, t.rank): t for t in tensors}, {(v.key, v.rank): v for v in values}


def _has(reader: CheckpointReader, key: str) -> bool:
    keys = [t.key for t in reader.index.tensors] + [v.key for v in reader.index.values]
    return any(k == key or k.startswith(key + "/") for k in keys)


def _same_layout(x: TensorEntry, y: TensorEntry) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _named(ident: Ident, kind: str) -> dict[str, object]:
    return {"key": ident[0], "rank": ident[1], "kind": kind}


def _compare_tensors(a: CheckpointReader, b: CheckpointReader, x: TensorEntry, y: TensorEntry, rtol: float,
                     atol: float, bar: object) -> dict[str, object] | None:
    """None when equal (within tolerance), else what differs."""
    from shardckpt.planning.boxes import Box, split_box

    row: dict[str, object] = {"key": x.key, "rank": x.rank}
    if not _same_layout(x, y):
        row.update(change="dtype" if x.dtype != y.dtype else "shape",
                   a={"dtype": x.dtype, "shape": list(x.shape)}, b={"dtype": y.dtype, "shape": list(y.shape)})
        return row
    max_abs = max_rel = 0.0
    mismatched = 0
    for piece in split_box(Box.full(x.shape), x.itemsize, PIECE_BYTES):
        pa, pb = a.read(x, piece.box), b.read(y, piece.box)
        n, d_abs, d_rel = _piece_diff(pa, pb, rtol, atol)
        mismatched += n
        max_abs, max_rel = max(max_abs, d_abs), max(max_rel, d_rel)
        bar.update(piece.box.volume * x.itemsize)  # type: ignore[attr-defined]
    if mismatched == 0:
        return None
    row.update(change="values", dtype=x.dtype, shape=list(x.shape), mismatched=mismatched,
               elements=_numel(x.shape), max_abs_diff=max_abs, max_rel_diff=max_rel)
    return row


def _typed(value: object) -> str:
    """A stored value as text, so that what ``==`` takes as equal but a load tells apart differs:
    1 and 1.0, True and 1, 0.0 and -0.0 (the stored typed JSON keeps each as it was)."""
    return json.dumps(value, sort_keys=True)


def _piece_diff(pa: torch.Tensor, pb: torch.Tensor, rtol: float, atol: float) -> tuple[int, float, float]:
    """(elements that differ, max |a - b|, max |a - b| / |b|) over one piece."""
    import torch

    fa, fb = pa.reshape(-1), pb.reshape(-1)
    bits_a = fa.view(torch.uint8).reshape(fa.numel(), -1) if fa.numel() else fa.view(torch.uint8)
    bits_b = fb.view(torch.uint8).reshape(fb.numel(), -1) if fb.numel() else fb.view(torch.uint8)
    # Bit-identical elements are equal whatever their value (NaN payloads, -0.0 against -0.0).
    bit_equal = (bits_a == bits_b).all(dim=1) if fa.numel() else torch.ones(0, dtype=torch.bool)
    if fa.dtype == torch.bool:
        fa, fb = fa.to(torch.uint8), fb.to(torch.uint8)
    wide = torch.complex128 if fa.is_complex() else torch.float64
    da, db = fa.to(wide), fb.to(wide)
    abs_diff = (da - db).abs()
    ref = db.abs()
    nan_a, nan_b = da.isnan(), db.isnan()
    # Equal values that are not bit-identical (0.0 and -0.0, two NaN payloads) count as equal; a
    # NaN against a number, or infinities of different sign, is an infinite difference.
    integers = not fa.is_floating_point() and not fa.is_complex()
    # Integers are equal when their bits are: past 2^53 two of them can meet in float64.
    value_equal = bit_equal if integers else bit_equal | (da == db) | (nan_a & nan_b)
    abs_diff = torch.where(value_equal, torch.zeros_like(abs_diff), abs_diff)
    abs_diff = torch.where(abs_diff.isnan(), torch.full_like(abs_diff, math.inf), abs_diff)
    if integers:  # and two that differ differ by 1 at least
        abs_diff = torch.where(value_equal, abs_diff, abs_diff.clamp(min=1))
    rel = torch.where(ref > 0, abs_diff / ref, torch.where(abs_diff > 0, math.inf, 0.0))
    if rtol == 0 and atol == 0:
        differs = ~bit_equal
    else:
        # An infinity is within no tolerance of anything but itself (inf <= atol + rtol * inf holds).
        finite = da.isfinite() & db.isfinite()
        differs = ~value_equal & ~(finite & (abs_diff <= atol + rtol * ref))
    n = int(differs.sum())
    if n == 0 and rtol == 0 and atol == 0:
        return 0, 0.0, 0.0
    return n, float(abs_diff.max()) if abs_diff.numel() else 0.0, float(rel.max()) if rel.numel() else 0.0


def _print_text(args: argparse.Namespace, same: bool, compared: int, only_a: list[dict[str, object]],
                only_b: list[dict[str, object]], changed: list[dict[str, object]],
                values_changed: list[dict[str, object]]) -> None:
    def name(row: dict[str, object]) -> str:
        return f"{row['key']}" + ("" if row["rank"] is None else f" (rank {row['rank']})")

    for row in only_a:
        print(f"only in A  {row['kind']:<6} {name(row)}")
    for row in only_b:
        print(f"only in B  {row['kind']:<6} {name(row)}")
    for row in changed:
        if row["change"] == "values":
            print(f"differs    tensor {name(row)}: {row['mismatched']} of {row['elements']} elements, "
                  f"max abs diff {row['max_abs_diff']:.6g}, max rel diff {row['max_rel_diff']:.6g}")
        else:
            ra, rb = row["a"], row["b"]
            assert isinstance(ra, dict) and isinstance(rb, dict)
            print(f"{row['change']:<10} tensor {name(row)}: {ra['dtype']}{ra['shape']} -> {rb['dtype']}{rb['shape']}")
    for row in values_changed:
        print(f"differs    value  {name(row)}: {row['a']!r:.60} -> {row['b']!r:.60}")
    tol = "bit for bit" if args.rtol == 0 and args.atol == 0 else f"rtol {args.rtol}, atol {args.atol}"
    print(f"{args.a} vs {args.b}: " + ("same" if same else
          f"{len(changed)} tensor(s) and {len(values_changed)} value(s) differ, {len(only_a)} entries only in A, "
          f"{len(only_b)} only in B") + f" ({compared} tensors compared, {tol})")
