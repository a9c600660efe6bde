"""Shared fixtures: tiny random checkpoints built offline, once per test session."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the project's modules, when the project is not installed
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GOLDEN = ROOT / "tests" / "data" / "stgridpool_cases.safetensors"


@pytest.fixture(scope="session")
def tiny_stock_dir(tmp_path_factory) -> Path:
    """A tiny random stock LLaVA-OneVision checkpoint + processor (27 x 27 tokens a frame): a stand-in for
    llava-hf/llava-onevision-qwen2-0.5b-ov-hf."""
    from stgridpool.demo import save_tiny_stock_checkpoint

    return save_tiny_stock_checkpoint(tmp_path_factory.mktemp("tiny_stock"))
