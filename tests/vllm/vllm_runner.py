"""vLLM's side of the tests (child process): `LLM(model=...)` with the plugin, as a user runs it.

`python vllm_runner.py JOB.json OUT.json`. JOB: {"runs": [{"name", "repo", "llm": {extra LLM kwargs}}], "videos": .npz,
"prompt", "max_new_tokens", "refusals": [{"name", "repo", "llm"}]}. Each run answers every video of the .npz in ONE
`generate` call (a batch with different frame counts). OUT: {"runs": {name: {video key: {"prompt_token_ids",
"token_ids", "logprobs"}}}, "refusals": {name: "ExceptionType: message"}}.
"""

import gc
import json
import sys
from pathlib import Path

import numpy as np

# The settings that keep vLLM's CPU start-up near 30 s (with VLLM_ENABLE_V1_MULTIPROCESSING=0, set by the test).
LLM_DEFAULTS = {
    "dtype": "float32",
    "max_model_len": 4096,
    "max_num_seqs": 2,
    "enforce_eager": True,
    "distributed_executor_backend": "uni",
    "limit_mm_per_prompt": {"image": 0, "video": 1},
    "seed": 0,
}


def make_llm(repo: str, extra: dict):
    from vllm import LLM

    return LLM(model=repo, **{**LLM_DEFAULTS, **extra})


def free_engine() -> None:
    """After the last reference to an LLM is gone: tear down its process groups so the next LLM can start here."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()


def answer(run: dict, job: dict) -> dict:
    """One engine for `run`, one `generate` call for every video of the job; the engine is gone on return."""
    from vllm import SamplingParams

    videos = dict(np.load(job["videos"]))
    llm = make_llm(run["repo"], run.get("llm", {}))
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"], logprobs=0)
    requests = [{"prompt": job["prompt"], "multi_modal_data": {"video": video}} for video in videos.values()]
    results = {}
    for key, output in zip(videos, llm.generate(requests, params, use_tqdm=False)):
        completion = output.outputs[0]
        results[key] = {
            "prompt_token_ids": list(output.prompt_token_ids),
            "token_ids": list(completion.token_ids),
            "logprobs": [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids)],
        }
    return results


def refusal_message(refusal: dict) -> str:
    """The error starting an engine for `refusal` gives (its innermost cause), or "loaded"."""
    try:
        make_llm(refusal["repo"], refusal.get("llm", {}))
    except Exception as error:  # noqa: BLE001  any failure is the answer
        while error.__cause__ is not None and str(error.__cause__):
            error = error.__cause__
        return f"{type(error).__name__}: {error}"
    return "loaded"


def main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    out = {"runs": {}, "refusals": {}}
    for run in job.get("runs", []):
        out["runs"][run["name"]] = answer(run, job)
        free_engine()
    for refusal in job.get("refusals", []):
        out["refusals"][refusal["name"]] = refusal_message(refusal)
        free_engine()
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
