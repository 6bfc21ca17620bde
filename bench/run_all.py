"""Run every benchmark under bench/ and publish the numbers in one JSON and docs/RESULTS.md.

    python bench/run_all.py --quick      # short runs of each (under 10 minutes on 2 CPU cores)
    python bench/run_all.py              # the benchmarks' own default lengths

Each benchmark runs in its own process under ``nice -n 10`` and writes its JSON with its own
``--out`` flag; this script records the exact command, its wall time, exit status and the load
average when it started, and gathers everything into ``bench/results/all.json`` (quick runs:
the benchmarks' own JSON files of quick runs go to ``bench/results/quick/``, so they never
overwrite the full runs the other documents cite).

docs/RESULTS.md is shared: this script owns only the blocks from a line ending in
``<!-- BEGIN run_all:header -->`` / ``<!-- BEGIN bench:NAME -->`` to the matching ``END`` marker
and replaces them in place (new ones are appended); everything else in the file (e.g. the
"Imputation (issue 5)" section written by ``mvld-eval --results``) is kept byte for byte.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mvld.common.default_model import DEFAULT_MODEL
from mvld.hardware import cpu_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "docs" / "RESULTS.md"
# where docs/MODEL.md's recipe leaves the default model's training set and its latent cache
TRAINING_DATA = ROOT / "runs" / "sim3x64x12000"
TRAINING_LATENTS = ROOT / "runs" / "score128big" / "latents.safetensors"
MAX_ROWS = 40


@dataclass(frozen=True)
class Bench:
    """One benchmark script, its quick-mode flags and how it names its JSON output."""

    name: str
    script: str
    title: str
    quick: tuple[str, ...] = ()
    full: tuple[str, ...] = ()
    out_flag: str = "--out"
    needs_data: bool = False
    takes_latents: bool = False  # accepts --latents (the training run's latent cache)
    extra: dict[str, Any] = field(default_factory=dict)


BENCHES = (
    Bench(
        "render",
        "bench_render.py",
        "Simulated rig rendering speed",
        quick=("--frames", "100", "--workers", "1"),
    ),
    Bench(
        "health",
        "bench_health.py",
        "Camera health monitor: recall, delay, false alarms",
        quick=("--quick",),
    ),
    Bench(
        "backends",
        "bench_backends.py",
        "Encoder, decoder, score network: ONNX Runtime vs torch",
        quick=("--seconds", "0.1", "--exporter", "torchscript"),
    ),
    Bench(
        "samplers",
        "bench_samplers.py",
        "Imputation samplers: accuracy and speed",
        quick=("--samples", "500", "--repeats", "1"),
    ),
    Bench(
        "training",
        "bench_training.py",
        "Training throughput",
        quick=("--steps", "3", "--warmup", "1"),
        out_flag="--json",
    ),
    Bench(
        "edge",
        "bench_edge.py",
        "Edge node: 3 cameras at 30 FPS on one core",
        quick=("--seconds", "5", "--backends", "onnxruntime"),
    ),
    Bench(
        "receiver",
        "bench_receiver.py",
        "Receiver: latency and saturation",
        quick=("--seconds", "3"),
    ),
    Bench(
        "default_model",
        "bench_default_model.py",
        "The default model on held-out scenes",
        needs_data=True,
        takes_latents=True,
    ),
    Bench(
        "sampler_drift",
        "bench_sampler_drift.py",
        "Samplers on the trained default model: error and drift",
        quick=("--frames", "50", "--runs", "dpmpp_2m_sde:20,dpmpp_2m:20,euler_maruyama:200"),
        needs_data=True,
    ),
)


def hardware() -> dict[str, Any]:
    """CPU model, cores, memory, GPU and load average now."""
    cpu = cpu_name()
    gpu = "none"
    if shutil.which("nvidia-smi"):
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        gpu = listed.stdout.strip() or gpu
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        total = re.search(r"MemTotal:\s*(\d+)", meminfo.read_text())
        memory = f"{int(total.group(1)) / 2**20:.1f} GiB" if total else ""
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory": memory,
        "gpu": gpu,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def git_commit() -> str:
    """The checked-out commit (and ``+dirty`` when files differ), or ``unknown``."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            text=True,
            capture_output=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            text=True,
            capture_output=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def command_for(bench: Bench, quick: bool, out: Path, data: Path | None) -> list[str]:
    """The command line that runs ``bench`` (relative paths, as printed in RESULTS.md)."""
    args = list(bench.quick if quick else bench.full)
    if bench.needs_data and data is not None:
        resolved = data.resolve()
        shown = resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved
        args = ["--data", str(shown), *args]
        if bench.takes_latents and resolved == TRAINING_DATA and TRAINING_LATENTS.is_file():
            args += ["--latents", str(TRAINING_LATENTS.relative_to(ROOT))]
    return [
        "nice",
        "-n",
        "10",
        "python",
        f"bench/{bench.script}",
        *args,
        bench.out_flag,
        str(out.relative_to(ROOT)),
    ]


