"""Run one lmms-eval task list twice, stock pooling and ST-GridPool, and print the paper-style table with deltas.

    python -m stgridpool_eval.compare --pretrained llava-hf/llava-onevision-qwen2-7b-ov-hf --stock-mode bilinear \
        --tasks videomme,mvbench --model-args max_frames_num=32 \
        --launcher "accelerate launch --num_processes 8 -m" --output-dir results/ov7b

Each run writes lmms-eval's own results under OUTPUT_DIR/stock and OUTPUT_DIR/stgridpool; `--no-run` only reads
them back (e.g. after runs made by hand with the same layout). Scores in [0, 1] are shown as percentages.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

STOCK_MODES = ("bilinear", "average")


def latest_results(run_dir: Path) -> dict:
    """The newest `*_results.json` lmms-eval wrote anywhere under `run_dir` (it adds a per-model folder)."""
    files = sorted(Path(run_dir).rglob("*_results.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no lmms-eval *_results.json under {run_dir}")
    return json.loads(files[-1].read_text())


def primary_score(metrics: dict) -> float | None:
    """The first numeric metric lmms-eval reported for a task (not its stderr), as a percentage."""
    for key, value in metrics.items():
        if key == "alias" or "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        return 100.0 * value if abs(value) <= 1.0 else float(value)
    return None


def task_score(results: dict, task: str) -> float | None:
    """Score of `task`: its own metric, else (a group like mvbench) the mean of its subtasks' scores."""
    own = results.get("results", {}).get(task) or results.get("groups", {}).get(task)
    score = primary_score(own) if own else None
    if score is not None:
        return score
    subtasks = results.get("group_subtasks", {}).get(task) or []
    scores = [task_score(results, sub) for sub in subtasks]
    scores = [s for s in scores if s is not None]
    return sum(scores) / len(scores) if scores else None


def format_table(tasks: list[str], stock: dict, stgp: dict, stock_label: str) -> str:
    """Markdown table: task | stock | +ST-GridPool | delta, one row per task, with the mean of the rows."""
    lines = [f"| Task | {stock_label} | +ST-GridPool | Δ |", "|---|---:|---:|---:|"]
    pairs = []
    for task in tasks:
        a, b = task_score(stock, task), task_score(stgp, task)
        cell = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
        delta = "n/a" if a is None or b is None else f"{b - a:+.1f}"
        lines.append(f"| {task} | {cell(a)} | {cell(b)} | {delta} |")
        if a is not None and b is not None:
            pairs.append((a, b))
    if len(pairs) > 1:
        mean_a, mean_b = (sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
        lines.append(f"| mean | {mean_a:.1f} | {mean_b:.1f} | {mean_b - mean_a:+.1f} |")
    return "\n".join(lines)


def lmms_eval_command(args, pooling_mode: str, output: Path) -> list[str]:
    """argv of one lmms-eval run (no shell): launcher + `lmms_eval --model stgridpool ...`."""
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable, "-m"]
    model_args = f"pretrained={args.pretrained},video_pooling_mode={pooling_mode}"
    if args.model_args:
        model_args += f",{args.model_args}"
    command = launcher + ["lmms_eval", "--model", "stgridpool", "--model_args", model_args, "--tasks", args.tasks]
    command += ["--batch_size", "1", "--output_path", str(output)]
    return command + shlex.split(args.lmms_eval_args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", help="model repo or directory (passed as pretrained=...)")
    parser.add_argument("--tasks", required=True, help="comma-separated lmms-eval task names, as for --tasks")
    parser.add_argument("--stock-mode", choices=STOCK_MODES, default="bilinear",
                        help="stock pooling: bilinear (LLaVA-OneVision) or average (LLaVA-Video)")
    parser.add_argument("--model-args", default="", help="extra model_args for both runs, e.g. max_frames_num=32")
    parser.add_argument("--stgridpool-args", default="", help="extra model_args for the ST-GridPool run only")
    parser.add_argument("--launcher", default="", help='e.g. "accelerate launch --num_processes 8 -m" (default: this python -m)')
    parser.add_argument("--lmms-eval-args", default="", help="extra lmms-eval flags, e.g. '--limit 8 --include_path DIR'")
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--no-run", action="store_true", help="only read OUTPUT_DIR/stock and OUTPUT_DIR/stgridpool")
    args = parser.parse_args(argv)
    if not args.no_run and not args.pretrained:
        parser.error("--pretrained is required unless --no-run")
    for flag, value in (("--model-args", args.model_args), ("--stgridpool-args", args.stgridpool_args)):
        if any(a.split("=", 1)[0].strip() == "video_pooling_mode" for a in value.split(",")):
            parser.error(f"{flag} must not set video_pooling_mode: the runs use --stock-mode and stgridpool")

    runs = {"stock": (args.stock_mode, ""), "stgridpool": ("stgridpool", args.stgridpool_args)}
    if not args.no_run:
        for name, (mode, extra) in runs.items():
            run_args = argparse.Namespace(**{**vars(args), "model_args": ",".join(a for a in (args.model_args, extra) if a)})
            command = lmms_eval_command(run_args, mode, args.output_dir / name)
            print("$", shlex.join(command), flush=True)
            before = set((args.output_dir / name).rglob("*_results.json"))
            subprocess.run(command, check=True)
            if not set((args.output_dir / name).rglob("*_results.json")) - before:  # lmms-eval may exit 0 on errors
                raise SystemExit(f"the {name} run wrote no results under {args.output_dir / name}: see its log above")
    results = {name: latest_results(args.output_dir / name) for name in runs}
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    print(format_table(tasks, results["stock"], results["stgridpool"], f"stock ({args.stock_mode})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
