"""The `stgridpool` lmms-eval model, end to end on CPU: a local task (clips encoded here, multiple-choice questions)
run through `python -m lmms_eval` on a tiny checkpoint in both pooling modes, model_args overrides, and a
two-process data-parallel run. Skipped when lmms-eval (the `[eval]` extra) is not installed."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lmms_eval")
av = pytest.importorskip("av")

from stgridpool.tiny import save_tiny_stock_checkpoint  # noqa: E402

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
def encode_clip(path: Path, seed: int, num_frames: int = 12, size: int = 48) -> None:
    """A short random-coloured MPEG-4 clip, so each clip gives the model different pixels."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
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
        docs.append({"video": str(root / f"clip{i}.mp4"), "question": "how many cat", "options": ["one", "two", "three", "red"],
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

    from stgridpool_eval.lmms_model import STGridPoolLMM

    assert get_model("stgridpool") is STGridPoolLMM


def test_model_args_reach_model_and_processor(bench):
    from stgridpool_eval.lmms_model import STGridPoolLMM

    lm = STGridPoolLMM.create_from_arg_string(
        f"pretrained={bench['checkpoint']},device=cpu,max_frames_num=4,video_pooling_mode=stgridpool,"
        "pyramid_levels=[[2,2]],nsp_keep_ratio=1/9,nsp_partial_windows=true,nsp_temperature=2,video_newline_position=frame"
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


@pytest.mark.parametrize(
    "model_args, message",
    [
        ("video_pooling_mode=max", "video_pooling_mode='max' is invalid"),
        ("nsp_keep_ratio=0.3", "nsp_keep_ratio=0.3 is invalid"),
        ("pyramid_levels=[[4,2],[0,1]]", "pyramid_levels="),
        ("pyramid_levels=4x2", "model_args pyramid_levels='4x2' is invalid"),
        ("pooling=average", "model_args pooling='average' not understood"),
        ("max_frames_num=0", "model_args max_frames_num=0 is invalid"),
        ("dtype=fp8", "model_args dtype='fp8' is invalid"),
        ("batch_size=auto", "model_args batch_size='auto' is invalid"),
    ],
)
def test_bad_model_args_are_named(bench, model_args, message):
    from stgridpool_eval.lmms_model import STGridPoolLMM

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
    from stgridpool_eval.lmms_model import STGridPoolLMM

    docs = {"t": {"test": [{"video": str(bench["root"] / "clip1.mp4")}]}}
    to_visual = lambda doc: [doc["video"]]  # noqa: E731
    scores = {}
    for mode in ("bilinear", "stgridpool"):
        lm = STGridPoolLMM.create_from_arg_string(f"pretrained={bench['checkpoint']},device=cpu,max_frames_num=4,video_pooling_mode={mode}")
        lm.task_dict = docs
        (answer,) = lm.generate_until(_requests("generate_until", [("what color", {"max_new_tokens": 1}, to_visual, 0, "t", "test")]))
        choices = [answer.strip()] + [w for w in ("red", "dog", "left", "two") if w != answer.strip()][:3]
        scores[mode] = lm.loglikelihood(_requests("loglikelihood", [("what color", c, to_visual, 0, "t", "test") for c in choices]))
        nlls, greedy = zip(*scores[mode])
        assert all(nll > 0 for nll in nlls)
        assert int(np.argmin(nlls)) == 0 and greedy == (True, False, False, False), (choices, scores[mode])
    assert scores["bilinear"][1][0] != pytest.approx(scores["stgridpool"][1][0], rel=1e-6)


def test_cli_runs_both_modes_and_compare_prints_the_table(bench):
    """`stgridpool_eval.compare` runs `python -m lmms_eval --model stgridpool` twice (bilinear, stgridpool) on the
    local task; each results file scores every document, in the mode asked for, and the table comes out."""
    out = bench["root"] / "compare"
    command = [
        sys.executable, "-m", "stgridpool_eval.compare", "--pretrained", str(bench["checkpoint"]),
        "--tasks", "stgp_tiny_gen", "--stock-mode", "bilinear", "--model-args", "device=cpu,max_frames_num=8",
        "--lmms-eval-args", f"--include_path {bench['tasks']} --log_samples --verbosity WARNING", "--output-dir", str(out),
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
    accuracy = {run: 100 * json.loads(next((out / run).rglob("*_results.json")).read_text())["results"]["stgp_tiny_gen"]["accuracy,none"] for run in samples}
    assert f"| stgp_tiny_gen | {accuracy['stock']:.1f} | {accuracy['stgridpool']:.1f} | {accuracy['stgridpool'] - accuracy['stock']:+.1f} |" in table
    bench["single_process_samples"] = samples["stgridpool"]  # reused by the two-process test


def test_two_processes_shard_documents_and_merge_results(bench):
    """Two processes on CPU (gloo): lmms-eval gives each half the documents and gathers every document's answer
    into one results file, equal to the single-process run's.

    Launched with torchrun, which `accelerate launch` uses for multi-GPU runs too: `accelerate launch --cpu
    --num_processes 2` starts a single process (multi-CPU needs MPI there). The model's Accelerator() picks the
    gloo group up from torchrun's environment exactly as it picks NCCL up under `accelerate launch` on GPUs.
    """
    if "single_process_samples" not in bench:
        pytest.skip("needs the single-process run of test_cli_runs_both_modes_and_compare_prints_the_table")
    out = bench["root"] / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "-m", "lmms_eval",
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
    from stgridpool_eval.lmms_model import STGridPoolLMM

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

    from stgridpool_eval.lmms_model import STGridPoolLMM

    repo = tmp_path / "repo"
    STGridPoolLlavaOnevisionForConditionalGeneration.from_pretrained(bench["checkpoint"]).save_pretrained(repo)
    STGridPoolProcessor.from_pretrained(bench["checkpoint"]).save_pretrained(repo)
    for module in ("configuration_stgridpool.py", "modeling_stgridpool_llava.py", "processing_stgridpool.py"):
        shutil.copy(Path(__file__).parents[1] / module, repo / module)
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
    with pytest.raises(ValueError, match="trust_remote_code=true"):
        STGridPoolLMM.create_from_arg_string(args)
    lm = STGridPoolLMM.create_from_arg_string(args + ",trust_remote_code=true")
    assert type(lm.model).__module__.startswith("transformers_modules")  # the repo's code, not the installed one
    assert type(lm.processor).__module__.startswith("transformers_modules")
    assert lm.model.config.video_pooling_mode == lm.processor.video_pooling_mode == "average"
    assert lm.processor.video_newline_position == "grid"
    inputs, _ = lm._inputs("what is this", [str(bench["root"] / "clip3.mp4")])
    lm.model(**inputs)
