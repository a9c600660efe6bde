"""Our Transformers model's greedy generation, the reference the vLLM plugin must reproduce (child process).

`python hf_reference.py JOB.json OUT.json`. JOB: {"repos": {name: path}, "videos": .npz of uint8 [T, H, W, 3] arrays,
"prompt": text with one <video>, "max_new_tokens": n, optional "files": {name: [repo path, video path, sampling]}}
(sampling: read_video_pyav's {"num_frames": n} or {"fps": f}).
OUT: {name: {video key: {"prompt_token_ids", "token_ids", "logprobs", "text"}}}; "files" entries decode the file with
our processor (PyAV) and render the prompt with the repo's chat template, as `vllm serve` does.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch


def generate(model, processor, prompt: str, video: np.ndarray, max_new_tokens: int) -> dict:
    inputs = processor(text=prompt, videos=[video], return_tensors="pt")
    out = model.generate(
        **inputs, do_sample=False, max_new_tokens=max_new_tokens, output_logits=True, return_dict_in_generate=True
    )
    prompt_ids = inputs["input_ids"][0].tolist()
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    logprobs = [torch.log_softmax(step[0].double(), -1)[t].item() for step, t in zip(out.logits, tokens)]
    text = processor.tokenizer.decode(tokens, skip_special_tokens=True)
    return {"prompt_token_ids": prompt_ids, "token_ids": tokens, "logprobs": logprobs, "text": text}


def main(job_path: str, out_path: str) -> None:
    from modeling_stgridpool_llava import STGridPoolLlavaOnevisionForConditionalGeneration
    from processing_stgridpool import STGridPoolProcessor
    from video_stgridpool import read_video_pyav

    job = json.loads(Path(job_path).read_text())
    videos = dict(np.load(job["videos"])) if "videos" in job else {}
    torch.manual_seed(0)
    results, loaded = {}, {}

    def load(repo: str):
        if repo not in loaded:
            model = STGridPoolLlavaOnevisionForConditionalGeneration.from_pretrained(repo, dtype=torch.float32).eval()
            loaded[repo] = model, STGridPoolProcessor.from_pretrained(repo)
        return loaded[repo]

    for name, repo in job.get("repos", {}).items():
        model, processor = load(repo)
        results[name] = {
            key: generate(model, processor, job["prompt"], video, job["max_new_tokens"])
            for key, video in videos.items()
        }
    for name, (repo, path, sampling) in job.get("files", {}).items():
        model, processor = load(repo)
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": job["question"]}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        frames, _ = read_video_pyav(path, **sampling)
        results[name] = {"file": generate(model, processor, prompt, frames, job["max_new_tokens"])}
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
