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
