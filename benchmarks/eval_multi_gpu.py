"""lmms-eval's `--model stgridpool` data-parallel on several GPUs (issue 14): a local multiple-choice task (clips
encoded here with PyAV) on a converted checkpoint, run with one process and under `accelerate launch`, directly and
through `stgridpool-compare`. Checks that each process keeps its model on its own GPU, that the results merge,
and that scores and per-document answers equal the one-process run's. Writes JSON and the logs.

    python benchmarks/eval_multi_gpu.py --checkpoint TINY_CONVERTED --work /tmp/evalgpu --json eval.json    # GPUs
    python benchmarks/eval_multi_gpu.py --checkpoint TINY_CONVERTED --work /tmp/evalcpu --cpu              # dry run

Runs: (1) `stgridpool-compare` with one process (`python -m`: stock bilinear, then stgridpool); (2) `accelerate
launch --num_processes N -m lmms_eval --model stgridpool ...`; (3) `stgridpool-compare --launcher "accelerate
launch --num_processes N -m"`. With --cpu the launcher is `python -m torch.distributed.run --nproc_per_node N -m`
(gloo; `accelerate launch --cpu` starts one process only).

Where each process put its model: a `sitecustomize.py` placed on the children's PYTHONPATH (it first runs any
sitecustomize it shadows) writes, at exit, the process's rank, its process group's backends and its peak allocated
memory on every visible GPU to a JSON file;
nvidia-smi is also polled for the processes on each GPU. NCCL_DEBUG=VERSION makes NCCL print its version when a
communicator starts, so the log shows whether NCCL carried the gather.
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TASK = "stgp_mc"
TASK_UTILS = """
def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return f"{doc['question']} {' '.join(doc['options'])} answer"


def process_results(doc, results):
    return {"accuracy": float(results[0].split()[:1] == [doc["answer"]])}
"""
# generate_until: lmms-eval 0.7.3 turns loglikelihood results into strings, so its multiple_choice tasks fail for
# every model (README); the options are words the tiny tokenizer knows, the answer is the first word generated.
TASK_YAML = """
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
"""
TASKS = {TASK: "accuracy,none"}
WEIGHT_SCALE = 20.0
PROBE = r'''
"""Written by benchmarks/eval_multi_gpu.py: report where this process allocated GPU memory, at exit."""
import atexit, importlib.machinery, importlib.util, json, os, sys, threading, time

_here = os.path.dirname(os.path.abspath(__file__))
_others = [p for p in sys.path if os.path.abspath(p or ".") != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _others)
if _spec is not None and _spec.origin and os.path.abspath(_spec.origin) != os.path.abspath(__file__):
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)


_dist = {}


def _watch_distributed():  # the process group is gone by exit time: note its backend while it exists
    while True:
        torch = sys.modules.get("torch")
        try:
            dist = getattr(torch, "distributed", None)
            if dist is not None and dist.is_available() and dist.is_initialized():
                config = dist.get_backend_config() if hasattr(dist, "get_backend_config") else None
                _dist.update(backend=str(dist.get_backend()), backend_config=str(config), rank=dist.get_rank(),
                             world_size=dist.get_world_size())
                return
        except Exception:  # noqa: BLE001 - torch may be half imported
            pass
        time.sleep(0.2)


threading.Thread(target=_watch_distributed, daemon=True).start()


def _report():
    torch = sys.modules.get("torch")
    if torch is None:
        return
    info = dict(pid=os.getpid(), rank=os.environ.get("RANK"), local_rank=os.environ.get("LOCAL_RANK"),
                argv0=sys.argv[0], cuda_initialized=bool(torch.cuda.is_initialized()), dist=dict(_dist))
    if torch.cuda.is_initialized():
        n = torch.cuda.device_count()
        info["current_device"] = torch.cuda.current_device()
        info["max_allocated_mib"] = [round(torch.cuda.max_memory_allocated(i) / 2**20, 2) for i in range(n)]
        info["device_names"] = [torch.cuda.get_device_name(i) for i in range(n)]
    with open(os.path.join(os.environ["STGP_PROBE_OUT"], f"probe_{os.getpid()}.json"), "w") as f:
        json.dump(info, f)


if os.environ.get("STGP_PROBE_OUT"):
    atexit.register(_report)
'''


def encode_clip(path: Path, seed: int, num_frames: int = 12, size: int = 48) -> None:
    """A short random-coloured MPEG-4 clip, so each clip gives the model different pixels."""
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(num_frames):
            frame = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def build_checkpoint(path: Path) -> Path:
    """A tiny stock checkpoint (stgridpool/demo.py) with its matrices scaled by WEIGHT_SCALE, so that a random
    model's greedy answers change from clip to clip and between poolings, converted by
    `python -m stgridpool.convert`."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    from stgridpool.demo import save_tiny_stock_checkpoint

    stock = path.with_name(path.name + "-stock")
    save_tiny_stock_checkpoint(stock)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(stock)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() >= 2:
                weight.mul_(WEIGHT_SCALE)
    model.save_pretrained(stock)
    subprocess.run(
        [sys.executable, "-m", "stgridpool.convert", str(stock), str(path), "--copy"],
        check=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return path


def make_task(work: Path, num_clips: int) -> Path:
    clips, docs = work / "clips", []
    clips.mkdir(parents=True, exist_ok=True)
    questions = ["how many cat", "what color", "where is the dog", "what is happening"]
    options = ["three", "dog", "in", "this"]
    for i in range(num_clips):
        encode_clip(clips / f"clip{i}.mp4", seed=i)
        docs.append(
            {
                "video": str(clips / f"clip{i}.mp4"),
                "question": questions[i % 4],
                "options": options,
                "answer": options[(i * 7) % 4],
            }
        )
    (work / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = work / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "utils.py").write_text(TASK_UTILS)
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, docs=work / "docs.jsonl"))
    return tasks


