"""What every command shares: the one JSON document, sizes for people, progress bars on a TTY."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Mapping


def mb(n: int) -> str:
    """Bytes for people: ``12.35 MB``."""
    return f"{n / 1e6:.2f} MB"


def emit_json(doc: Mapping[str, object]) -> None:
    """Print ``doc`` as the command's one JSON document on stdout. Keys keep their insertion order,
    which docs/cli.md lists per command; ``repr`` stands in for anything JSON cannot hold, and the
    strings "nan", "inf" and "-inf" for non-finite floats (strict JSON has none)."""
    print(json.dumps(_finite(doc), indent=1, default=repr, allow_nan=False))


def _finite(node: object) -> object:
    if isinstance(node, float) and not math.isfinite(node):
        return "nan" if math.isnan(node) else ("inf" if node > 0 else "-inf")
    if isinstance(node, dict):
        return {k: _finite(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_finite(v) for v in node]
    return node


def error_doc(e: BaseException) -> dict[str, object]:
    """An error as it appears inside a JSON document (and as ``--json``'s whole document on failure)."""
    return {"type": type(e).__name__, "message": str(e)}


class Progress(Protocol):
    """A progress bar's interface as the commands use it (tqdm's subset)."""

    def update(self, n: int = 1) -> object: ...

    def close(self) -> None: ...


class _Silent:
    def update(self, n: int = 1) -> object:
        return None

    def close(self) -> None:
        return None


def progress(args: argparse.Namespace, total: int | None, what: str, unit: str = "B") -> Progress:
    """A bar on stderr when stderr is a terminal and neither ``--quiet`` nor ``--json`` was given;
    otherwise one that does nothing (logs, pipes and JSON consumers get no control characters)."""
    if getattr(args, "quiet", False) or getattr(args, "json", False) or not sys.stderr.isatty():
        return _Silent()
    from tqdm import tqdm  # only when a bar is shown: it is not free to import

    bar: Progress = tqdm(total=total, desc=what, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
                         file=sys.stderr, leave=False, dynamic_ncols=True)
    return bar