def skip_reason(bench: Bench, data: Path | None) -> str | None:
    """Why ``bench`` cannot run here, or None."""
    if not bench.needs_data:
        return None
    if data is None:
        return (
            f"needs the model's labelled dataset: pass --data DIR (docs/MODEL.md renders "
            f"it to {TRAINING_DATA.relative_to(ROOT)})"
        )
    if not (DEFAULT_MODEL / "last.json").is_file():
        return f"the default model is not installed ({DEFAULT_MODEL})"
    return None


def run_bench(
    bench: Bench, quick: bool, out_dir: Path, data: Path | None, timeout_s: float
) -> dict[str, Any]:
    """Run one benchmark; return its record (command, status, seconds, its JSON)."""
    out = out_dir / f"{bench.name}.json"
    command = command_for(bench, quick, out, data)
    record: dict[str, Any] = {
        "title": bench.title,
        "command": " ".join(command),
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
    }
    reason = skip_reason(bench, data)
    if reason:
        return record | {"status": "skipped", "reason": reason}
    print(f"run_all: {record['command']}", flush=True)
    executable = [sys.executable if part == "python" else part for part in command]
    start = time.monotonic()
    try:
        done = subprocess.run(
            executable, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return record | {"status": "timeout", "seconds": round(time.monotonic() - start, 1)}
    record |= {
        "seconds": round(time.monotonic() - start, 1),
        "exit_status": done.returncode,
        "output_tail": (done.stdout + done.stderr)[-3000:],
    }
    if done.returncode != 0 or not out.is_file():
        return record | {"status": "failed"}
    return record | {"status": "ok", "results": json.loads(out.read_text())}


# -- markdown -----------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(",", ":"))
        return text if len(text) <= 60 else text[:57] + "..."
    return str(value).replace("|", "\\|").replace("\n", " ")


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, (dict, list)) or (
        isinstance(value, list)
        and len(value) <= 4
        and all(not isinstance(v, (dict, list)) for v in value)
    )


def _table(rows: list[dict[str, Any]], first: str | None = None) -> list[str]:
    """A markdown table of dict rows (columns: the union of their keys, in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    if first is not None:
        columns = [first] + [c for c in columns if c != first]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows[:MAX_ROWS]:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    if len(rows) > MAX_ROWS:
        lines.append(f"\n({len(rows) - MAX_ROWS} more rows in the JSON)")
    return lines


def _flatten(value: Any, prefix: str, depth: int) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` down to ``depth`` levels; deeper maps stay whole."""
    if not isinstance(value, dict) or depth == 0:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, inner in value.items():
        flat |= _flatten(inner, f"{prefix}.{key}" if prefix else str(key), depth - 1)
    return flat


def _records_table(name: str, records: dict[str, Any]) -> list[str]:
    """A map of records (e.g. one per fault) as rows; skipped when the records nest deeper."""
    if any(
        isinstance(v, dict) and all(isinstance(x, dict) for x in v.values())
        for v in records.values()
    ):
        return ["", f"**{name}**: nested deeper than a table, see the JSON."]
    rows = [{"": key, **_flatten(inner, "", 1)} for key, inner in records.items()]
    return ["", f"**{name}**", "", *_table(rows, first="")]