class GpuPoller(threading.Thread):
    """Polls nvidia-smi for (pid, GPU index, MiB) of compute processes; maps each pid to its LOCAL_RANK."""

    def __init__(self):
        super().__init__(daemon=True)
        self.seen, self.stop = {}, threading.Event()
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        self.index = dict(reversed(line.split(", ")) for line in out.stdout.strip().splitlines() if ", " in line)

    def run(self):
        while not self.stop.is_set():
            out = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                check=False,
            )
            for line in out.stdout.strip().splitlines():
                try:
                    pid, uuid, mib = [s.strip() for s in line.split(",")]
                except ValueError:
                    continue
                key = (int(pid), self.index.get(uuid, uuid))
                rank = None
                try:
                    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    rank = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"LOCAL_RANK=")), None)
                except OSError:
                    pass
                prev = self.seen.get(key, {})
                self.seen[key] = dict(
                    pid=int(pid),
                    gpu=key[1],
                    local_rank=rank or prev.get("local_rank"),
                    max_used_mib=max(int(mib) if mib.isdigit() else 0, prev.get("max_used_mib", 0)),
                )
            self.stop.wait(0.5)

    def result(self):
        return sorted(self.seen.values(), key=lambda d: (d["gpu"], d["pid"]))


def run(name: str, command: list, env: dict, work: Path, poll: bool) -> dict:
    print(f"$ {shlex.join(command)}", flush=True)
    probe_out = work / "probes" / name
    probe_out.mkdir(parents=True, exist_ok=True)
    env = {**env, "STGP_PROBE_OUT": str(probe_out)}
    poller = GpuPoller() if poll else None
    if poller:
        poller.start()
    t0 = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=work, check=False)
    wall = time.perf_counter() - t0
    if poller:
        poller.stop.set()
        poller.join()
    log = (proc.stdout + "\n" + proc.stderr).replace("\r", "\n")
    (work / "logs").mkdir(exist_ok=True)
    (work / "logs" / f"{name}.log").write_text(f"$ {shlex.join(command)}\n{log}")
    probes = [json.loads(f.read_text()) for f in sorted(probe_out.glob("probe_*.json"))]
    probes = [p for p in probes if "lmms_eval" in p.get("argv0", "") or p.get("cuda_initialized")]
    result = dict(
        command=shlex.join(command),
        returncode=proc.returncode,
        wall_s=round(wall, 1),
        probes=probes,
        nccl=sorted(set(re.findall(r"NCCL version [^\s]+", log))),
        error_in_log="Error during evaluation" in log or "Traceback" in log,
    )
    if poller:
        result["nvidia_smi_processes"] = poller.result()
    print(f"  -> rc={proc.returncode} in {wall:.1f} s; probes: {json.dumps(probes)}", flush=True)
    if proc.returncode != 0 or result["error_in_log"]:
        print(log[-4000:], flush=True)
    return result


