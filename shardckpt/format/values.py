"""Typed JSON for non-tensor values: exact round trips without pickle.

Plain JSON loses tuples, non-string dict keys and non-finite floats, all of which appear in
optimizer and scheduler state. They are tagged with one-key objects whose key starts with ``$``
(docs/format.md, "Values"); nothing here can construct anything but these builtin types.
"""

from __future__ import annotations

import math

from shardckpt.errors import IndexFormatError, StateMismatchError
from shardckpt.format.schema import int_problem

MAX_VALUE_DEPTH = 64


def is_plain_value(value: object) -> bool:
    """True for the scalars stored inline (containers are walked by the caller)."""
    return value is None or isinstance(value, bool | int | float | str)


def encode_value(value: object, key: str, depth: int = 0) -> object:
    """Encode ``value`` into JSON-ready objects; ``key`` names it in errors."""
    if depth > MAX_VALUE_DEPTH:
        raise StateMismatchError(
            f"value at key {key!r} is nested deeper than {MAX_VALUE_DEPTH} levels (or contains itself)"
        )
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        problem = int_problem(value)
        if problem is not None:
            raise StateMismatchError(
                f"value at key {key!r} holds an int that {problem}: checkpoints store ints in [-2**63, 2**64) "
                "so that any reader can hold them (store a larger one as a str)"
            )
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, list):
        return [encode_value(v, key, depth + 1) for v in value]
    if isinstance(value, tuple):
        return {"$tuple": [encode_value(v, key, depth + 1) for v in value]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: encode_value(v, key, depth + 1) for k, v in value.items()}
        return {"$dict": [[encode_value(k, key, depth + 1), encode_value(v, key, depth + 1)] for k, v in value.items()]}
    raise StateMismatchError(
        f"value at key {key!r} has type {type(value).__name__}, which shardckpt does not store "
        "(supported: tensors, objects with state_dict/load_state_dict, None, bool, int, float, str, "
        "and lists, tuples and dicts of them)"
    )


def decode_value(obj: object, where: str, depth: int = 0) -> object:
    """Inverse of ``encode_value``; raises ``IndexFormatError`` on anything it did not write."""
    if depth > MAX_VALUE_DEPTH:
        raise IndexFormatError(f"{where}: value nested deeper than {MAX_VALUE_DEPTH} levels")
    problem = int_problem(obj) if isinstance(obj, int) else None
    if problem is not None:
        raise IndexFormatError(f"{where}: value holds an int that {problem}")
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, list):
        return [decode_value(v, where, depth + 1) for v in obj]
    if not isinstance(obj, dict):
        raise IndexFormatError(f"{where}: unexpected value of type {type(obj).__name__}")
    if len(obj) == 1:
        ((tag, body),) = obj.items()
        if tag == "$float":
            if body not in ("nan", "inf", "-inf"):
                raise IndexFormatError(f"{where}: bad $float {body!r}")
            return float(body)
        if tag == "$tuple":
            if not isinstance(body, list):
                raise IndexFormatError(f"{where}: $tuple must hold a list")
            return tuple(decode_value(v, where, depth + 1) for v in body)
        if tag == "$dict":
            return _decode_pairs(body, where, depth)
    out: dict[str, object] = {}
    for k, v in obj.items():
        if k.startswith("$"):
            raise IndexFormatError(f"{where}: unknown tag {k!r}")
        out[k] = decode_value(v, where, depth + 1)
    return out


def _decode_pairs(body: object, where: str, depth: int) -> dict[object, object]:
    if not isinstance(body, list):
        raise IndexFormatError(f"{where}: $dict must hold a list of pairs")
    out: dict[object, object] = {}
    for pair in body:
        if not isinstance(pair, list) or len(pair) != 2:
            raise IndexFormatError(f"{where}: $dict entries must be [key, value] pairs")
        k = decode_value(pair[0], where, depth + 1)
        try:
            hash(k)
        except TypeError:
            raise IndexFormatError(f"{where}: $dict key {k!r} is not hashable") from None
        if k in out:
            raise IndexFormatError(f"{where}: duplicate $dict key {k!r}")
        out[k] = decode_value(pair[1], where, depth + 1)
    return out
