"""CI keeps benchmarks/bench_decode.py working: its smoke mode generates tiny clips, runs the readers and writes
JSON. No timing is asserted: the frames of the seeking reader must equal the old sequential reader's."""

import json

from benchmarks import bench_decode


def test_bench_decode_smoke(tmp_path):
    out = tmp_path / "decode.json"
    assert bench_decode.main(["--smoke", "--clips-dir", str(tmp_path / "clips"), "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert not results["errors"]
    assert set(results["clips"]) == set(bench_decode.SMOKE_CLIPS)
    for name, row in results["clips"].items():
        ours = row["readers"]["ours"]
        assert ours["same_indices_as_old"] and ours["bit_identical_to_sequential_decode"], name
        assert ours["shape"][0] == bench_decode.SMOKE_CLIPS[name]["num_frames"]
        for reader in bench_decode.INDEX_READERS:  # frame counts
            assert row["readers"][reader]["indices"] == bench_decode.SMOKE_CLIPS[name]["seconds"] * bench_decode.RATE
    assert sorted(p.suffix for p in (tmp_path / "clips").iterdir()) == [".mp4", ".webm"]
