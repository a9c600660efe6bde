"""vLLM's side of the tests (child process): `LLM(model=...)` with the plugin, as a user runs it.

`python vllm_runner.py JOB.json OUT.json`. JOB: {"runs": [{"name", "repo", "llm": {extra LLM kwargs}, optional
"videos": [keys]}], "videos": .npz, "prompt", "max_new_tokens", "refusals": [{"name", "repo", "llm"}], "budgets":
[{"name", "repo", "llm"}]}. Each run answers every video of the .npz (or those keys) in ONE `generate` call (a batch
with different frame counts). OUT: {"runs": {name: {video key: {"prompt_token_ids", "token_ids", "logprobs"}}},
"refusals": {name: "ExceptionType: message"}, "budgets": {name: the encoder cache size, in tokens, vLLM's engine
would allocate (no engine is started)}, "plugin_log": [the plugin's log messages]}.
"""

import gc
import json
import logging
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
    videos = {key: videos[key] for key in run.get("videos", videos)}
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


def encoder_cache_size(budget: dict) -> int:
    """The encoder cache size (tokens) vLLM computes for `LLM(model=budget["repo"], ...)`, from the engine config
    alone: what bounds the largest video a request may carry."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.encoder_budget import MultiModalBudget
    from vllm.usage.usage_lib import UsageContext

    args = EngineArgs(model=budget["repo"], **{**LLM_DEFAULTS, **budget.get("llm", {})})
    config = args.create_engine_config(usage_context=UsageContext.LLM_CLASS)
    return MultiModalBudget(config, MULTIMODAL_REGISTRY).encoder_cache_size


def main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    plugin_log = []

    def keep(record: logging.LogRecord) -> bool:
        plugin_log.append(record.getMessage())
        return True

    # A filter, not a handler: each engine applies vLLM's logging configuration again, which drops the handlers of
    # vLLM's loggers (the plugin's is one), not their filters.
    logging.getLogger("vllm.stgridpool.integrations.vllm.model").addFilter(keep)
    out = {"runs": {}, "refusals": {}, "budgets": {}}
    for budget in job.get("budgets", []):
        out["budgets"][budget["name"]] = encoder_cache_size(budget)
    for run in job.get("runs", []):
        out["runs"][run["name"]] = answer(run, job)
        free_engine()
    for refusal in job.get("refusals", []):
        out["refusals"][refusal["name"]] = refusal_message(refusal)
        free_engine()
    out["plugin_log"] = plugin_log
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
