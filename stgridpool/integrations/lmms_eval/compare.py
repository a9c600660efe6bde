"""Run one lmms-eval task list twice, stock pooling and ST-GridPool, and print the paper-style table with deltas.

    stgridpool-compare --pretrained llava-hf/llava-onevision-qwen2-7b-ov-hf --stock-mode bilinear \
        --tasks videomme,mvbench --model-args max_frames_num=32 \
        --launcher "accelerate launch --num_processes 8 -m" --output-dir results/ov7b

Each run writes lmms-eval's own results under OUTPUT_DIR/stock and OUTPUT_DIR/stgridpool; `--no-run` only reads
them back (e.g. after runs made by hand with the same layout). Scores are shown in percent: each paper task's metric
has a known scale (METRICS, from lmms-eval 0.7.3's task code: some report fractions, some percentages); a metric not
in METRICS is shown as lmms-eval reported it, marked `*`, and left out of the mean.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

STOCK_MODES = ("bilinear", "average")


def latest_results(run_dir: Path) -> dict:
    """The newest `*_results.json` lmms-eval wrote anywhere under `run_dir` (it adds a per-model folder)."""
    files = sorted(Path(run_dir).rglob("*_results.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no lmms-eval *_results.json under {run_dir}")
    return json.loads(files[-1].read_text())


MVBENCH_SUBTASKS = (
    "action_antonym", "action_count", "action_localization", "action_prediction", "action_sequence", "character_order",
    "counterfactual_inference", "egocentric_navigation", "episodic_reasoning", "fine_grained_action",
    "fine_grained_pose", "moving_attribute", "moving_count", "moving_direction", "object_existence",
    "object_interaction", "object_shuffle", "scene_transition", "state_change", "unexpected_action",
)
# task -> (its headline metric, the factor that makes it a percentage), read from lmms-eval 0.7.3's task code: the
# aggregation functions of videomme, tempcompass, mvbench and egoschema's server score return percentages (x 100);
# longvideobench's lvb_acc, egoschema_subset's score and nextqa's exact_match (a mean of 0/1) return fractions.
# This project's offline tasks (the `tasks` folder beside this file) are the same tasks with `_local` appended.
METRICS = {
    "videomme": ("videomme_perception_score", 1.0),
    "longvideobench_val_v": ("lvb_acc", 100.0),
    "egoschema": ("submission", 1.0),
    "egoschema_subset": ("score", 100.0),
    "nextqa_mc_test": ("exact_match", 100.0),
    "tempcompass_multi_choice": ("avg_accuracy", 1.0),
    **{f"mvbench_{name}": ("mvbench_accuracy", 1.0) for name in MVBENCH_SUBTASKS},
}
LOCAL_SUFFIX = "_local"


@dataclass(frozen=True)
class Score:
    """A task's score: `value` in percent when `known` (its scale is in METRICS), else as lmms-eval reported it."""

    value: float
    known: bool


def _metric_value(metrics: dict, metric: str | None) -> float | None:
    """The value of `metric` (any filter: `name,none`), or with metric None the first numeric one (not a stderr)."""
    for key, value in metrics.items():
        name = key.split(",", 1)[0]
        if key == "alias" or name.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if metric is None or name == metric:
            return float(value)
    return None


def task_metric(task: str) -> tuple[str, float] | None:
    """(headline metric, factor to percent) of `task` or of its `_local` copy; None when the scale is unknown."""
    return METRICS.get(task.removesuffix(LOCAL_SUFFIX))


def task_score(results: dict, task: str) -> Score | None:
    """Score of `task`: its headline metric, else (a group like mvbench) the mean of its subtasks' scores."""
    own = results.get("results", {}).get(task) or results.get("groups", {}).get(task)
    if own:
        known = task_metric(task)
        value = _metric_value(own, known[0] if known else None)
        if value is not None:
            return Score(value * known[1], True) if known else Score(value, False)
    subtasks = results.get("group_subtasks", {}).get(task) or []
    scores = [s for s in (task_score(results, sub) for sub in subtasks) if s is not None]
    if not scores:
        return None
    return Score(sum(s.value for s in scores) / len(scores), all(s.known for s in scores))


