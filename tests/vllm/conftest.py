"""Fixtures of the vLLM plugin tests (tests/vllm, run in the vLLM venv by .ci/vllm; skipped elsewhere).

Nothing here imports vLLM, so this conftest loads in the normal test run too.
"""

from pathlib import Path

import numpy as np
import pytest
from vllm_cases import (
    CASES,
    FRAME_COUNTS,
    MAX_NEW_TOKENS,
    PROMPT,
    WEIGHT_LAYOUTS,
    run_json,
    save_tiny_vllm_checkpoint,
    with_weight_layout,
)


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="session")
def stock_repo(work) -> Path:
    return save_tiny_vllm_checkpoint(work / "stock")


@pytest.fixture(scope="session")
def repos(work, stock_repo) -> dict:
    """name -> converted repo (CASES), plus "paper_<layout>": the paper repo in each other weight layout."""
    from stgridpool.convert.cli import main as convert

    out = {}
    for name, options in CASES.items():
        assert convert([str(stock_repo), str(work / name), *options]) == 0, name
        out[name] = work / name
    for layout in WEIGHT_LAYOUTS:
        out[f"paper_{layout}"] = with_weight_layout(out["paper"], work / f"paper_{layout}", layout)
    return out


@pytest.fixture(scope="session")
def videos(work) -> Path:
    """Decoded videos (uint8 [T, 48, 64, 3], T in FRAME_COUNTS) in an .npz both sides read."""
    rng = np.random.default_rng(0)
    path = work / "videos.npz"
    np.savez(
        path, **{f"v{i}": rng.integers(0, 256, (t, 48, 64, 3), dtype=np.uint8) for i, t in enumerate(FRAME_COUNTS)}
    )
    return path


@pytest.fixture(scope="session")
def hf_reference(work, repos, videos) -> dict:
    """Our Transformers model's greedy tokens and logprobs for each case and video, from one child process."""
    job = {
        "repos": {name: str(repos[name]) for name in ("paper", "nsp9_grid", "bilinear_frame", "average_none")},
        "videos": str(videos),
        "prompt": PROMPT,
        "max_new_tokens": MAX_NEW_TOKENS,
    }
    return run_json("hf_reference.py", job, work)
