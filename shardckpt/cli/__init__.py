"""The ``shardckpt`` command: look at, compare, check and rewrite checkpoints (docs/cli.md).

    shardckpt ls ROOT                  committed steps under a CheckpointManager root
    shardckpt inspect PATH             tensors, values, files, sizes and codecs of one checkpoint
    shardckpt verify PATH [PATH ...]   re-read every block against its checksum
    shardckpt diff A B                 which tensors and values differ, by how much (--rtol/--atol, --key)
    shardckpt convert SRC DST          rewrite as shardckpt (--from shardckpt|dcp|torch|safetensors, --key/--drop,
                                       --drop-per-rank, --dtype, --compression, --overwrite)
    shardckpt export CKPT OUT          Hugging Face safetensors shards + model.safetensors.index.json

Every command takes ``--json`` (one JSON document on stdout, keys listed in docs/cli.md) and
``--quiet`` (no progress bar). Progress bars (verify, convert, export, diff) go to stderr, and
only when stderr is a terminal. ls, inspect, verify and diff only read.

Exit codes:

    0    success; diff: the checkpoints are the same
    1    verify: a checkpoint failed; ls: a step is unreadable; diff: the checkpoints differ
    2    error: one line ``shardckpt CMD: ErrorClass: message`` on stderr (with --json also
         ``{"error": {"type", "message"}}`` on stdout); a usage error from argparse
    3    verify: every checkpoint passed, but some hold orphaned files of an interrupted save
    130  interrupted (Ctrl-C)

``--help``, ``ls`` and ``inspect`` never import torch: they start in a fraction of a second.
The other commands import it when they run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from shardckpt.cli.convert import _put as _put  # noqa: F401 - tests reach it here
from shardckpt.cli.output import emit_json, error_doc
from shardckpt.errors import CheckpointError

Command = Callable[[argparse.Namespace], int]


def _count(text: str) -> int:
    """An argument that counts something: a whole number, 0 or more."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, not {text!r}")
    return n


def _command(module: str, name: str) -> Command:
    """The command ``name`` of ``shardckpt.cli.<module>``, imported when it runs: ``--help`` and
    the argument parsing import no command module."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        fn: Command = getattr(importlib.import_module(f"shardckpt.cli.{module}"), name)
        return fn(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command (docs/cli.md lists them)."""
    ap = argparse.ArgumentParser(prog="shardckpt", description="Inspect, compare, verify, convert and export "
                                 "shardckpt checkpoints. Exit codes: 0 ok/same, 1 failed check/different, 2 error, "
                                 "3 verify passed with orphaned files (docs/cli.md).")
    sub = ap.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document on stdout (docs/cli.md)")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    p = sub.add_parser("ls", parents=[common], help="committed steps under a manager root")
    p.add_argument("root")
    p.set_defaults(fn=_command("browse", "cmd_ls"))

    p = sub.add_parser("inspect", parents=[common], help="describe one checkpoint")
    p.add_argument("path")
    p.add_argument("--limit", type=_count, default=40, help="entries of each kind to print (text output)")
    p.set_defaults(fn=_command("browse", "cmd_inspect"))

    p = sub.add_parser("verify", parents=[common], help="check every block of one or more checkpoints")
    p.add_argument("paths", nargs="+")
    p.set_defaults(fn=_command("browse", "cmd_verify"))

    p = sub.add_parser("diff", parents=[common], help="which tensors and values of two checkpoints differ")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--key", dest="keys", action="append", metavar="K",
                   help="compare only entries under K (repeatable; nested keys joined with '/')")
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (default 0: bit for bit)")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0: bit for bit)")
    p.set_defaults(fn=_command("diff", "cmd_diff"))

    p = sub.add_parser("convert", parents=[common], help="rewrite a checkpoint as shardckpt (gathered in this process)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--from", dest="source_format", choices=["shardckpt", "dcp", "torch", "safetensors"],
                   default="shardckpt",
                   help="source format; dcp and torch files pickle, so only convert files you trust")
    p.add_argument("--key", dest="keys", action="append", metavar="K",
                   help="keep only the subtree K (repeatable; nested keys joined with '/')")
    p.add_argument("--drop", dest="drops", action="append", metavar="K", help="leave out the subtree K (repeatable)")
    p.add_argument("--drop-per-rank", action="store_true",
                   help="leave out per-rank entries (PerRank, RNGState); kept per rank by default")
    p.add_argument("--max-ranks", type=_count, default=64, metavar="N",
                   help="most processes to start for per-rank entries (one per saving rank; default 64)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="cast floating-point tensors (others are kept)")
    p.add_argument("--compression", choices=["auto", "zstd", "none"], default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already at DST (atomically)")
    p.set_defaults(fn=_command("convert", "cmd_convert"))

    p = sub.add_parser("export", parents=[common], help="write a checkpoint's tensors as Hugging Face safetensors")
    p.add_argument("ckpt")
    p.add_argument("out", help="a local directory; other files in it (config.json) are left alone")
    p.add_argument("--format", choices=["safetensors"], default="safetensors")
    p.add_argument("--key", help="the subtree to export, nested keys joined with '/' (e.g. model)")
    p.add_argument("--prefix-strip", help="removed from the start of tensor names (e.g. _orig_mod.)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="cast floating-point tensors (others are kept)")
    p.add_argument("--max-shard-size", default="5GB", help="bytes per file: 5GB (default), 500MB, 2GiB, ...")
    p.add_argument("--tie", action="append", metavar="LATER=FIRST",
                   help="write LATER once, as FIRST (checked to be equal); for state dicts saved as plain dicts")
    p.add_argument("--overwrite", action="store_true", help="replace an export already in OUT")
    p.set_defaults(fn=_command("export", "cmd_export"))
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except (CheckpointError, OSError) as e:
        # OSError: what the library does not wrap (a DST that cannot be created, a full disk).
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"shardckpt {args.command}: {type(e).__name__}: {first}", file=sys.stderr)
        if args.json:
            emit_json({"error": error_doc(e)})
        return 2
    except KeyboardInterrupt:
        print(f"shardckpt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
