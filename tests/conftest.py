"""Shared fixtures: tiny random checkpoints built offline, once per test session, as folders and as Hub ids in a
populated offline Hub cache."""

import contextlib
import io
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the project's modules, when the project is not installed
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GOLDEN = ROOT / "tests" / "data" / "stgridpool_cases.safetensors"


def random_features(shape, seed, dtype=torch.float64) -> torch.Tensor:
    """Random projected features of one video [T, H, W, D], each token scaled by its own factor in [0.5, 3.5] (varied
    norms: a non-flat NSP softmax)."""
    gen = torch.Generator().manual_seed(seed)
    scale = 0.5 + 3 * torch.rand(*shape[:3], 1, generator=gen, dtype=torch.float64)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


@pytest.fixture(scope="session")
def tiny_stock_dir(tmp_path_factory) -> Path:
    """A tiny random stock LLaVA-OneVision checkpoint + processor (27 x 27 tokens a frame): a stand-in for
    llava-hf/llava-onevision-qwen2-0.5b-ov-hf."""
    from stgridpool.demo import save_tiny_stock_checkpoint

    return save_tiny_stock_checkpoint(tmp_path_factory.mktemp("tiny_stock"))


# The Hub ids of `hub_cache`: a user's `--model ORG/NAME`, resolved from the cache offline.
HUB_IDS = {"stock": "tiny-org/llava-onevision-tiny", "converted": "tiny-org/stgridpool-tiny"}


@pytest.fixture(scope="session")
def converted_dir(tiny_stock_dir, tmp_path_factory) -> Path:
    """`tiny_stock_dir` converted by `stgridpool-convert` (defaults): an ST-GridPool repo carrying this project's code
    byte for byte."""
    from stgridpool.convert.cli import main

    dst = tmp_path_factory.mktemp("converted") / "repo"
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert main([str(tiny_stock_dir), str(dst)]) == 0, err.getvalue()
    return dst


@pytest.fixture(scope="session")
def hub_cache_dir(tiny_stock_dir, converted_dir, tmp_path_factory) -> Path:
    """A Hub cache (HF_HUB_CACHE layout) holding `tiny_stock_dir` and `converted_dir` under `HUB_IDS`, at main."""
    from helpers import add_to_hub_cache

    cache = tmp_path_factory.mktemp("hub_cache")
    add_to_hub_cache(cache, HUB_IDS["stock"], tiny_stock_dir)
    add_to_hub_cache(cache, HUB_IDS["converted"], converted_dir)
    return cache


@pytest.fixture
def offline_hub(hub_cache_dir, monkeypatch) -> dict:
    """`hub_cache_dir` as this test's Hub cache (this process and its children), offline; returns `HUB_IDS`."""
    from helpers import use_hub_cache

    use_hub_cache(monkeypatch, hub_cache_dir)
    return HUB_IDS