def read_run(run_dir: Path) -> dict:
    """Per task: score and per-document responses (answer text, or each option's [NLL, is_greedy]) of the newest
    lmms-eval run under run_dir."""
    results_files = sorted(run_dir.rglob("*_results.json"), key=lambda p: p.stat().st_mtime)
    if not results_files:
        return {}
    results = json.loads(results_files[-1].read_text())
    out = {}
    for task, metric in TASKS.items():
        (samples_file,) = sorted(results_files[-1].parent.glob(f"*_samples_{task}.jsonl"))[-1:]
        samples = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
        out[task] = dict(
            score=results["results"][task][metric],
            n_samples=results["n-samples"][task],
            model_args=results["config"]["model_args"],
            answers={s["doc_id"]: s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])},
        )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="converted (or stock) LLaVA-OneVision checkpoint dir")
    parser.add_argument(
        "--build-checkpoint", type=Path, help="only build the tiny converted checkpoint here, then exit"
    )
    parser.add_argument("--work", type=Path, help="new folder for clips, task, runs and logs")
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--frames", type=int, default=8, help="max_frames_num")
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU: torchrun + gloo")
    parser.add_argument("--launcher", default=None, help='default: "accelerate launch --num_processes N -m"')
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.build_checkpoint:
        print(build_checkpoint(args.build_checkpoint.resolve()))
        return 0
    if args.checkpoint is None or args.work is None:
        parser.error("--checkpoint and --work are required (or --build-checkpoint)")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint.resolve()
    tasks = make_task(work, args.clips)
    probe_dir = work / "probe"
    probe_dir.mkdir(exist_ok=True)
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(work / "hf_home"),
        "HF_DATASETS_CACHE": str(work / "datasets"),
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
        "NCCL_DEBUG": "VERSION",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(probe_dir), str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
    }
    # NVLink multicast stays off (shared hosts), also in processes that build their own environment
    env.update(
        {
            k: env.get(k, v)
            for k, v in (
                ("NCCL_NVLS_ENABLE", "0"),
                ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                ("NVSHMEM_DISABLE_NVLS", "1"),
            )
        }
    )
    n = args.num_processes
    if args.cpu:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        launcher = f"{sys.executable} -m torch.distributed.run --nproc_per_node {n} --master_port 29561 -m"
        device_arg = ",device=cpu"
    else:
        launcher = args.launcher or f"accelerate launch --num_processes {n} -m"
        device_arg = ""
    poll = not args.cpu
    import torch
    import transformers

    report = dict(
        env=dict(
            command=shlex.join([sys.executable] + sys.argv),
            torch=torch.__version__,
            transformers=transformers.__version__,
            python=sys.version.split()[0],
            gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            launcher=launcher,
            clips=args.clips,
            max_frames_num=args.frames,
            checkpoint=str(checkpoint),
        ),
        runs={},
    )
    try:
        from importlib.metadata import version

        import accelerate
        import lmms_eval  # noqa: F401

        report["env"].update(accelerate=accelerate.__version__, lmms_eval=version("lmms_eval"))
    except Exception as exc:  # noqa: BLE001
        report["env"]["import_error"] = repr(exc)
    print(json.dumps(report["env"]), flush=True)
    lmms_flags = f"--include_path {tasks} --log_samples --verbosity INFO"
    task_list = ",".join(TASKS)
    compare = [
        sys.executable,
        "-m",
        "stgridpool.integrations.lmms_eval.compare",
        "--pretrained",
        str(checkpoint),
        "--tasks",
        task_list,
        "--stock-mode",
        "bilinear",
        "--model-args",
        f"max_frames_num={args.frames}{device_arg}",
        "--lmms-eval-args",
        lmms_flags,
    ]
    plan = {
        "one_process_compare": compare + ["--output-dir", str(work / "one")],
        "launch_lmms_eval": shlex.split(launcher)
        + [
            "lmms_eval",
            "--model",
            "stgridpool",
            "--model_args",
            f"pretrained={checkpoint},max_frames_num={args.frames},video_pooling_mode=stgridpool{device_arg}",
            "--tasks",
            task_list,
            "--batch_size",
            "1",
            "--output_path",
            str(work / "launch"),
            *shlex.split(lmms_flags),
        ],
        "launch_compare": compare + ["--launcher", launcher, "--output-dir", str(work / "launch_compare")],
    }
    for name, command in plan.items():
        report["runs"][name] = run(name, command, env, work, poll)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))

    def table(name):
        log = (work / "logs" / f"{name}.log").read_text()
        return log[log.index("| Task |") :].splitlines()[: 2 + len(TASKS) + 1] if "| Task |" in log else None

    read = {
        "one/stock": read_run(work / "one" / "stock"),
        "one/stgridpool": read_run(work / "one" / "stgridpool"),
        "launch/stgridpool": read_run(work / "launch"),
        "launch_compare/stock": read_run(work / "launch_compare" / "stock"),
        "launch_compare/stgridpool": read_run(work / "launch_compare" / "stgridpool"),
    }
    report["scores"] = {k: {t: v.get(t, {}).get("score") for t in TASKS} for k, v in read.items()}
    report["answers"] = {k: {t: v.get(t, {}).get("answers") for t in TASKS} for k, v in read.items()}
    report["tables"] = {"one_process_compare": table("one_process_compare"), "launch_compare": table("launch_compare")}
    checks = {}
    for name in ("launch_lmms_eval", "launch_compare"):
        r = report["runs"][name]
        workers = [p for p in r["probes"] if p.get("local_rank") is not None]  # compare launches lmms-eval twice
        launches = 2 if name == "launch_compare" else 1
        checks[f"{name}: exit 0, no traceback"] = r["returncode"] == 0 and not r["error_in_log"]
        checks[f"{name}: {n} ranks per launch"] = sorted(p["local_rank"] for p in workers) == sorted(
            [str(i) for i in range(n)] * launches
        )
        if not args.cpu:
            for i in range(n):
                mine = [p for p in workers if p["local_rank"] == str(i)]
                checks[f"{name}: rank {i} on cuda:{i}, no memory on another GPU"] = bool(mine) and all(
                    p.get("current_device") == i
                    and [mib > 0 for mib in p.get("max_allocated_mib", [])]
                    == [j == i for j in range(len(p["max_allocated_mib"]))]
                    for p in mine
                )
            checks[f"{name}: NCCL started"] = bool(r["nccl"]) and all(
                "nccl" in str(p.get("dist", {}).get("backend_config")) for p in workers
            )
        else:
            checks[f"{name}: gloo"] = all("gloo" in str(p.get("dist", {}).get("backend_config")) for p in workers)
    full = list(range(args.clips))
    for key, per_task in read.items():
        for task in TASKS:
            checks[f"{key} {task}: every document answered once"] = (
                sorted(per_task.get(task, {}).get("answers") or {}) == full
            )
    pairs = [
        ("launch/stgridpool", "one/stgridpool"),
        ("launch_compare/stgridpool", "one/stgridpool"),
        ("launch_compare/stock", "one/stock"),
    ]
    for a, b in pairs:
        for task in TASKS:
            ra, rb = read[a].get(task, {}), read[b].get(task, {})
            checks[f"{a} == {b}, {task}: per-document responses"] = ra.get("answers") == rb.get("answers") is not None
            checks[f"{a} == {b}, {task}: score"] = ra.get("score") == rb.get("score") is not None
    checks["compare tables equal (one process vs launch)"] = (
        report["tables"]["launch_compare"] == report["tables"]["one_process_compare"] is not None
    )
    answers = [
        read["one/stock"].get(TASK, {}).get("answers") or {},
        read["one/stgridpool"].get(TASK, {}).get("answers") or {},
    ]
    checks["answers differ between documents and between poolings (the comparison can fail)"] = (
        answers[0] != answers[1] and len(set(answers[1].values())) > 1
    )
    report["checks"] = checks
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print("\n" + "\n".join(report["tables"]["launch_compare"] or ["(no table from launch_compare)"]))
    print(
        "\n| run | exit | wall s | ST-GridPool scores | rank: device, peak MiB per GPU | NCCL |"
        "\n|---|---:|---:|---|---|---|"
    )
    scores = {
        "one_process_compare": "one/stgridpool",
        "launch_lmms_eval": "launch/stgridpool",
        "launch_compare": "launch_compare/stgridpool",
    }
    for name, r in report["runs"].items():
        where = "; ".join(
            f"rank {p.get('local_rank')}: cuda:{p.get('current_device')} {p.get('max_allocated_mib')} "
            f"{p.get('dist', {}).get('backend_config')}"
            for p in r["probes"]
            if p.get("local_rank") is not None or p.get("cuda_initialized")
        )
        print(
            f"| {name} | {r['returncode']} | {r['wall_s']} | {report['scores'][scores[name]]} | {where} | {r['nccl']} |"
        )
    print("\nchecks:")
    for k, v in checks.items():
        print(f"  {'PASS' if v else 'FAIL'}  {k}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
