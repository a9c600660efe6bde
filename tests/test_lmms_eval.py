"""The `stgridpool` lmms-eval model, end to end on CPU: a local task (clips encoded here, multiple-choice questions)
run through `python -m lmms_eval` on a tiny checkpoint in both pooling modes, model_args overrides, and a
two-process data-parallel run. Skipped when lmms-eval (the `[eval]` extra) is not installed."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lmms_eval")
av = pytest.importorskip("av")
# One pytest-xdist worker for the whole file (`--dist loadgroup`): its module fixtures are built once, and the
# two-process test compares with the answers of the single-process run before it.
pytestmark = pytest.mark.xdist_group("lmms_eval")

from stgridpool.demo import save_tiny_stock_checkpoint  # noqa: E402

NUM_CLIPS = 4
TASK_UTILS = '''
"""Helpers of the test's local tasks."""


def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    options = " ".join(f"{letter}. {text}" for letter, text in zip("ABCD", doc["options"]))
    return f"{doc['question']} {options} answer"


def process_results(doc, results):
    return {"accuracy": float(results[0].strip()[:1] == doc["answer"])}
'''
GEN_TASK = """
task: stgp_tiny_gen
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
def encode_clip(path: Path, seed: int, num_frames: int = 12, size: int = 48, rate: int = 8) -> None:
    """A random-coloured MPEG-4 clip at `rate` frames a second, so each clip gives the model different pixels."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(num_frames):
            frame = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny stock checkpoint, 4 clips and a local multiple-choice task answered by generation."""
    root = tmp_path_factory.mktemp("lmms")
    checkpoint = save_tiny_stock_checkpoint(root / "tiny")
    docs = []
    for i in range(NUM_CLIPS):
        encode_clip(root / f"clip{i}.mp4", seed=i)
        docs.append({"video": str(root / f"clip{i}.mp4"), "question": "how many cat",
                     "options": ["one", "two", "three", "red"],
                     "answer": "ABCD"[i % 4], "answer_index": i % 4})
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(TASK_UTILS)
    (tasks / "stgp_tiny_gen.yaml").write_text(GEN_TASK.format(docs=root / "docs.jsonl"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(root / "hf_home"),
           "HF_DATASETS_CACHE": str(root / "datasets"), "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return {"root": root, "checkpoint": checkpoint, "tasks": tasks, "env": env}


def read_samples(run_dir: Path, task: str) -> dict:
    """doc_id -> logged sample of `task` from lmms-eval's --log_samples output under `run_dir`."""
    (path,) = run_dir.rglob(f"*_samples_{task}.jsonl")
    samples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {s["doc_id"]: s for s in samples}


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model

    from stgridpool.integrations.lmms_eval.lmms_model import STGridPoolLMM

    assert get_model("stgridpool") is STGridPoolLMM


def test_model_args_reach_model_and_processor(bench):
    from stgridpool.integrations.lmms_eval.lmms_model import STGridPoolLMM

    lm = STGridPoolLMM.create_from_arg_string(
        f"pretrained={bench['checkpoint']},device=cpu,max_frames_num=4,video_pooling_mode=stgridpool,"
        "pyramid_levels=[[2,2]],nsp_keep_ratio=1/9,nsp_partial_windows=ON,nsp_temperature=2,"
        "video_newline_position=frame"
    )
    config, processor = lm.model.config, lm.processor
    assert config.pyramid_levels == [[2, 2]]
    assert config.nsp_keep_ratio == pytest.approx(1 / 9) and processor.nsp_keep_ratio == pytest.approx(1 / 9)
    assert config.nsp_partial_windows is True and processor.nsp_partial_windows is True
    assert config.video_newline_position == processor.video_newline_position == "frame"
    assert config.nsp_temperature == 2
    # The processor's placeholder count is what the model makes: a forward pass on a decoded clip succeeds.
    inputs, _ = lm._inputs("what is this", [str(bench["root"] / "clip0.mp4")])
    assert inputs["pixel_values_videos"].shape[1] == 4
    num_placeholders = int((inputs["input_ids"] == config.video_token_index).sum())
    assert num_placeholders == processor.num_video_tokens(4) == 4 * (9 * 9 + 1)  # 1/9 keeps 3x3 windows, 27 -> 9
    lm.model(**inputs)  # the model raises on a placeholder-count mismatch
    # frame_sampling=authors: the 1.5 s clip (12 frames at 8 fps) gives frames 0 and 8, and the model takes T=2.
    authors = STGridPoolLMM.create_from_arg_string(
        f"pretrained={bench['checkpoint']},device=cpu,max_frames_num=4,frame_sampling=authors,nsp_keep_ratio=1/9"
    )
    inputs, _ = authors._inputs("what is this", [str(bench["root"] / "clip0.mp4")])
    assert inputs["pixel_values_videos"].shape[1] == 2
    assert int((inputs["input_ids"] == config.video_token_index).sum()) == authors.processor.num_video_tokens(2)
    authors.model(**inputs)


@pytest.mark.parametrize(
    "model_args, message",
    [
        ("video_pooling_mode=max", "video_pooling_mode='max' is invalid"),
        ("nsp_keep_ratio=0.3", "nsp_keep_ratio=0.3 is invalid"),
        ("pyramid_levels=[[4,2],[0,1]]", "pyramid_levels="),
        ("pyramid_levels=4x2", "model_args pyramid_levels='4x2' is invalid"),
        ("pooling=average", "model_args pooling='average' not understood"),
        ("max_frames_num=0", "model_args max_frames_num=0 is invalid"),
        ("prefetch=1.5", "model_args prefetch=1.5 is invalid"),
        ("frame_sampling=fps", "model_args frame_sampling='fps' is invalid"),
        ("sdpa_backend=fa2", "model_args sdpa_backend='fa2' is invalid: allowed are flash, efficient, cudnn, math"),
        ("dtype=fp8", "model_args dtype='fp8' is invalid"),
        ("batch_size=auto", "model_args batch_size='auto' is invalid"),
        ("trust_remote_code=maybe", "model_args trust_remote_code='maybe' is invalid: allowed are true/false, yes/no"),
        ("trust_remote_code=2", "model_args trust_remote_code=2 is invalid: allowed are true/false, yes/no"),
        ("nsp_partial_windows=enabled", "model_args nsp_partial_windows='enabled' is invalid: allowed are true/false"),
        # more frames than the context holds (65536 tokens, 27 x 27 -> 13 x 13 a frame + 1): (65536 - 1) // 169
        ("max_frames_num=100000", "model_args max_frames_num=100000 is invalid: allowed are integers 1 to 387 ("),
    ],
)
def test_bad_model_args_are_named(bench, model_args, message):
    from stgridpool.integrations.lmms_eval.lmms_model import STGridPoolLMM

    with pytest.raises(ValueError, match="allowed") as error:
        STGridPoolLMM.create_from_arg_string(f"pretrained={bench['checkpoint']},device=cpu,{model_args}")
    assert message in str(error.value)


def _requests(request_type: str, arguments: list[tuple]):
    from lmms_eval.api.instance import Instance

    metadata = {"task": "t", "doc_id": 0, "repeats": 1}
    return [Instance(request_type=request_type, arguments=args, idx=0, metadata=metadata) for args in arguments]


def test_loglikelihood_scores_choices_as_lmms_eval_expects(bench):
    """loglikelihood returns (summed NLL, is_greedy): the model's own greedy answer gets the lowest NLL and is the
    only one marked greedy (lmms-eval's multiple-choice scoring takes the argmin), and the pooling mode matters."""
    from stgridpool.integrations.lmms_eval.lmms_model import STGridPoolLMM

    docs = {"t": {"test": [{"video": str(bench["root"] / "clip1.mp4")}]}}
    to_visual = lambda doc: [doc["video"]]  # noqa: E731
    scores = {}
    for mode in ("bilinear", "stgridpool"):
        lm = STGridPoolLMM.create_from_arg_string(
            f"pretrained={bench['checkpoint']},device=cpu,max_frames_num=4,video_pooling_mode={mode}"
        )
        lm.task_dict = docs
        request = ("what color", {"max_new_tokens": 1}, to_visual, 0, "t", "test")
        (answer,) = lm.generate_until(_requests("generate_until", [request]))
        choices = [answer.strip()] + [w for w in ("red", "dog", "left", "two") if w != answer.strip()][:3]
        requests = [("what color", c, to_visual, 0, "t", "test") for c in choices]
        scores[mode] = lm.loglikelihood(_requests("loglikelihood", requests))
        nlls, greedy = zip(*scores[mode])
        assert all(nll > 0 for nll in nlls)
        assert int(np.argmin(nlls)) == 0 and greedy == (True, False, False, False), (choices, scores[mode])
    assert scores["bilinear"][1][0] != pytest.approx(scores["stgridpool"][1][0], rel=1e-6)


def test_cli_runs_both_modes_and_compare_prints_the_table(bench):
    """`stgridpool-compare` runs `python -m lmms_eval --model stgridpool` twice (bilinear, stgridpool) on the
    local task; each results file scores every document, in the mode asked for, and the table comes out."""
    out = bench["root"] / "compare"
    command = [
        sys.executable, "-m", "stgridpool.integrations.lmms_eval.compare", "--pretrained", str(bench["checkpoint"]),
        "--tasks", "stgp_tiny_gen", "--stock-mode", "bilinear", "--model-args", "device=cpu,max_frames_num=8",
        "--lmms-eval-args", f"--include_path {bench['tasks']} --log_samples --verbosity WARNING",
        "--output-dir", str(out),
    ]
    result = subprocess.run(command, env=bench["env"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    samples = {}
    for mode, run in (("bilinear", "stock"), ("stgridpool", "stgridpool")):
        (results_file,) = (out / run).rglob("*_results.json")
        results = json.loads(results_file.read_text())
        assert f"video_pooling_mode={mode}" in results["config"]["model_args"]
        assert 0 <= results["results"]["stgp_tiny_gen"]["accuracy,none"] <= 1
        assert results["n-samples"]["stgp_tiny_gen"]["effective"] == NUM_CLIPS
        samples[run] = read_samples(out / run, "stgp_tiny_gen")
        assert sorted(samples[run]) == list(range(NUM_CLIPS))
        assert all(isinstance(s["filtered_resps"], str) for s in samples[run].values())
    table = result.stdout[result.stdout.index("| Task |"):]
    accuracy = {run: json.loads(next((out / run).rglob("*_results.json")).read_text())["results"]
                ["stgp_tiny_gen"]["accuracy,none"] for run in samples}
    a, b = accuracy["stock"], accuracy["stgridpool"]
    # A task compare does not know: its score as lmms-eval reported it (here a fraction), marked, with a note.
    assert f"| stgp_tiny_gen | {a:.1f}* | {b:.1f}* | {b - a:+.1f}* |" in table
    assert "stgp_tiny_gen: metric scale unknown" in table
    bench["single_process_samples"] = samples["stgridpool"]  # reused by the two-process test


def test_two_processes_shard_documents_and_merge_results(bench):
    """Two processes on CPU (gloo): lmms-eval gives each half the documents and gathers every document's answer
    into one results file, equal to the single-process run's.

    Launched with torchrun, which `accelerate launch` uses for multi-GPU runs too: `accelerate launch --cpu
    --num_processes 2` starts a single process (multi-CPU needs MPI there). The model's Accelerator() picks the
    gloo group up from torchrun's environment exactly as it picks NCCL up under `accelerate launch` on GPUs.
    """
    if "single_process_samples" not in bench:
        pytest.skip("needs the single-process run of test_cli_runs_both_modes_and_compare_prints_the_table (in this "
                    "process: with pytest-xdist, pass --dist loadgroup)")
    out = bench["root"] / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
        "-m", "lmms_eval",
        "--model", "stgridpool", "--model_args",
        f"pretrained={bench['checkpoint']},max_frames_num=8,video_pooling_mode=stgridpool,device=cpu",
        "--tasks", "stgp_tiny_gen", "--include_path", str(bench["tasks"]), "--batch_size", "1",
        "--log_samples", "--output_path", str(out), "--verbosity", "INFO",
    ]
    result = subprocess.run(command, env=bench["env"], capture_output=True, text=True, timeout=600)
    log = (result.stdout + result.stderr).replace("\r", "\n")
    assert result.returncode == 0 and "Error during evaluation" not in log, log[-4000:]
    assert "Running on rank 1" in log
    # Rank 0 (the only one with a progress bar) answered its half of the documents, not all of them.
    assert "stgridpool generate: 100%" in log and f"| {NUM_CLIPS // 2}/{NUM_CLIPS // 2} [" in log, log[-4000:]
    merged = read_samples(out, "stgp_tiny_gen")
    assert sorted(merged) == list(range(NUM_CLIPS))
    single = bench["single_process_samples"]
    assert {i: s["filtered_resps"] for i, s in merged.items()} == {i: s["filtered_resps"] for i, s in single.items()}


def test_device_map_auto_loads_one_spread_copy(bench):
    """device_map=auto (one process, the model spread over the visible devices; here only the CPU) answers."""
    from stgridpool.integrations.lmms_eval.lmms_model import STGridPoolLMM

    lm = STGridPoolLMM.create_from_arg_string(f"pretrained={bench['checkpoint']},device_map=auto,max_frames_num=2")
    assert lm.world_size == 1 and lm.device == lm.model.device
    lm.task_dict = {"t": {"test": [{"video": str(bench["root"] / "clip2.mp4")}]}}
    request = ("what color", {"max_new_tokens": 2, "until": ["\n"]}, lambda doc: [doc["video"]], 0, "t", "test")
    (answer,) = lm.generate_until(_requests("generate_until", [request]))
    assert isinstance(answer, str) and answer


def test_remote_code_repo_is_loaded_with_trust_remote_code(bench, tmp_path):
    """A repo laid out like the converter's (the modules + auto_map) whose code differs from the installed code is
    refused by default, and loads through the Auto classes with trust_remote_code=true; the overrides still reach
    its model and processor."""
    import shutil

    from modeling_stgridpool_llava import STGridPoolLlavaOnevisionForConditionalGeneration
    from processing_stgridpool import STGridPoolProcessor
    from stgridpool.integrations.lmms_eval.lmms_model import STGridPoolLMM

    repo = tmp_path / "repo"
    STGridPoolLlavaOnevisionForConditionalGeneration.from_pretrained(bench["checkpoint"]).save_pretrained(repo)
    STGridPoolProcessor.from_pretrained(bench["checkpoint"]).save_pretrained(repo)
    from stgridpool import CODE_MODULES

    for module in CODE_MODULES:
        shutil.copy(Path(__file__).parents[1] / f"{module}.py", repo / f"{module}.py")
    with open(repo / "modeling_stgridpool_llava.py", "a") as handle:
        handle.write("\n# changed: no longer the installed copy\n")
    auto_maps = {
        "config.json": {"AutoConfig": "configuration_stgridpool.STGridPoolConfig",
                        "AutoModelForImageTextToText":
                            "modeling_stgridpool_llava.STGridPoolLlavaOnevisionForConditionalGeneration"},
        "processor_config.json": {"AutoProcessor": "processing_stgridpool.STGridPoolProcessor"},
    }
    for filename, auto_map in auto_maps.items():
        data = json.loads((repo / filename).read_text())
        (repo / filename).write_text(json.dumps({**data, "auto_map": auto_map}))

    args = f"pretrained={repo},device=cpu,max_frames_num=2,video_pooling_mode=average,video_newline_position=grid"
    for no in ("false", "no", "OFF", "0"):  # lmms-eval passes `no` as a string, `0` as an integer
        with pytest.raises(ValueError, match="trust_remote_code=true"):
            STGridPoolLMM.create_from_arg_string(f"{args},trust_remote_code={no}")
    with pytest.raises(ValueError, match="trust_remote_code=true"):
        STGridPoolLMM.create_from_arg_string(args)
    for yes in ("yes", "1"):  # lmms-eval passes `1` as an integer
        lm = STGridPoolLMM.create_from_arg_string(f"{args},trust_remote_code={yes}")
        assert type(lm.model).__module__.startswith("transformers_modules")  # the repo's code, not the installed one
        assert type(lm.processor).__module__.startswith("transformers_modules")
    assert lm.model.config.video_pooling_mode == lm.processor.video_pooling_mode == "average"
    assert lm.processor.video_newline_position == "grid"
    inputs, _ = lm._inputs("what is this", [str(bench["root"] / "clip3.mp4")])
    lm.model(**inputs)


def test_pretrained_hub_id_and_max_new_tokens(bench, offline_hub, hub_cache_dir):
    """pretrained=ORG/NAME from the offline Hub cache (main, or a commit) answers; a task's max_new_tokens above
    the model's context (or not an integer) is refused naming the task, before anything is generated."""
    from stgridpool.integrations.lmms_eval.lmms_model import STGridPoolLMM

    commit = (hub_cache_dir / f"models--{offline_hub['stock'].replace('/', '--')}" / "refs" / "main").read_text()
    for pretrained, revision in ((offline_hub["converted"], "main"), (offline_hub["stock"], commit)):
        args = f"pretrained={pretrained},revision={revision},device=cpu,max_frames_num=2"
        lm = STGridPoolLMM.create_from_arg_string(args)
        lm.task_dict = {"t": {"test": [{"video": str(bench["root"] / "clip2.mp4")}]}}
        request = ("what color", {"max_new_tokens": 2}, lambda doc: [doc["video"]], 0, "t", "test")
        (answer,) = lm.generate_until(_requests("generate_until", [request]))
        assert isinstance(answer, str) and answer, pretrained
    for bad in ("many", True, 2.5, 0, 65537, 10**12):
        request = ("what color", {"max_new_tokens": bad}, lambda doc: [doc["video"]], 0, "t", "test")
        with pytest.raises(ValueError, match=rf"task t: generation_kwargs max_new_tokens={bad!r} is invalid: allowed "
                                             r"are integers 1 to 65536 \(the model's context"):  # fmt: skip
            lm.generate_until(_requests("generate_until", [request]))


# --- The paper's tasks: lmms-eval 0.7.3's own configs, and this project's offline copies of them -------------------

PAPER_TASKS = ("videomme", "longvideobench_val_v", "egoschema", "egoschema_subset", "nextqa_mc_test",
               "tempcompass_multi_choice", "mvbench")
LMMS_EVAL_TASK_DIRS = ("videomme", "longvideobench", "egoschema", "nextqa", "tempcompass", "mvbench")


@pytest.fixture(scope="module")
def task_manager(bench):
    """lmms-eval's task manager over the paper's task folders and this project's offline folder, as `--tasks` sees
    them (only those folders are indexed: indexing all of lmms-eval's tasks takes half a minute)."""
    import lmms_eval.tasks
    from lmms_eval.tasks import TaskManager

    from stgridpool.integrations.lmms_eval.tasks import TASKS_DIR

    stock_dir = Path(lmms_eval.tasks.__file__).parent
    folders = [str(stock_dir / name) for name in LMMS_EVAL_TASK_DIRS] + [str(TASKS_DIR)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", bench["env"]["HF_HOME"])  # nextqa's and tempcompass's utils read it on import
        yield TaskManager(include_path=folders, include_defaults=False)


def paper_task_names(task_manager) -> list[str]:
    """The paper's tasks with mvbench expanded into its subtasks, as lmms-eval's group config lists them."""
    names = [t for t in PAPER_TASKS if t != "mvbench"]
    return names + list(task_manager._get_config("mvbench")["task"])


def test_paper_task_configs_load_offline_with_the_eval_extra(task_manager):
    """Every paper task's config loads in full (its utils imported: longvideobench's needs decord, which the `[eval]`
    extra installs), and so does each offline copy; compare's METRICS names each task's own headline metric."""
    from stgridpool.integrations.lmms_eval.compare import METRICS

    names = paper_task_names(task_manager)
    assert len(names) == len(PAPER_TASKS) - 1 + 20
    assert sorted(METRICS) == sorted(names)
    for name in names:
        config = task_manager._get_config(name)
        assert callable(config["doc_to_text"]) and callable(config["process_results"]), name
        assert config["metric_list"][0]["metric"] == METRICS[name][0], name
        local = task_manager._get_config(f"{name}_local")
        assert task_manager.task_index[f"{name}_local"]["type"] == "python_task"
        assert callable(local["doc_to_visual"])
        assert local["doc_to_visual"].__module__ == "stgridpool.integrations.lmms_eval.tasks.local"
    stock_group = task_manager._get_config("mvbench")["task"]
    assert task_manager._get_config("mvbench_local")["task"] == [f"{t}_local" for t in stock_group]


class JudgeStub:
    """A local stand-in for TempCompass's OpenAI judge (OPENAI_API_URL), which lmms-eval asks when an answer cannot
    be matched by rule; it answers "Incorrect" and counts the calls."""

    def __init__(self):
        import http.server
        import threading

        stub = self
        self.calls = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                stub.calls += 1
                self.rfile.read(int(self.headers["Content-Length"]))
                body = json.dumps({"choices": [{"message": {"content": "Incorrect"}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/chat/completions"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def save_docs(folder: Path, split: str, docs: list[dict], how: str) -> None:
    """Write `docs` as a local copy of one Hub dataset config, in one of the forms the offline tasks read."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    if how == "save_to_disk":
        datasets.DatasetDict({split: datasets.Dataset.from_list(docs)}).save_to_disk(str(folder))
    elif how == "parquet":
        datasets.Dataset.from_list(docs).to_parquet(str(folder / f"{split}.parquet"))
    elif how == "jsonl":
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    else:
        (folder / f"{split}.json").write_text(json.dumps(docs))


def mvbench_subtasks() -> list[str]:
    """The mvbench group's subtasks, as lmms-eval's group config lists them."""
    import lmms_eval.tasks
    from lmms_eval.utils import load_yaml_config

    group_yaml = Path(lmms_eval.tasks.__file__).parent / "mvbench" / "mvbench.yaml"
    return load_yaml_config(str(group_yaml), mode="simple")["task"]


SHORT_CLIP = dict(num_frames=20, rate=8)  # 2.5 s: one frame a second gives 3 frames
LONG_CLIP = dict(num_frames=48, rate=8)  # 6 s: 6 frames, more than max_frames_num=4


@pytest.fixture(scope="module")
def paper_copies(bench):
    """Local copies of every paper task, 2 documents each (1 per mvbench subtask), in each task's own schema (the
    fields its lmms-eval utils read), with clips encoded here and laid out as lmms-eval unpacks the videos.
    Returns {"root": $STGRIDPOOL_EVAL_DATA, "docs": {task: [doc, ...]}}; the correct answer of every doc is A."""
    from lmms_eval.tasks.mvbench.utils import DATA_LIST

    root = bench["root"] / "eval_data"
    clip_number = iter(range(1000))

    def clip(benchmark: str, relative: str, long: bool = False) -> None:
        path = root / benchmark / "cache" / relative
        encode_clip(path, seed=next(clip_number), **(LONG_CLIP if long else SHORT_CLIP))

    docs = {}
    docs["videomme"] = [
        {"videoID": f"vm{i}", "video_id": f"{i:03d}", "question_id": f"{i:03d}-1", "duration": "short",
         "domain": "Knowledge",
         "sub_category": "Humanity & History", "task_type": "Temporal Perception", "url": "", "question": "what is it",
         "options": ["A. a cat", "B. a dog", "C. a car", "D. a ball"], "answer": "A"} for i in range(2)]
    docs["longvideobench_val_v"] = [
        {"id": f"lvb{i}", "video_id": f"lvb{i}", "video_path": f"lvb{i}.mp4", "question": "what is it",
         "option0": "cat", "option1": "dog", "option2": "car", "option3": "ball", "option4": "N/A", "correct_choice": 0,
         "duration": 6.0, "duration_group": 15, "question_category": "S2E", "subtitle_path": "",
         "starting_timestamp_for_subtitles": 0.0}
        for i in range(2)]
    egoschema = [
        {"question_idx": f"q{i}", "video_idx": f"ego{i}", "question": "what did c do",
         "option": ["A. cook", "B. read", "C. walk", "D. sleep", "E. run"], "answer": "0"} for i in range(2)]
    docs["egoschema"], docs["egoschema_subset"] = egoschema, egoschema
    docs["nextqa_mc_test"] = [
        {"video": 4010069381 + i, "frame_count": 20, "width": 48, "height": 48, "question": "what is the dog doing",
         "answer": 0, "qid": i, "type": "CW", "a0": "running", "a1": "sitting", "a2": "eating", "a3": "sleeping",
         "a4": "barking"} for i in range(2)]
    docs["tempcompass_multi_choice"] = [
        {"video_id": f"tc{i}", "dim": dim, "question": "which way is it moving\nA. left\nB. right", "answer": "A. left"}
        for i, dim in enumerate(("direction", "speed"))]
    subtasks = [name.removeprefix("mvbench_") for name in mvbench_subtasks()]
    for sub in subtasks:
        docs[f"mvbench_{sub}"] = [{"video": f"{sub}.mp4", "question": "what happens",
                                   "candidates": ["it moves", "it stays"], "answer": "it moves"}]

    for i, doc in enumerate(docs["videomme"]):
        clip("videomme", f"data/{doc['videoID']}.mp4", long=i == 1)
    save_docs(root / "videomme", "test", docs["videomme"], "save_to_disk")
    for i, doc in enumerate(docs["longvideobench_val_v"]):
        clip("longvideobench", f"videos/{doc['video_path']}", long=i == 1)
    save_docs(root / "longvideobench", "validation", docs["longvideobench_val_v"], "jsonl")
    for doc in egoschema:
        clip("egoschema", f"videos/{doc['video_idx']}.mp4")
    save_docs(root / "egoschema" / "GENERATION", "test", [{**d, "answer": ""} for d in egoschema], "parquet")
    save_docs(root / "egoschema" / "Subset", "test", egoschema, "json")
    for doc in docs["nextqa_mc_test"]:
        clip("nextqa", f"NExTVideo/{doc['video']}.mp4")
    save_docs(root / "nextqa" / "MC", "test", docs["nextqa_mc_test"], "parquet")
    for doc in docs["tempcompass_multi_choice"]:
        clip("tempcompass", f"videos/{doc['video_id']}.mp4")
    save_docs(root / "tempcompass" / "multi-choice", "test", docs["tempcompass_multi_choice"], "jsonl")
    for sub in subtasks:
        clip("mvbench", f"{DATA_LIST[sub]}/{sub}.mp4")
        save_docs(root / "mvbench" / sub, "train", docs[f"mvbench_{sub}"], "jsonl")
    return {"root": root, "docs": docs}

def stock_prompt_kwargs(config: dict) -> dict:
    """The task's `lmms_eval_specific_kwargs` as lmms-eval resolves them for a model without a block of its own."""
    kwargs = dict(config.get("lmms_eval_specific_kwargs") or {})
    kwargs.update(kwargs.get("default", {}))
    return kwargs


def test_metric_scales_match_the_task_code(task_manager, paper_copies):
    """compare's METRICS factor turns each task's score for all-correct answers into exactly 100: the scale is read
    from lmms-eval's own process_results and aggregation, not assumed."""
    from lmms_eval.api.registry import get_aggregation

    from stgridpool.integrations.lmms_eval.compare import METRICS

    for name in paper_task_names(task_manager):
        if name == "egoschema":
            continue  # scored by the EgoSchema server (x 100 in lmms-eval's code): no local aggregation to run
        config = task_manager._get_config(name)
        metric = config["metric_list"][0]
        items = [config["process_results"](doc, ["A"])[metric["metric"]] for doc in paper_copies["docs"][name]]
        aggregate = metric["aggregation"]
        aggregate = get_aggregation(aggregate) if isinstance(aggregate, str) else aggregate
        score = aggregate(items, args=None) if "args" in inspect.signature(aggregate).parameters else aggregate(items)
        assert score * METRICS[name][1] == pytest.approx(100.0), name


def test_offline_paper_tasks_run_end_to_end(bench, paper_copies, task_manager):
    """One `python -m lmms_eval --model stgridpool` run over every offline paper task (mvbench: its 20 subtasks),
    frame_sampling=authors: every document answered, with lmms-eval's own prompt (the `default` block) and scoring;
    egoschema_local writes the submission file; compare reads the results with each metric's own scale."""
    from stgridpool.integrations.lmms_eval.compare import METRICS
    from stgridpool.integrations.lmms_eval.tasks import TASKS_DIR

    judge = JudgeStub()
    out = bench["root"] / "paper"
    local_tasks = [f"{t}_local" for t in PAPER_TASKS]
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "stgridpool", "--model_args",
        f"pretrained={bench['checkpoint']},device=cpu,max_frames_num=4,frame_sampling=authors,"
        "video_pooling_mode=stgridpool",
        "--tasks", ",".join(local_tasks), "--include_path", str(TASKS_DIR), "--batch_size", "1", "--log_samples",
        "--output_path", str(out), "--verbosity", "WARNING",
    ]
    env = {**bench["env"], "STGRIDPOOL_EVAL_DATA": str(paper_copies["root"]), "OPENAI_API_URL": judge.url,
           "OPENAI_API_KEY": "test"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0 and "Error during evaluation" not in log, log[-5000:]
    (results_file,) = out.rglob("*_results.json")
    results = json.loads(results_file.read_text())
    assert "frame_sampling=authors" in results["config"]["model_args"]

    for name in paper_task_names(task_manager):
        local, docs = f"{name}_local", paper_copies["docs"][name]
        assert results["n-samples"][local]["effective"] == len(docs), local
        samples = read_samples(out, local)
        assert sorted(samples) == list(range(len(docs))), local
        config = task_manager._get_config(name)
        for doc_id, doc in enumerate(docs):
            # The prompt is lmms-eval's own for this task (its default block), as in the authors' runs.
            assert samples[doc_id]["input"] == config["doc_to_text"](doc, stock_prompt_kwargs(config)), local
        value = results["results"][local][f"{METRICS[name][0]},none"]
        if name == "egoschema":
            assert value is None  # no score offline: the answers go to the submission file
        else:
            assert 0 <= value * METRICS[name][1] <= 100, (local, value)
    assert results["group_subtasks"]["mvbench_local"] == [f"{t}_local" for t in mvbench_subtasks()]

    tempcompass = read_samples(out, "tempcompass_multi_choice_local").values()
    assert judge.calls == sum(not sample["avg_accuracy"]["match_success"] for sample in tempcompass)

    (submission,) = out.rglob("submissions/inference_results_egoschema_MC_local_*.json")
    answers = json.loads(submission.read_text())
    assert sorted(answers) == ["ego0", "ego1"] and all(a in range(-1, 5) for a in answers.values())

    # compare, on this run's results file (as both runs): each row in percent, by its task's own scale.
    for run in ("stock", "stgridpool"):
        (bench["root"] / "paper_compare" / run).mkdir(parents=True)
        (bench["root"] / "paper_compare" / run / results_file.name).write_text(results_file.read_text())
    run_main = subprocess.run(
        [sys.executable, "-m", "stgridpool.integrations.lmms_eval.compare", "--no-run",
         "--tasks", ",".join(local_tasks), "--output-dir", str(bench["root"] / "paper_compare")],
        capture_output=True, text=True, env=bench["env"])
    assert run_main.returncode == 0, run_main.stderr
    for name in ("videomme", "longvideobench_val_v", "egoschema_subset", "nextqa_mc_test", "tempcompass_multi_choice"):
        percent = results["results"][f"{name}_local"][f"{METRICS[name][0]},none"] * METRICS[name][1]
        assert f"| {name}_local | {percent:.1f} | {percent:.1f} | +0.0 |" in run_main.stdout, run_main.stdout
    assert "| egoschema_local | n/a | n/a | n/a |" in run_main.stdout


@pytest.mark.parametrize("clip, expected", [(SHORT_CLIP, [0, 8, 16]), (LONG_CLIP, [0, 15, 31, 47])])
def test_authors_frame_sampling_takes_one_frame_a_second_capped_by_linspace(tmp_path, clip, expected):
    """frame_sampling=authors at max_frames_num=4 on 8 fps clips: 2.5 s -> frames 0, 8, 16 (one a second: fewer
    than 4, kept); 6 s -> one a second gives 6 > 4, so linspace(0, 47, 4) as ints. uniform always takes 4."""
    from stgridpool.integrations.lmms_eval.lmms_model import load_video
    from video_stgridpool import read_video_pyav

    path = tmp_path / "clip.mp4"
    encode_clip(path, seed=3, **clip)
    every_frame = read_video_pyav(path)[0]
    assert len(every_frame) == clip["num_frames"]
    np.testing.assert_array_equal(load_video(str(path), 4, "authors"), every_frame[expected])
    uniform = np.linspace(0, clip["num_frames"] - 1, 4, dtype=int)
    np.testing.assert_array_equal(load_video(str(path), 4, "uniform"), every_frame[uniform])


def test_uniform_sampling_takes_each_frame_at_most_once(tmp_path):
    """frame_sampling=uniform with max_frames_num above a clip's frame count (100 on 12 frames): each frame once,
    in order, not 100 frames with repeats; below it, lmms-eval's linspace as before."""
    from stgridpool.integrations.lmms_eval.lmms_model import load_video, uniform_indices
    from video_stgridpool import read_video_pyav

    path = tmp_path / "clip.mp4"
    encode_clip(path, seed=4, num_frames=12)
    np.testing.assert_array_equal(load_video(str(path), 100, "uniform"), read_video_pyav(path)[0])
    np.testing.assert_array_equal(uniform_indices(12, 100), np.arange(12))
    np.testing.assert_array_equal(uniform_indices(12, 12), np.arange(12))
    np.testing.assert_array_equal(uniform_indices(12, 5), [0, 2, 5, 8, 11])


def test_offline_tasks_name_what_is_missing(tmp_path, monkeypatch):
    """No $STGRIDPOOL_EVAL_DATA, no documents, a single Dataset instead of a DatasetDict, a missing video: each fails
    where it is found, naming the variable or the path and what is allowed."""
    import datasets

    from stgridpool.integrations.lmms_eval.tasks.local import local_dataset, videomme_doc_to_visual

    monkeypatch.delenv("STGRIDPOOL_EVAL_DATA", raising=False)
    with pytest.raises(ValueError, match=r"STGRIDPOOL_EVAL_DATA is not set"):
        videomme_doc_to_visual({"videoID": "v0"})
    monkeypatch.setenv("STGRIDPOOL_EVAL_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"videomme: no video .*/videomme/cache/data/v0\.mp4 or .*v0\.MP4 or"):
        videomme_doc_to_visual({"videoID": "v0"})
    with pytest.raises(FileNotFoundError, match=r"no documents: allowed are a save_to_disk DatasetDict .*test.parquet"):
        local_dataset(tmp_path, "test")
    datasets.Dataset.from_list([{"a": 1}]).save_to_disk(str(tmp_path / "single"))
    with pytest.raises(ValueError, match=r"holds a single Dataset: save the DatasetDict instead"):
        local_dataset(tmp_path / "single", "test")
    (tmp_path / "test.jsonl").write_text('{"a": 1}\n')
    assert local_dataset(tmp_path, "test") == ("json", {"data_files": {"test": str(tmp_path / "test.jsonl")}})


# ---------------------------------------------------------------------------------------------------------------
# Prefetching (issue 25): the next requests are decoded and processed while the model runs the current one
# ---------------------------------------------------------------------------------------------------------------


def test_prefetched_keeps_order_and_a_bounded_queue():
    """`prefetched` yields in order; preparation runs ahead of the consumer, but never more than `depth` items."""
    import threading
    import time

    from stgridpool.integrations.lmms_eval.lmms_model import prefetched

    for depth in (0, 1, 2, 3):
        lock, live, most, started = threading.Lock(), [0], [0], []

        def prepare(item):
            with lock:
                live[0] += 1
                most[0] = max(most[0], live[0])
                started.append(item)
            return item * item

        out = []
        for result in prefetched(prepare, range(12), depth):
            time.sleep(0.05)  # the model's turn: room for the preparers to run ahead as far as they may
            out.append(result)
            with lock:
                live[0] -= 1
        assert out == [i * i for i in range(12)] and sorted(started) == list(range(12))
        assert most[0] == depth + 1, (depth, most[0])


def test_prefetched_raises_at_the_failing_item_and_stops_preparing():
    from stgridpool.integrations.lmms_eval.lmms_model import prefetched

    started = []

    def prepare(item):
        started.append(item)
        if item == 2:
            raise ValueError("item 2 is bad")
        return item

    got = []
    with pytest.raises(ValueError, match="item 2 is bad"):
        for result in prefetched(prepare, range(100), 2):
            got.append(result)
    assert got == [0, 1] and max(started) <= 4


def lmms_requests(bench, n: int, request_type: str):
    """`n` requests over the test's clips, each context different (so the answers differ and order shows)."""
    to_visual = lambda doc: [doc["video"]]  # noqa: E731
    docs = {"t": {"test": [{"video": str(bench["root"] / f"clip{i % NUM_CLIPS}.mp4")} for i in range(n)]}}
    words = ["what", "color", "how many", "where", "who", "describe", "left", "right"]
    if request_type == "generate_until":
        args = [
            (f"{words[i % len(words)]} {i}", {"max_new_tokens": 4, "until": []}, to_visual, i, "t", "test")
            for i in range(n)
        ]
    else:
        args = [
            (f"{words[i % len(words)]} {i}", f" {words[(i + 3) % len(words)]}", to_visual, i, "t", "test")
            for i in range(n)
        ]
    return docs, _requests(request_type, args)


@pytest.fixture(scope="module")
def prefetch_lm(bench):
    from stgridpool.integrations.lmms_eval.lmms_model import STGridPoolLMM

    return STGridPoolLMM.create_from_arg_string(f"pretrained={bench['checkpoint']},device=cpu,max_frames_num=4")


def count_in_flight(monkeypatch, lm, request_type: str = "generate_until") -> dict:
    """Instrument the real reader and the real model (`generate`, or `forward` for scoring): `in_flight` counts the
    requests decoded whose model call has not ended (the one being answered included); `most` its largest value;
    `model_calls` the model calls ended; `seen` what each model call was given (token ids, pixel sum), in order."""
    import threading

    from stgridpool.integrations.lmms_eval import lmms_model

    state, lock = {"in_flight": 0, "most": 0, "model_calls": 0, "seen": []}, threading.Lock()
    read = lmms_model.load_video

    def counting_read(*args, **kwargs):
        frames = read(*args, **kwargs)
        with lock:
            state["in_flight"] += 1
            state["most"] = max(state["most"], state["in_flight"])
        return frames

    def counting(call):
        def wrapper(*args, **kwargs):
            state["seen"].append((kwargs["input_ids"].tolist(), float(kwargs["pixel_values_videos"].double().sum())))
            out = call(*args, **kwargs)
            with lock:
                state["in_flight"] -= 1
                state["model_calls"] += 1
            return out

        return wrapper

    method = "generate" if request_type == "generate_until" else "forward"
    monkeypatch.setattr(lmms_model, "load_video", counting_read)
    monkeypatch.setattr(lm.model, method, counting(getattr(lm.model, method)))
    return state


@pytest.mark.parametrize("request_type", ["generate_until", "loglikelihood"])
def test_prefetch_gives_the_sequential_answers_in_order_with_a_bounded_queue(
    bench, prefetch_lm, monkeypatch, request_type
):
    """prefetch=2 answers 9 requests exactly as prefetch=0 does, in the same order, with at most 3 requests decoded
    and not yet answered at any time (2 waiting and the one the model runs); the processor runs on the model's
    device (the CPU here)."""
    import torch

    from stgridpool.integrations.lmms_eval import lmms_model

    lm = prefetch_lm
    docs, requests = lmms_requests(bench, 9, request_type)
    lm.task_dict = docs
    run = getattr(lm, request_type)
    answers, most, seen = {}, {}, {}
    devices = []
    call = lmms_model.STGridPoolLMM._inputs

    def spy_inputs(self, *args, **kwargs):
        devices.append(self.processor_device)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(lmms_model.STGridPoolLMM, "_inputs", spy_inputs)
    for prefetch in (0, 2):
        with monkeypatch.context() as patch:
            state = count_in_flight(patch, lm, request_type)
            lm.prefetch = prefetch
            answers[prefetch] = run(requests)
            most[prefetch], seen[prefetch] = state["most"], state["seen"]
            assert state["model_calls"] == 9 and state["in_flight"] == 0
    assert answers[2] == answers[0], answers
    assert seen[2] == seen[0] and len({str(s) for s in seen[0]}) == 9  # the model got every request, in order
    assert most == {0: 1, 2: 3}, most
    assert devices == [torch.device("cpu")] * 18


def test_prefetch_error_surfaces_at_its_request(bench, prefetch_lm, monkeypatch, tmp_path):
    """A request whose video cannot be decoded raises its error when its turn comes: the requests before it are
    answered first (their model calls ran), even though it was decoded while the model ran the first one."""
    from video_stgridpool import VideoDecodeError

    lm = prefetch_lm
    docs, requests = lmms_requests(bench, 6, "generate_until")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 100)
    docs["t"]["test"][2]["video"] = str(bad)
    lm.task_dict, lm.prefetch = docs, 2
    state = count_in_flight(monkeypatch, lm)
    with pytest.raises(VideoDecodeError, match="bad.mp4"):
        lm.generate_until(requests)
    assert state["model_calls"] == 2


def test_sdpa_backend_holds_every_attention_call_to_one_kernel(bench):
    """sdpa_backend=math scores as PyTorch's own pick does, to float rounding; sdpa_backend=efficient (a CUDA-only
    kernel) finds no kernel on the CPU, in generation and in scoring: the setting reaches the model's attention."""
    from stgridpool.integrations.lmms_eval.lmms_model import STGridPoolLMM

    scores = {}
    for backend in (None, "math", "efficient"):
        args = f"pretrained={bench['checkpoint']},device=cpu,max_frames_num=4"
        lm = STGridPoolLMM.create_from_arg_string(args if backend is None else f"{args},sdpa_backend={backend}")
        assert lm.model.config.text_config._attn_implementation == "sdpa"
        for request_type in ("generate_until", "loglikelihood"):
            docs, requests = lmms_requests(bench, 2, request_type)
            lm.task_dict = docs
            if backend == "efficient":
                with pytest.raises(RuntimeError, match="No viable backend"):
                    getattr(lm, request_type)(requests)
            elif request_type == "loglikelihood":
                scores[backend] = [nll for nll, _ in lm.loglikelihood(requests)]
    assert scores["math"] == pytest.approx(scores[None], rel=1e-5)
