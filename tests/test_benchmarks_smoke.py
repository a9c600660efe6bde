"""CI keeps the benchmark script working: its smoke mode (tiny shapes, CPU) runs and writes JSON. No timing is
asserted."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def test_bench_smoke(tmp_path):
    from benchmarks import bench_pooling

    out = tmp_path / "bench.json"
    assert bench_pooling.main(["--smoke", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert not results["errors"]
    assert len(results["rows"]) == 2
    for row in results["rows"]:
        assert row["err_stgridpool_vs_f64"] < 1e-5
        assert row["bilinear_bit_identical"] and row["input_unchanged"]
        assert {"copy", "stock_apply_pooling", "ours_stgridpool", "plain", "reference"} <= set(row["ms"])


def test_bench_file_to_answer_smoke(tmp_path):
    """benchmarks/bench_file_to_answer.py on a tiny model and tiny clips: every path runs (the overlapped one to the
    same first token as ours), the lmms-eval model gives the same answers with and without prefetching, and eager
    attention the same tokens as sdpa."""
    import pytest

    pytest.importorskip("lmms_eval")
    from benchmarks import bench_file_to_answer as bench

    out = tmp_path / "fta.json"
    args = ["--smoke", "--work", str(tmp_path / "work"), "--json", str(out), "--reps", "1", "--attn", "sdpa,eager",
            "--sdpa-backend", "math"]
    assert bench.main(args) == 0
    results = json.loads(out.read_text())
    assert results["sdpa_backend"] == "math"
    assert results["sections"] == ["ftft", "eval", "attn"] and results["processor_device"] == "cpu"
    assert results["attn_implementation"] == "sdpa"  # --attn's first, for the ftft and eval models
    frames = bench.SMOKE["frames"]
    paths = ("ours", "ours_cpu_processor", "ours_overlap", "stock")
    shapes = {name: results["ftft"][name]["frames_shape"] for name in paths}
    assert all(shape[0] == frames for shape in shapes.values()), shapes
    assert results["ftft"]["ours"]["prompt_tokens"] < results["ftft"]["stock"]["prompt_tokens"]  # pooled video
    overlap = results["ftft"]["ours_overlap"]
    assert overlap["prompt_tokens"] == results["ftft"]["ours"]["prompt_tokens"] and overlap["same_token_as_ours"]
    assert results["ftft"]["processor_gpu_vs_cpu"]["max_abs_diff"] == 0.0  # both on the CPU here
    for kind in ("generate_until", "loglikelihood"):
        row = results["eval"][kind]
        assert row["answers_identical"] and row["distinct_answers"] > 1, row
        assert row["requests_differing_from_first_sequential_round"] == {"prefetch_0": [[]], "prefetch_2": [[]]}
        assert len(row["prefetch_2"]["answers"]) == len(bench.SMOKE["eval_seconds"])
    eager = results["attn"]["eager"]
    assert eager["text_attn"] == eager["vision_attn"] == "eager" and results["attn"]["sdpa"]["text_attn"] == "sdpa"
    assert eager["same_tokens_as_sdpa"] and eager["first_logits_max_abs_diff_vs_sdpa"] < 1e-4
    assert eager["padded_batch_vs_alone_max_abs_diff"] < 1e-4


def test_decode_repro_smoke(tmp_path):
    """benchmarks/decode_repro.py on a tiny model: on the CPU every run repeats the first bit for bit, and a value
    changed in one bit is found where it was changed."""
    import pytest
    import torch

    pytest.importorskip("lmms_eval")  # it decodes with the lmms-eval model's load_video
    from benchmarks import decode_repro

    out = tmp_path / "repro.json"
    args = ["--smoke", "--work", str(tmp_path), "--runs", "2", "--new-tokens", "3", "--variants", "sdpa,eager"]
    assert decode_repro.main([*args, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for name in ("sdpa", "eager"):
        variant = report["variants"][name]
        assert variant["same_bits_every_run"] and variant["same_tokens_every_run"] and len(variant["runs"]) == 2
        assert variant["runs"][1]["same_pixels"] and variant["runs"][1]["first_departure"] is None
    assert report["variants"]["sdpa"]["same_as_first_variant_run_0"]

    value = torch.randn(64, dtype=torch.bfloat16)
    changed = value.clone()
    changed.view(torch.int16)[7] += 1  # the next bf16 value, one element
    records = [(0, "a", "out", decode_repro.fingerprint(value), value)]
    departure = decode_repro.first_departure(records, [(0, "a", "out", decode_repro.fingerprint(changed), changed)])
    assert departure["module"] == "a" and departure["elements_differing"] == 1
    assert decode_repro.first_departure(records, records) is None
