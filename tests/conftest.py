"""Shared fixtures: tiny random checkpoints built offline, once per test session."""

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
