"""Outputs of `bench twilio`: results.json, report.md and PNG plots (matplotlib, Agg backend).

Owns the presentation only; every number comes from the results dict built by bench/twilio.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCENARIO_TEXT = {
    "echo": "a loud 40 ms click every interval over silence; latency = click sent → its echo "
    "heard (played from the caller's buffer)",
    "talk": "speech then silence; latency = last voiced frame of the caller's speech sent → first "
    "loud reply frame heard",
    "barge": "speech, then speech again 300 ms into the reply; latency = first voiced frame of the "
    "barge-in sent → reply stopped at the caller (clear received, or 250 ms of silence)",
}


def write_outputs(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Writes results.json, the plots and report.md into `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json"}
    paths["json"].write_text(json.dumps(results, indent=1))
    paths.update(plot_all(results, out))
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text(
        render_markdown(results, {k: v.name for k, v in paths.items() if v.suffix == ".png"})
    )
    return paths


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cpu(block: dict[str, Any] | None) -> str:
    if not block:
        return "–"
    return f"{block['cpu_mean']:.1f} / {block['cpu_peak']:.1f}"


def _rss(block: dict[str, Any] | None) -> str:
    if not block:
        return "–"
    return f"{block['rss_mean_mb']:.0f} / {block['rss_peak_mb']:.0f}"


def render_markdown(results: dict[str, Any], plots: dict[str, str]) -> str:
    opts = results["options"]
    lines = [
        f"# Twilio Media Streams benchmark: `{opts['scenario']}`",
        "",
        f"Started {results['started']} on {results['machine']['cpus']} CPUs, Python "
        f"{results['machine']['python']}. Targets: {', '.join(opts['targets'])}"
        + (f" (engine backend `{opts['engine_backend']}`)" if opts.get("engine_backend") else "")
        + f". Each call lasts {opts['duration_s']:g} s after the ramp; {opts['phases']} send "
        f"phases per 20 ms; caller speech: {opts['speech']} ({opts['speech_s']} s).",
        "",
        f"Scenario: {SCENARIO_TEXT.get(opts['scenario'], opts['scenario'])}.",
        "",
        (
            "Latency is measured to when the reply was *heard*: played from the caller's FIFO "
            "playback buffer, which plays one frame per 20 ms and only drains in a gap, so it "
            "grows to absorb the worst lateness (jitter, or a burst) seen so far in the call and "
            "stays that deep. Transit (echo only) is to when the echo reached the caller's "
            "socket; buffer wait is the difference."
        ),
        "",
        (
            "CPU is percent of one core (mean / peak over the steady part of the run, after the "
            "ramp); RSS in MiB (mean / peak). The harness runs every caller in one process; its "
            "CPU, its cost per frame (calls per harness core) and the ticker's wake-up lateness "
            "show whether it, not the server, was the limit. A stall is a ticker wake-up more "
            "than a frame late (the harness was busy or not scheduled): sends it missed are "
            "skipped, never bursted, and messages read late because of it are dated back to the "
            "missed wake-up, so a stall of the harness is not counted against the server. Other "
            "CPU is what the rest of the machine used meanwhile: anything above zero competed "
            "with the run for the same cores."
        ),
        "",
        "## Results",
        "",
    ]
    columns = [
        "target", "calls", "connected", "failed", "ended early", "latency p50", "p95", "p99",
        "max (ms)", "n", "transit p50 / p99 (ms)", "buffer wait p50 / p99 (ms)", "frames sent",
        "received", "back", "late", "dropped", "underruns", "server CPU %", "server RSS",
        "harness CPU %", "ticker lag p99 / max (ms)", "stalls", "calls per harness core",
        "other CPU %",
    ]  # fmt: skip
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|---|" + "---:|" * (len(columns) - 1))
    for run in results["runs"]:
        lat = run["latency_ms"]
        tr = run["transit_ms"]
        wait = run["playout_wait_ms"]
        fr = run["frames"]
        back = f"{100.0 * fr['back_ratio']:.3f} %" if fr.get("back_ratio") is not None else "–"
        dropped = fr["dropped_send"] + (fr["lost"] or 0)
        tick = run["ticker"]
        row = [
            run["target"], run["calls"], run["connected"], run["failed_to_connect"],
            run["ended_early"], _fmt(lat["p50"]), _fmt(lat["p95"]), _fmt(lat["p99"]),
            _fmt(lat["max"]), lat["n"], f"{_fmt(tr['p50'])} / {_fmt(tr['p99'])}",
            f"{_fmt(wait['p50'])} / {_fmt(wait['p99'])}", fr["sent"],
            fr["received"], back, fr["late"], dropped, fr["underruns"], _cpu(run["server"]),
            _rss(run["server"]), _cpu(run["harness"]),
            f"{tick['p99_ms']:.1f} / {tick['max_ms']:.1f}", tick.get("stalls", "–"),
            _fmt(run["harness"].get("calls_per_core")), _fmt(run.get("other_cpu_mean")),
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    lines += ["", "## Protocol and scenario counters", ""]
    keys_p = list(results["runs"][0]["protocol"]) if results["runs"] else []
    keys_s = sorted({k for run in results["runs"] for k in run["scenario_stats"]})
    header = ["target", "calls"] + keys_p + keys_s
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for run in results["runs"]:
        row = [run["target"], str(run["calls"])]
        row += [str(run["protocol"][k]) for k in keys_p]
        row += [str(run["scenario_stats"].get(k, "–")) for k in keys_s]
        lines.append("| " + " | ".join(row) + " |")
    if plots:
        lines += ["", "## Plots", ""]
        for name in sorted(plots.values()):
            lines.append(f"![{name}]({name})")
            lines.append("")
    errors = [(run["target"], run["calls"], e) for run in results["runs"] for e in run["errors"]]
    if errors:
        lines += ["", "## Errors (first of each run)", ""]
        for target, calls, text in errors[:40]:
            lines.append(f"- {target} x{calls}: `{text}`")
    lines.append("")
    return "\n".join(lines)


def plot_all(results: dict[str, Any], out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    paths: dict[str, Path] = {}
    if not runs:
        return paths
    levels = sorted({run["calls"] for run in runs})
    targets = list(dict.fromkeys(run["target"] for run in runs))
    colours = {t: f"C{i}" for i, t in enumerate(targets)}

    # Latency histograms: one panel per load level, targets overlaid.
    fig, axes = plt.subplots(len(levels), 1, figsize=(8, 2.6 * len(levels) + 0.6), squeeze=False)
    for ax, calls in zip(axes[:, 0], levels, strict=True):
        for run in (r for r in runs if r["calls"] == calls):
            values = run["latencies_ms"]
            if values:
                lat = run["latency_ms"]
                ax.hist(
                    values,
                    bins=80,
                    alpha=0.55,
                    color=colours[run["target"]],
                    label=f"{run['target']}: p50 {lat['p50']:.1f}, p99 {lat['p99']:.1f} ms",
                )
        ax.set_title(f"{calls} calls", fontsize=10)
        ax.set_ylabel("count")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel(f"latency, ms ({results['options']['scenario']})")
    fig.tight_layout()
    paths["latency_png"] = out / "latency.png"
    fig.savefig(paths["latency_png"], dpi=110)
    plt.close(fig)

    # CPU over time: server (solid) and harness (dashed) of every run.
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        label = f"{run['target']} x{run['calls']}"
        if run["server"]:
            s = run["server"]["series"]
            ax.plot(
                [p["t"] for p in s], [p["cpu"] for p in s], color=colour, label=f"{label} server"
            )
        h = run["harness"]["series"]
        ax.plot(
            [p["t"] for p in h],
            [p["cpu"] for p in h],
            color=colour,
            linestyle="--",
            label=f"{label} harness",
        )
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("CPU, % of one core")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths["cpu_time_png"] = out / "cpu_time.png"
    fig.savefig(paths["cpu_time_png"], dpi=110)
    plt.close(fig)

    # CPU against the number of connected calls: every sample (faint, covers the ramp) and the
    # steady-state mean of each level.
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for target in targets:
        mine = [r for r in runs if r["target"] == target]
        colour = colours[target]
        for r in mine:
            if r["server"]:
                s = r["server"]["series"]
                ax.scatter(
                    [p["calls"] for p in s], [p["cpu"] for p in s], s=4, alpha=0.25, color=colour
                )
        with_server = [r for r in mine if r["server"]]
        if with_server:
            ax.plot(
                [r["calls"] for r in with_server],
                [r["server"]["cpu_mean"] for r in with_server],
                marker="o",
                color=colour,
                label=f"{target} server (mean)",
            )
        ax.plot(
            [r["calls"] for r in mine],
            [r["harness"]["cpu_mean"] for r in mine],
            marker="x",
            linestyle="--",
            color=colour,
            label=f"harness beside {target} (mean)",
        )
    ax.set_xlabel("connected calls")
    ax.set_ylabel("CPU, % of one core")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths["cpu_vs_calls_png"] = out / "cpu_vs_calls.png"
    fig.savefig(paths["cpu_vs_calls_png"], dpi=110)
    plt.close(fig)
    return paths
