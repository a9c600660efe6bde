"""The `stgridpool` console script, run as `python -m stgridpool` in a subprocess, offline."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stgridpool.clips import gray_frames, index_gray_level, write_clip

ROOT = Path(__file__).resolve().parents[1]


def cli_env(tmp_path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def run_cli(args, env, **kwargs):
    return subprocess.run([sys.executable, "-m", "stgridpool", *args], env=env, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The embedded default, built once by the CLI itself into a tmp cache dir."""
    tmp = tmp_path_factory.mktemp("cli")
    result = run_cli(["ask", "--cache-dir", str(tmp / "cache"), "--max-new-tokens", "4"], cli_env(tmp))
    return tmp, result


def test_ask_embedded_default(cache):
    tmp, result = cache
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stderr and "--model" in result.stderr
    # 32 frames of the sample clip: 32 * 13 * 13 + 1 with ST-GridPool vs 32 * 14 * 14 + 1 stock
    assert "visual tokens: 5409 with stgridpool (stock pooling: 6273" in result.stderr
    assert "decode" in result.stderr and "vision" in result.stderr and "generate" in result.stderr
    assert (tmp / "cache" / "demo-v1" / "model" / "config.json").is_file()
    assert (tmp / "cache" / "demo-v1" / "sample.mp4").is_file()


def test_ask_with_model_dirs_and_a_video(cache, tmp_path):
    tmp, _ = cache
    clip = write_clip(tmp_path / "clip.webm", gray_frames([index_gray_level(i) for i in range(20)]))
    stgridpool_dir = tmp / "cache" / "demo-v1" / "model"  # saved with the ST-GridPool classes
    from stgridpool.tiny import save_tiny_stock_checkpoint

    stock_dir = save_tiny_stock_checkpoint(tmp_path / "stock")
    converted_dir = tmp_path / "converted"  # a Hub-style repo: loads through the Auto classes and remote code
    convert = subprocess.run([sys.executable, "-m", "convert", str(stock_dir), str(converted_dir)],
                             env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert convert.returncode == 0, convert.stderr
    for model in (stgridpool_dir, stock_dir, converted_dir):
        result = run_cli(
            ["ask", str(clip), "what is happening?", "--model", str(model), "--num-frames", "8", "--max-new-tokens", "3"],
            cli_env(tmp_path),
        )
        assert result.returncode == 0, result.stderr
        assert "RANDOM" not in result.stderr
        assert "sampled 8 frames" in result.stderr
        assert "visual tokens: 1353 with stgridpool (stock pooling: 1569" in result.stderr  # 8*169+1, 8*196+1


def test_visualize_png(cache, tmp_path):
    tmp, _ = cache
    out = tmp_path / "vis.png"
    result = run_cli(["visualize", "--cache-dir", str(tmp / "cache"), "-o", str(out), "--num-frames", "16"], cli_env(tmp_path))
    assert result.returncode == 0, result.stderr
    picture = np.asarray(Image.open(out).convert("RGB"))
    # the same figure, drawn in-process, gives the panel layout
    sys.path.insert(0, str(ROOT))
    from processing_stgridpool import read_video_pyav
    from stgridpool.cli import load
    from stgridpool.visualize import visualize_video

    model, processor = load(str(tmp / "cache" / "demo-v1" / "model"), "cpu", __import__("torch").float32, None)
    frames, metadata = read_video_pyav(tmp / "cache" / "demo-v1" / "sample.mp4", num_frames=16)
    image, layout = visualize_video(model, processor, frames, metadata.frames_indices, title="t")
    assert picture.shape[:2] == (image.size[1], image.size[0]) == (layout["size"][1], layout["size"][0])
    assert len(layout["panels"]) == 16

    def crop(box):
        left, top, right, bottom = box
        return picture[top + 3 : bottom - 3, left + 3 : right - 3].astype(int)

    # 16 frames, pyramid (4,2),(4,4),(4,8): only level (4,2) writes, a summary at frame 7 (of 1,3,5,7) and 15
    for t, panel in enumerate(layout["panels"]):
        difference = np.abs(crop(panel["sampled"]) - crop(panel["ptg"])).mean()
        if t in (7, 15):
            assert difference > 10, t  # a mosaic, not the frame
        else:
            assert difference < 1, t  # PTG left it alone
        assert np.abs(crop(panel["nsp"]) - crop(panel["ptg"])).mean() > 5  # the heat map is drawn over it


def bad_cases(tmp_path, sample) -> dict:
    """name -> (CLI arguments after `ask`, words the one-line error must contain)."""
    from test_video import bad_inputs

    cases = {name: ([str(path)], words) for name, (path, words) in bad_inputs(tmp_path).items()}
    cases["num_frames_zero"] = ([str(sample), "--num-frames", "0"], "--num-frames '0' is invalid")
    cases["num_frames_negative"] = ([str(sample), "--num-frames=-2"], "--num-frames '-2' is invalid")
    return cases


def check_error(name, args, words, returncode, stderr):
    assert returncode == 2, (name, stderr)
    assert "Traceback" not in stderr and words in stderr, (name, stderr)
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("[stgridpool]")]
    if name.startswith("num_frames"):  # argparse: its usage line, then the error
        assert lines[-1].startswith("stgridpool ask: error: "), (name, stderr)
    else:
        assert lines == [lines[0]] and lines[0].startswith("stgridpool: error: " + args[0] + ": "), (name, stderr)


def test_bad_inputs_exit_2_with_one_line(tmp_path, cache, capsys):
    """Every bad input in-process through `main` (fast), and three of them as real processes."""
    tmp, _ = cache
    from stgridpool.cli import main

    cases = bad_cases(tmp_path, tmp / "cache" / "demo-v1" / "sample.mp4")
    for name, (args, words) in cases.items():
        try:
            returncode = main(["ask", *args, "--cache-dir", str(tmp / "cache")])
        except SystemExit as exit:  # argparse
            returncode = exit.code
        check_error(name, args, words, returncode, capsys.readouterr().err)
    env = cli_env(tmp_path)
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "stgridpool", "ask", *cases[name][0], "--cache-dir", str(tmp / "cache")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name in ("missing", "text", "num_frames_zero")
    }
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        check_error(name, cases[name][0], cases[name][1], process.returncode, stderr)