def format_table(tasks: list[str], stock: dict, stgp: dict, stock_label: str) -> str:
    """Markdown table: task | stock | +ST-GridPool | delta, one row per task, with the mean of the rows whose scale is
    known (percent); a score whose scale is unknown is shown as reported, marked `*`, with a note under the table."""
    lines = [f"| Task | {stock_label} | +ST-GridPool | Δ |", "|---|---:|---:|---:|"]
    pairs, unknown = [], []
    for task in tasks:
        a, b = task_score(stock, task), task_score(stgp, task)
        mark = "*" if any(s is not None and not s.known for s in (a, b)) else ""
        cells = ["n/a" if s is None else f"{s.value:.1f}{mark}" for s in (a, b)]
        cells.append("n/a" if a is None or b is None else f"{b.value - a.value:+.1f}{mark}")
        lines.append(f"| {task} | {' | '.join(cells)} |")
        if mark:
            unknown.append(task)
        elif a is not None and b is not None:
            pairs.append((a.value, b.value))
    if len(pairs) > 1:
        mean_a, mean_b = (sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
        lines.append(f"| mean | {mean_a:.1f} | {mean_b:.1f} | {mean_b - mean_a:+.1f} |")
    if unknown:
        lines.append(
            f"\n\\* {', '.join(unknown)}: metric scale unknown to stgridpool-compare (not in its METRICS table): "
            "shown as lmms-eval reported it (a fraction or a percentage) and left out of the mean."
        )
    return "\n".join(lines)


def run_environment() -> dict:
    """This process's environment, with HF_HOME named: lmms-eval 0.7.3's nextqa and tempcompass task code reads
    os.environ["HF_HOME"] and fails when it is unset (unset means huggingface_hub's default, which is what is set)."""
    from huggingface_hub import constants

    return {**os.environ, "HF_HOME": os.environ.get("HF_HOME") or constants.HF_HOME}


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
    parser.add_argument("--launcher", default="",
                        help='e.g. "accelerate launch --num_processes 8 -m" (default: this python -m)')
    parser.add_argument("--lmms-eval-args", default="",
                        help="extra lmms-eval flags, e.g. '--limit 8 --include_path DIR'")
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--no-run", action="store_true", help="only read OUTPUT_DIR/stock and OUTPUT_DIR/stgridpool")
    args = parser.parse_args(argv)
    if not args.no_run and not args.pretrained:
        parser.error("--pretrained is required unless --no-run")
    for flag, value in (("--model-args", args.model_args), ("--stgridpool-args", args.stgridpool_args)):
        if any(a.split("=", 1)[0].strip() == "video_pooling_mode" for a in value.split(",")):
            parser.error(f"{flag} must not set video_pooling_mode: the runs use --stock-mode and stgridpool")

    runs = {"stock": (args.stock_mode, ""), "stgridpool": ("stgridpool", args.stgridpool_args)}
    failed = []
    if not args.no_run:
        for name, (mode, extra) in runs.items():
            model_args = ",".join(a for a in (args.model_args, extra) if a)
            run_args = argparse.Namespace(**{**vars(args), "model_args": model_args})
            command = lmms_eval_command(run_args, mode, args.output_dir / name)
            print("$", shlex.join(command), flush=True)
            before = set((args.output_dir / name).rglob("*_results.json"))
            subprocess.run(command, check=True, env=run_environment())
            if not set((args.output_dir / name).rglob("*_results.json")) - before:  # lmms-eval may exit 0 on errors
                failed.append(name)  # the other run still runs: its answers (e.g. a submission file) are not lost
    for path in sorted(args.output_dir.rglob("submissions/*")):
        print(f"submission file (lmms-eval's answers to upload; see README): {path}")
    if failed:
        raise SystemExit(
            f"the {' and '.join(failed)} run(s) wrote no results under {args.output_dir}: see the log above "
            "(lmms-eval exits 0 even when a task fails)"
        )
    results = {name: latest_results(args.output_dir / name) for name in runs}
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    print(format_table(tasks, results["stock"], results["stgridpool"], f"stock ({args.stock_mode})"))
    return 0

if __name__ == "__main__":
    sys.exit(main())
