"""Typed JSON for non-tensor values: exact round trips without pickle.

Plain JSON loses tuples, non-string dict keys and non-finite floats, all of which appear in
optimizer and scheduler state. They are tagged with one-key objects whose key starts with ``$``
(docs/format.md, "Values"); nothing here can construct anything but these builtin types and
torch.dtype objects (``{"$dtype": "bfloat16"}``, looked up by name and checked to be one).
"""

from __future__ import annotations

import math
import re

from shardckpt.errors import IndexFormatError, StateMismatchError
from shardckpt.format.schema import int_problem

MAX_VALUE_DEPTH = 64
# A torch.dtype is stored as its name (``{"$dtype": "bfloat16"}``): lower-case letters, digits, "_".
_DTYPE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


def is_plain_value(value: object) -> bool:
    """True for the scalars stored inline (containers are walked by the caller)."""
    return value is None or isinstance(value, bool | int | float | str)


def encode_value(value: object, key: str, depth: int = 0, inner: tuple[object, ...] = ()) -> object:
    """Encode ``value`` into JSON-ready objects; ``key`` names it in errors, with ``inner``, the
    position inside the value (dict keys, list indexes) of what could not be stored."""
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
        return [encode_value(v, key, depth + 1, (*inner, i)) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"$tuple": [encode_value(v, key, depth + 1, (*inner, i)) for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: encode_value(v, key, depth + 1, (*inner, k)) for k, v in value.items()}
        return {"$dict": [[encode_value(k, key, depth + 1, inner), encode_value(v, key, depth + 1, (*inner, k))]
                          for k, v in value.items()]}
    if _is_torch_dtype(value):
        return {"$dtype": _dtype_text(value, key)}
    at = "".join(f"[{part!r}]" for part in inner)
    raise StateMismatchError(
        f"value at key {key!r}{' holds at ' + at + ' a value that' if at else ''} has type {type(value).__name__}, "
        "which shardckpt does not store (supported: tensors, objects with state_dict/load_state_dict, None, bool, "
        f"int, float, str, torch.dtype, and lists, tuples and dicts of them){_what_to_pass(value, key, inner)}"
    )


def _is_torch_dtype(value: object) -> bool:
    # By type identity, not isinstance: this module must not import torch (``shardckpt inspect``
    # reads values without it), and only torch's own dtype objects qualify.
    t = type(value)
    return t.__module__ == "torch" and t.__qualname__ == "dtype"


def _dtype_text(value: object, key: str) -> str:
    name = str(value).removeprefix("torch.")
    if not _DTYPE_NAME.fullmatch(name):
        raise StateMismatchError(f"value at key {key!r}: cannot store the torch.dtype {value!r}")
    return name


def _what_to_pass(value: object, key: str, inner: tuple[object, ...]) -> str:
    """A hint for the common cases: a config object (transformers' ``PretrainedConfig`` and its
    kin have ``to_dict``), a dataclass, an enum."""
    last = inner[-1] if inner else key.rsplit("/", 1)[-1]
    shown = last if isinstance(last, str) and last.isidentifier() else "value"
    if callable(getattr(value, "to_dict", None)):
        return (f"; pass {shown}.to_dict() instead (a plain dict; rebuild it after loading, e.g. "
                f"{type(value).__name__}(**d) or {type(value).__name__}.from_dict(d))")
    if hasattr(type(value), "__dataclass_fields__"):
        return f"; pass dataclasses.asdict({shown}) instead and rebuild it after loading"
    if hasattr(type(value), "_member_map_"):  # an Enum
        return f"; pass {shown}.value (or .name) instead"
    return "; convert it to those types before saving"


def decode_value(obj: object, where: str, depth: int = 0, *, dtypes: bool = True) -> object:
    """Inverse of ``encode_value``; raises ``IndexFormatError`` on anything it did not write.
    ``dtypes=False`` checks a ``$dtype`` tag's name without importing torch and returns the name
    (index validation: ``shardckpt inspect`` must not import torch)."""
    if depth > MAX_VALUE_DEPTH:
        raise IndexFormatError(f"{where}: value nested deeper than {MAX_VALUE_DEPTH} levels")
    problem = int_problem(obj) if isinstance(obj, int) else None
    if problem is not None:
        raise IndexFormatError(f"{where}: value holds an int that {problem}")
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, list):
        return [decode_value(v, where, depth + 1, dtypes=dtypes) for v in obj]
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
            return tuple(decode_value(v, where, depth + 1, dtypes=dtypes) for v in body)
        if tag == "$dict":
            return _decode_pairs(body, where, depth, dtypes)
        if tag == "$dtype":
            return _decode_dtype(body, where, dtypes)
    out: dict[str, object] = {}
    for k, v in obj.items():
        if k.startswith("$"):
            raise IndexFormatError(f"{where}: unknown tag {k!r}")
        out[k] = decode_value(v, where, depth + 1, dtypes=dtypes)
    return out


def _decode_dtype(body: object, where: str, construct: bool) -> object:
    if not isinstance(body, str) or not _DTYPE_NAME.fullmatch(body):
        raise IndexFormatError(f"{where}: bad $dtype {body!r}")
    if not construct:
        return body
    import torch  # only a checkpoint that holds a dtype value needs it

    # getattr on torch is safe only because the name is a plain identifier and the result must be
    # one of torch's dtype objects; anything else is refused.
    dtype = getattr(torch, body, None)
    if not isinstance(dtype, torch.dtype):
        raise IndexFormatError(f"{where}: $dtype {body!r} is not a torch dtype this torch knows")
    return dtype


def _decode_pairs(body: object, where: str, depth: int, dtypes: bool) -> dict[object, object]:
    if not isinstance(body, list):
        raise IndexFormatError(f"{where}: $dict must hold a list of pairs")
    out: dict[object, object] = {}
    for pair in body:
        if not isinstance(pair, list) or len(pair) != 2:
            raise IndexFormatError(f"{where}: $dict entries must be [key, value] pairs")
        k = decode_value(pair[0], where, depth + 1, dtypes=dtypes)
        try:
            hash(k)
        except TypeError:
            raise IndexFormatError(f"{where}: $dict key {k!r} is not hashable") from None
        if k in out:
            raise IndexFormatError(f"{where}: duplicate $dict key {k!r}")
        out[k] = decode_value(pair[1], where, depth + 1, dtypes=dtypes)
    return out
