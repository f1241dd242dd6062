"""Render benchmark results: a markdown table with ratios to DCP and to the floors, and a PNG chart."""

from __future__ import annotations

from pathlib import Path

COPY = "floor: copy to warm memory"
RAW = "floor: raw disk (write+fsync, cold read)"
DCP_SAVE, DCP_ASYNC = "dcp save", "dcp async_save"
PROBE = "probe: 64 MiB tensor, kept"  # bench.py's known allocation, to check the memory columns
PROBE_MB = 64 * (1 << 20) / 1e6


def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def _pair(m: dict[str, float], key: str) -> str:
    """The save's and the load's figure of one row ("–" for the one it lacks)."""
    save, load = m.get(key), m.get(f"load_{key}")
    return f"{_f(save, '{:.0f}')} / {_f(load, '{:.0f}')}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}x"


def markdown(report: dict) -> str:
    med: dict[str, dict[str, float]] = report["median"]
    cfg = report["config"]
    mb = report["raw_bytes_per_rank"] / 1e6
    lines = [
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']['cpu_count']} CPUs, {report['machine']['platform']}, "
        f"Python {report['machine']['python']}, torch {report['machine']['torch']}  ",
        f"State: {cfg['ranks']} ranks x {mb:.0f} MB on {cfg.get('device', 'cpu')} "
        f"({cfg['dtype']} weights + Adam moments as DTensors, "
        f"Shard(0)); re-sharded load on {cfg['reshard_to']} ranks; median of {cfg['repeats']} repeats (after "
        f"{cfg.get('warmup', 0)} warm-up round) of the slowest rank; loads read cold (pages evicted).",
        "",
        "| system | stall s | save s | load s | re-shard load s | disk MB | peak RSS rise MB/rank (save / load) "
        "| held MB/rank (save / load) | staging pool MB/rank |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in med.items():
        lines.append(
            f"| {name} | {_f(m.get('stall'))} | {_f(m.get('save'))} | {_f(m.get('load'))} | "
            f"{_f(m.get('reshard_load'))} | {_f(m.get('disk_mb'), '{:.1f}')} | "
            f"{_pair(m, 'peak_rss_mb')} | {_pair(m, 'held_rss_mb')} | {_f(m.get('pool_mb'), '{:.0f}')} |"
        )
    lines += [
        "",
        "Memory, per rank, the slowest rank's: *peak RSS rise* is the peak RSS during the operation over the RSS "
        "just before it; *held* is the RSS that the system's own operations (shardckpt, dcp, torch.save) "
        "added and did not give back since its first one in the process (measured after garbage collection "
        "and malloc_trim, so freed heap does not count), so memory kept across operations, such as "
        "shardckpt's staging pools allocated in the warm-up round, shows in every later row, and memory "
        "another system keeps does not; *staging pool* is what shardckpt's pools hold (async savers' "
        "snapshot buffers and the blocking save's device ring).",
    ]
    probe = med.get(PROBE)
    if probe is not None:
        ok = all(abs(probe.get(k, 0) - PROBE_MB) <= 0.1 * PROBE_MB for k in ("peak_rss_mb", "held_rss_mb"))
        lines.append(
            f"Check: the probe row allocates and keeps a {PROBE_MB:.0f} MB tensor; it reads "
            f"{_f(probe.get('peak_rss_mb'), '{:.0f}')} MB rise, {_f(probe.get('held_rss_mb'), '{:.0f}')} MB held "
            f"({'the memory columns are sound' if ok else 'OFF: the memory columns are not to be trusted'})."
        )
    copy = med.get(COPY, {}).get("stall")
    raw_save, raw_load = med.get(RAW, {}).get("save"), med.get(RAW, {}).get("load")
    dcp, dcp_async = med.get(DCP_SAVE, {}), med.get(DCP_ASYNC, {})
    lines += [
        "",
        "Ratios (lower is better; throughput ratio: higher is better):",
        "",
        "| system | stall / DCP async | stall / copy floor | save / DCP | load / DCP | re-shard / DCP | disk / DCP "
        "| save throughput / raw-write floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in med.items():
        if name.startswith(("floor", "dcp", "probe")):
            continue
        lines.append(
            f"| {name} | {_ratio(m.get('stall'), dcp_async.get('stall'))} | {_ratio(m.get('stall'), copy)} | "
            f"{_ratio(m.get('save'), dcp.get('save'))} | {_ratio(m.get('load'), dcp.get('load'))} | "
            f"{_ratio(m.get('reshard_load'), dcp.get('reshard_load'))} | {_ratio(m.get('disk_mb'), dcp.get('disk_mb'))} | "
            f"{_ratio(raw_save, m.get('save'))} |"
        )
    lines += ["", f"Floors: warm copy {_f(copy)} s, raw write + fsync {_f(raw_save)} s, cold raw read {_f(raw_load)} s."]
    real = report.get("real_weights", {})
    if "rows" in real:
        lines += ["", "Real weights (MiniLM-L6, compression ratio raw/stored, higher is better):", "",
                  "| weights | raw MB | zstd-3 whole tensor | DCP + ZStandard | shardckpt | shardckpt stored/raw |",
                  "|---|---|---|---|---|---|"]
        for label, r in real["rows"].items():
            lines.append(f"| {label} | {r['raw_mb']:.1f} | {r['zstd3_whole_tensor_ratio']:.3f} | "
                         f"{r['dcp_zstd_ratio']:.3f} | {r['shardckpt_ratio']:.3f} | {r['shardckpt_stored_over_raw']:.3f} |")
    elif real:
        lines += ["", f"Real weights: {real.get('skipped')}"]
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = report["median"]
    metrics = [("stall", "training stall"), ("save", "save"), ("load", "load"), ("reshard_load", "re-sharded load")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.6))
    for ax, (key, title) in zip(axes, metrics):
        names = [n for n in med if key in med[n]]
        vals = [med[n][key] for n in names]
        colors = ["#999999" if n.startswith("floor") else "#1f77b4" if n.startswith("shardckpt") else "#d62728"
                  if n.startswith("dcp") else "#2ca02c" for n in names]
        ax.barh(range(len(names)), vals, color=colors)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{title} (s)")
    fig.suptitle(f"{report['config']['ranks']} ranks x {report['raw_bytes_per_rank'] / 1e6:.0f} MB, "
                 f"{report['config']['dtype']}; grey = hardware floor")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(report: dict, out: Path) -> None:
    (out / "results.md").write_text(markdown(report))
    try:
        chart(report, out / "chart.png")
    except ImportError:
        (out / "chart.png.txt").write_text("matplotlib is not installed: pip install -e '.[bench]'\n")
