"""Shared by the vLLM plugin tests: the cases, tiny checkpoints vLLM's CPU build can run, child-process runner.

Nothing here imports vLLM: vLLM runs in child processes (`vllm_runner.py`), and so does the Transformers reference
(`hf_reference.py`), since vLLM patches Transformers classes in its own process. (A module of its own, not the
conftest: tests/conftest.py is also imported as `conftest`.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROMPT = "<|im_start|>user\n<video>\nwhat is happening in this video ?<|im_end|>\n<|im_start|>assistant\n"
MAX_NEW_TOKENS = 6
# Frame counts of the two videos every case runs as one batch: the paper pyramid grids 16 frames at two levels and
# 7 frames at none; the pyramid 2:1,4:2 grids them at two levels and one.
FRAME_COUNTS = (16, 7)
# name -> converter options. Together: all three modes, all four newline positions, two NSP geometries
# (13 x 13 and, with padding and partial windows, 10 x 10 per frame), a custom pyramid, temperature and norm p.
CASES = {
    "paper": [],
    "nsp9_grid": [
        "--keep-ratio", "1/9", "--padding", "1", "--partial-windows", "--temperature", "0.5", "--norm-p", "1",
        "--pyramid-levels", "2:1,4:2", "--newline-position", "grid",
    ],
    "bilinear_frame": ["--video-pooling-mode", "bilinear", "--newline-position", "frame"],
    "average_none": ["--video-pooling-mode", "average", "--newline-position", "none"],
    "unprofilable": ["--keep-ratio", "1", "--newline-position", "grid"],  # 27 x 28 = 756 tokens a frame
}  # fmt: skip


def child_env(tmp: Path) -> dict:
    """Environment of the vLLM and reference processes: offline, CPU settings that keep vLLM's start-up short."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp / "hf_home"),
        "HF_MODULES_CACHE": str(tmp / "hf_modules"),
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


def run_json(script: str, job: dict, tmp: Path, timeout: int = 600) -> dict:
    """Run tests/vllm/`script` on `job` (JSON file) in a child process; return the JSON it writes."""
    job_file, out_file = tmp / f"{script}-{os.getpid()}-job.json", tmp / f"{script}-{os.getpid()}-out.json"
    job_file.write_text(json.dumps(job))
    out_file.unlink(missing_ok=True)
    done = subprocess.run(
        [sys.executable, str(HERE / script), str(job_file), str(out_file)],
        check=False, cwd=tmp, env=child_env(tmp), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if done.returncode != 0 or not out_file.exists():
        raise AssertionError(f"{script} failed (exit {done.returncode}):\n{done.stderr[-6000:]}")
    return json.loads(out_file.read_text())


def save_tiny_vllm_checkpoint(path: Path, seed: int = 0, num_frames: int = 8) -> Path:
    """stgridpool.demo's stock checkpoint, widened to heads of 32 dims (vLLM's CPU attention needs >= 32); its video
    processor samples `num_frames` frames."""
    import torch
    from transformers import GenerationConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from stgridpool.demo import build_tiny_processor, build_tiny_tokenizer, tiny_config_kwargs

    tokenizer = build_tiny_tokenizer()
    kwargs = tiny_config_kwargs(tokenizer)
    kwargs["text_config"].update(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
    kwargs["vision_config"].update(hidden_size=64, intermediate_size=128, num_attention_heads=2)
    config = LlavaOnevisionConfig(**kwargs)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():  # a random image_newline (stock init leaves it near zero): newline positions then matter
        model.model.image_newline.normal_()
    model.generation_config = GenerationConfig(
        eos_token_id=config.text_config.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_new_tokens=8
    )
    model.save_pretrained(path)
    build_tiny_processor(tokenizer, num_frames=num_frames).save_pretrained(path)
    return path


def save_tiny_text_checkpoint(path: Path) -> Path:
    """A tiny Qwen2 text-only model: a repo that is not ST-GridPool."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from stgridpool.demo import build_tiny_tokenizer, tiny_config_kwargs

    tokenizer = build_tiny_tokenizer()
    text = tiny_config_kwargs(tokenizer)["text_config"]
    text.update(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
    text.pop("model_type")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**text)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# Weight-name layouts of llava-onevision checkpoints, besides the one Transformers 5.x writes (5.17 and 5.19 alike:
# `vision_tower.embeddings...`, `language_model.model...`): (prefix it writes, prefix in the other layout).
WEIGHT_LAYOUTS = {
    # llava-hf Hub repos (Transformers 4.x)
    "hub": (("vision_tower.", "vision_tower.vision_model."),),
    # Transformers 4.52 .. 4.x
    "model_prefix": (
        ("vision_tower.", "model.vision_tower.vision_model."),
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("image_newline", "model.image_newline"),
    ),
}


def with_weight_layout(repo: Path, dst: Path, layout: str) -> Path:
    """A copy of `repo` whose weights are named as in `WEIGHT_LAYOUTS[layout]`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(repo, dst)
    weights = load_file(repo / "model.safetensors")

    def rename(key: str) -> str:
        for ours, theirs in WEIGHT_LAYOUTS[layout]:
            if key.startswith(ours):
                return theirs + key[len(ours) :]
        return key

    renamed = {rename(key): value for key, value in weights.items()}
    assert len(renamed) == len(weights) and renamed.keys() != weights.keys()
    save_file(renamed, dst / "model.safetensors", metadata={"format": "pt"})
    return dst
