"""Run the course: every notebook in order with papermill, with HTML copies and a summary.

    python -m utils.run [--profile P] [--only 02,04] [--output_dir D] [--check]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from utils import report
from utils.errors import CourseError
from utils.profiles import PROFILES, get_profile, gpu_memory_gib, resolve_name

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
INCOMPLETE = "RUN_INCOMPLETE"


def notebooks(only: list[str] | None = None) -> list[Path]:
    """The course notebooks in order, optionally only those whose number is in `only`."""
    found = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        unknown = set(only) - {nb.name[:2] for nb in found}
        if unknown:
            numbers = [nb.name[:2] for nb in found]
            raise CourseError(f"No notebook numbered {sorted(unknown)}; the course has {numbers}.")
        found = [nb for nb in found if nb.name[:2] in only]
    return found


def export_html(executed: Path) -> Path:
    """Write an HTML copy beside the executed notebook."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    html = executed.with_suffix(".html")
    html.write_text(body, encoding="utf-8")
    return html


def failure_paragraph(nb: Path, executed: Path, err: Exception) -> str:
    """One paragraph naming the notebook, the cell, the error and the partly executed copy."""
    cell = getattr(err, "exec_count", None) or getattr(err, "cell_index", "?")
    name = getattr(err, "ename", type(err).__name__)
    value = getattr(err, "evalue", str(err))
    return (
        f"FAILED: {nb.name}, cell {cell}: {name}: {value}. The partly executed notebook is at {executed} "
        f"(open it to see the traceback under that cell); fix the cause and run again with --only {nb.name[:2]}."
    )


def write_summary(out_dir: Path, profile_name: str, rows: list[dict]) -> Path:
    """summary.md: per notebook status, wall time and the metrics it recorded."""
    lines = [f"# Course run, profile `{profile_name}`", "", "| notebook | status | wall time | metrics |",
             "|---|---|---|---|"]
    for row in rows:
        metrics = "<br>".join(f"{k} = {v:.4g}" for k, v in sorted(row["metrics"].items())) or "-"
        lines.append(f"| {row['notebook']} | {row['status']} | {row['seconds']:.0f} s | {metrics} |")
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_course(profile_name: str, output_dir: Path, only: list[str] | None = None) -> int:
    """Execute the notebooks in order; stop at the first failure. Returns a process exit code."""
    import papermill as pm

    selected = notebooks(only)
    output_dir.mkdir(parents=True, exist_ok=True)
    marker = output_dir / INCOMPLETE
    marker.write_text("A run is in progress or was interrupted; outputs here may be from two runs.\n")
    rows = []
    for i, nb in enumerate(selected, 1):
        print(f"[{i}/{len(selected)}] {nb.name} (profile {profile_name})", flush=True)
        executed = output_dir / nb.name
        report.clear_recorded(output_dir)
        start = time.time()
        try:
            pm.execute_notebook(nb, executed, cwd=str(nb.parent), kernel_name="python3", progress_bar=True,
                                parameters={"PROFILE": profile_name, "OUTPUT_DIR": str(output_dir)})
        except Exception as err:  # papermill wraps every cell error; report it in one paragraph
            rows.append({"notebook": nb.name, "status": "failed", "seconds": time.time() - start, "metrics": {}})
            write_summary(output_dir, profile_name, rows)
            print(failure_paragraph(nb, executed, err), file=sys.stderr)
            return 1
        export_html(executed)
        rows.append({"notebook": nb.name, "status": "ok", "seconds": time.time() - start,
                     "metrics": report.recorded_since_cleared(output_dir)})
        write_summary(output_dir, profile_name, rows)
        print(f"      done in {time.time() - start:.0f} s", flush=True)
    marker.unlink()
    print(f"Summary: {output_dir / 'summary.md'}")
    return 0


def check_machine(profile_name: str) -> dict:
    """What this machine has, the profile's precision and why, and a forecast of the course's time and memory
    (memory_plan.plan: what each step of notebooks 02 and 04 holds on the GPU and the host).

    On the cpu profile the forecast comes from one timed SFT step of the course's set-up (about a minute); on a GPU
    profile (and its dry run) from utils.forecast: an RTX 4090, notebook by notebook, with every input.
    """
    import psutil
    import torch

    from utils import forecast, memory, memory_plan, precision, timing

    profile = get_profile(profile_name)
    info = {
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "disk_free_gib": round(shutil.disk_usage(ROOT).free / 2**30, 1),
        "gpu_gib": None if gpu_memory_gib() is None else round(gpu_memory_gib(), 1),
        "auto_profile": resolve_name("auto"),
        "profile": profile.name,
        "compute_dtype": profile.compute_dtype,
        "compute_dtype_reason": profile.compute_dtype_reason,
        "matmul_gflops": {name: round(timing.matmul_gflops(getattr(torch, name)), 1) for name in precision.DTYPES},
        "estimated_training_gib": round(memory.estimate_profile(profile).total / 2**30, 1),
        "memory_plan": [step.as_row() for step in memory_plan.plan(profile)],  # GPU and host, step by step
    }
    if profile.name in timing.COURSE_STEP_EQUIVALENTS:
        print(f"Timing one SFT step of the {profile.name} profile in {profile.compute_dtype}...", file=sys.stderr)
        step = timing.time_sft_step(profile)
        info["sft_step_seconds"] = round(step, 1)
        info["predicted_course_minutes"] = round(timing.predict_course_minutes(profile, step), 1)
    elif (gpu_profile := forecast.stand_in(profile)) is not None:
        info["forecast"] = forecast.summary(gpu_profile)  # from the GPU throughputs in benchmarks/results/gpu.json
        info["predicted_course_minutes"] = info["forecast"]["minutes"]["total"]
        print(forecast.describe(gpu_profile), file=sys.stderr)
    else:
        info["predicted_course_minutes"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.run", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="auto", help=f"one of {', '.join([*PROFILES, 'auto'])}")
    parser.add_argument("--only", help="comma-separated notebook numbers, e.g. 02,04")
    parser.add_argument("--output_dir", "--output-dir", type=Path, help="default: outputs/<profile>")
    parser.add_argument("--check", action="store_true", help="inspect the machine and estimate the run")
    args = parser.parse_args(argv)
    try:
        profile_name = resolve_name(args.profile)
        if args.check:
            print(json.dumps(check_machine(profile_name), indent=2))
            return 0
        output_dir = (args.output_dir or ROOT / "outputs" / profile_name).resolve()
        only = [s.strip().zfill(2) for s in args.only.split(",")] if args.only else None
        return run_course(profile_name, output_dir, only)
    except CourseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