def tables(results: dict[str, Any]) -> list[str]:
    """Markdown tables for a benchmark's JSON: its settings, lists of records, maps of records."""
    settings = {key: value for key, value in results.items() if _is_scalar(value)}
    for key, value in results.items():  # one level of small settings maps (hardware, versions)
        if isinstance(value, dict) and value and all(_is_scalar(v) for v in value.values()):
            settings |= _flatten(value, key, 1)
    lines = ["| setting | value |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in settings.items()]
    for key, value in results.items():
        if _is_scalar(value) or key in {k.split(".")[0] for k in settings}:
            continue
        if isinstance(value, list) and all(isinstance(v, dict) for v in value):
            lines += ["", f"**{key}**", "", *_table([_flatten(v, "", 2) for v in value])]
        elif isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
            lines += _records_table(key, value)
        elif isinstance(value, dict):
            flat = _flatten(value, "", 3)
            lines += [
                "",
                f"**{key}**",
                "",
                "| measure | value |",
                "|---|---|",
                *[f"| {name} | {_cell(v)} |" for name, v in flat.items()],
            ]
    return lines


def bench_section(name: str, record: dict[str, Any]) -> str:
    """The RESULTS.md block of one benchmark."""
    lines = [
        f"## {record['title']} (`bench/{name}`)",
        "",
        f"Command: `{record['command']}`  ",
        f"Status: **{record['status']}**"
        + (f" in {record['seconds']} s" if "seconds" in record else "")
        + f"; load average at start {record['load_average_1min_at_start']}.",
    ]
    if record["status"] == "skipped":
        lines.append(f"Skipped: {record['reason']}.")
    elif record["status"] != "ok":
        lines += ["", "```", record.get("output_tail", "")[-1500:], "```"]
    else:
        lines += ["", *tables(record["results"])]
    return "\n".join(lines)


def header_section(report: dict[str, Any]) -> str:
    """The RESULTS.md header: when, which commit, which hardware, and the one command."""
    hw = report["hardware"]
    return "\n".join(
        [
            "# Results",
            "",
            f"Generated by `{report['command']}` on {report['started']} (commit "
            f"{report['commit']}); all numbers also in `bench/results/all.json`"
            + (
                " (quick mode: short runs, results in `bench/results/quick/`)"
                if report["quick"]
                else ""
            )
            + ".",
            "",
            f"Hardware: {hw['cpu']}, {hw['logical_cpus']} logical CPUs "
            f"({hw['usable_cpus']} usable), "
            f"{hw['memory']} memory, GPU: {hw['gpu']}; load average (1, 5, 15 min) at start "
            f"{hw['load_average_1_5_15']} ({hw['platform']}, Python {hw['python']}). This machine "
            "is shared with other jobs: a busy machine makes every timing pessimistic.",
            "",
            "| benchmark | status | seconds | command |",
            "|---|---|---|---|",
            *[
                f"| {name} | {r['status']} | {r.get('seconds', '')} | `{r['command']}` |"
                for name, r in report["benchmarks"].items()
            ],
        ]
    )


def replace_block(text: str, key: str, body: str) -> str:
    """Replace the block marked ``<!-- BEGIN key -->`` ... ``<!-- END key -->``, or append it.

    The BEGIN marker ends the block's first line (its heading), so that a tool that replaces
    another "## " section up to the next "## " heading (mvld-eval --results) keeps it.
    """
    begin, end = f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"
    first, _, rest = body.strip("\n").partition("\n")
    block = f"{first} {begin}\n{rest}\n{end}"
    pattern = re.compile(
        r"^[^\n]*" + re.escape(begin) + r".*?" + re.escape(end), re.DOTALL | re.MULTILINE
    )
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    if key == "run_all:header":
        return block + "\n\n" + text.lstrip("\n")
    return text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n"


def write_results_md(report: dict[str, Any], path: Path = RESULTS_MD) -> None:
    """Update this script's blocks in RESULTS.md; everything else stays as it is."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    text = replace_block(text, "run_all:header", header_section(report))
    for name, record in report["benchmarks"].items():
        text = replace_block(text, f"bench:{name}", bench_section(name, record))
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (under 10 minutes)")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument(
        "--data",
        type=Path,
        default=TRAINING_DATA if TRAINING_DATA.is_dir() else None,
        help="labelled dataset for bench_default_model (default: "
        f"{TRAINING_DATA.relative_to(ROOT)} when it exists)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per benchmark (default 240 quick, 3600 full)",
    )
    parser.add_argument("--no-markdown", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument(
        "--markdown-only",
        action="store_true",
        help="only rewrite RESULTS.md from bench/results/all.json",
    )
    args = parser.parse_args(argv)
    summary = ROOT / "bench" / "results" / "all.json"
    if args.markdown_only:
        write_results_md(json.loads(summary.read_text()))
        return 0
    selected = [b for b in BENCHES if not args.only or b.name in args.only.split(",")]
    out_dir = ROOT / "bench" / "results" / ("quick" if args.quick else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    command = (
        "python bench/run_all.py"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    )
    report: dict[str, Any] = {
        "command": command.strip(),
        "quick": args.quick,
        "commit": git_commit(),
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": hardware(),
        "benchmarks": {},
    }
    timeout = args.timeout or (240.0 if args.quick else 3600.0)
    start = time.monotonic()
    for bench in selected:
        record = run_bench(bench, args.quick, out_dir, args.data, timeout)
        report["benchmarks"][bench.name] = record
        print(f"run_all: {bench.name}: {record['status']} {record.get('seconds', '')}", flush=True)
    report["total_seconds"] = round(time.monotonic() - start, 1)
    if args.only and summary.exists():  # a partial run updates the last full one
        previous = json.loads(summary.read_text())
        if previous.get("quick") == args.quick:
            report["benchmarks"] = previous["benchmarks"] | report["benchmarks"]
            report["command"] += f" (updating {previous['command']} of {previous['started']})"
    summary.write_text(json.dumps(report, indent=1))
    if not args.no_markdown:
        write_results_md(report)
    print(
        f"run_all: {len(selected)} benchmarks in {report['total_seconds']} s -> "
        f"{summary.relative_to(ROOT)}, docs/RESULTS.md"
    )
    return 0 if all(r["status"] in ("ok", "skipped") for r in report["benchmarks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
