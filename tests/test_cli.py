"""The `stgridpool` console script, offline: through `main` in this process (no Transformers import per run), and
as `python -m stgridpool` in a subprocess where the process itself matters (the embedded default's first run, the
exact stderr of a refusal, a repo's own code running only when trusted)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import copy_repo, evil_repo, gray_frames, index_gray_level, write_clip
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# One pytest-xdist worker for the whole file (`--dist loadgroup`): the embedded default (`cache`) is built once.
pytestmark = pytest.mark.xdist_group("cli")


def cli_env(tmp_path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def run_cli(args, env, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "stgridpool", *args], env=env, capture_output=True, text=True, timeout=300, **kwargs
    )


def run_in_process(args, capsys) -> subprocess.CompletedProcess:
    """`stgridpool ARGS` through `main` in this process: exit code and what it printed, as from a process."""
    capsys.readouterr()
    code = run_main(args)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


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


def test_ask_with_models_by_folder_and_hub_id(cache, tiny_stock_dir, converted_dir, offline_hub, tmp_path, capsys):
    """Every kind of --model, as a folder and as a Hub id resolved from the offline Hub cache: the embedded
    default's folder (saved with the ST-GridPool classes), a stock checkpoint and a converted repo."""
    tmp, _ = cache
    clip = write_clip(tmp_path / "clip.webm", gray_frames([index_gray_level(i) for i in range(20)]))
    models = [tmp / "cache" / "demo-v1" / "model", tiny_stock_dir, converted_dir, *offline_hub.values()]
    # the question's "<video>" and "<|im_end|>" are text: still 1353 placeholders, and the answer comes
    for model in models:
        question = "how is the <video> tag used<|im_end|>?"
        result = run_in_process(
            ["ask", str(clip), question, "--model", str(model), "--num-frames", "8", "--max-new-tokens", "3"], capsys
        )
        assert result.returncode == 0, (model, result.stderr)
        assert "RANDOM" not in result.stderr
        assert "sampled 8 frames" in result.stderr
        assert "visual tokens: 1353 with stgridpool (stock pooling: 1569" in result.stderr  # 8*169+1, 8*196+1


def test_hub_id_in_a_process_without_a_terminal(cache, offline_hub, tmp_path, capsys):
    """`stgridpool ask --model ORG/NAME` as a real process with no terminal (stdin not a TTY), and `visualize`
    with a Hub id."""
    tmp, _ = cache
    sample = str(tmp / "cache" / "demo-v1" / "sample.mp4")
    args = ["ask", sample, "--model", offline_hub["stock"], "--num-frames", "4", "--max-new-tokens", "2"]
    result = run_cli(args, cli_env(tmp_path), stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "sampled 4 frames" in result.stderr and "visual tokens: 677 with stgridpool" in result.stderr
    out = tmp_path / "vis.png"
    args = ["visualize", sample, "-o", str(out), "--model", offline_hub["converted"], "--num-frames", "4"]
    result = run_in_process(args, capsys)
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size[0] > 0


def test_visualize_png(cache, tmp_path, capsys):
    tmp, _ = cache
    out = tmp_path / "vis.png"
    result = run_in_process(
        ["visualize", "--cache-dir", str(tmp / "cache"), "-o", str(out), "--num-frames", "16"], capsys
    )
    assert result.returncode == 0, result.stderr
    picture = np.asarray(Image.open(out).convert("RGB"))
    # the same figure, drawn in-process, gives the panel layout
    sys.path.insert(0, str(ROOT))
    from stgridpool.loading import load_model_and_processor, resolve_model
    from stgridpool.visualize import visualize_video
    from video_stgridpool import read_video_pyav

    model, processor = load_model_and_processor(resolve_model(str(tmp / "cache" / "demo-v1" / "model")))
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
    from test_video_stgridpool import bad_inputs

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
    """Every bad input in-process through `main` (fast), and two of them as real processes: nothing else on stderr
    (no FFmpeg log line, no warning)."""
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
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("text", "num_frames_zero")
    }
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        check_error(name, cases[name][0], cases[name][1], process.returncode, stderr)


# ---------------------------------------------------------------------------------------------------------------
# Hardening (issue 12) and the trust rule (issue 11): every unusable --model and bad option is one line, exit 2
# ---------------------------------------------------------------------------------------------------------------


def run_main(args) -> int:
    """`stgridpool ARGS` in-process; argparse's exits become return codes."""
    from stgridpool.cli import main

    try:
        return main(args)
    except SystemExit as exit:
        return exit.code


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("[stgridpool]")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[-1]


def replace_file(path: Path, text: str) -> None:
    path.unlink()  # a hard-linked copy: never write through to the original
    path.write_text(text)


def test_changed_code_runs_only_when_trusted(cache, converted_dir, tmp_path, capsys):
    """A repo whose modeling file was changed is refused without --trust-remote-code, and its code does not run
    (it would write a marker file); with the flag it loads through its own code (the marker appears)."""
    from stgridpool.loading import resolve_model

    assert resolve_model(str(converted_dir)).remote_code is False  # identical code: the installed classes
    tmp, _ = cache
    repo = copy_repo(converted_dir, tmp_path / "changed")
    marker = tmp_path / "marker.txt"
    modeling = (converted_dir / "modeling_stgridpool_llava.py").read_text()
    replace_file(repo / "modeling_stgridpool_llava.py", modeling + f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    args = [
        "ask",
        str(tmp / "cache" / "demo-v1" / "sample.mp4"),
        "--model",
        str(repo),
        "--num-frames",
        "4",
        "--max-new-tokens",
        "2",
    ]
    refused = run_in_process(args, capsys)  # refused before any of the repo's code is imported
    assert refused.returncode == 2, refused.stderr
    line = one_line(refused.stderr)
    assert line.startswith(f"stgridpool: error: --model {repo}: ") and "modeling_stgridpool_llava.py" in line
    assert "--trust-remote-code" in line
    assert not marker.exists(), "the repo's changed code ran without --trust-remote-code"
    trusted = run_cli([*args, "--trust-remote-code"], cli_env(tmp_path))
    assert trusted.returncode == 0, trusted.stderr
    assert marker.read_text() == "ran"  # the repo's own code is what ran


def run_in_terminal(args, env, typed: str) -> tuple[int, str]:
    """`stgridpool ARGS` in a child process whose stdin, stdout and stderr are a pseudo-terminal with `typed`
    already typed into it (what a user at a prompt would answer): (exit code, everything the terminal showed)."""
    import pty
    import select

    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "stgridpool", *args], env=env, stdin=terminal, stdout=terminal, stderr=terminal
    )
    os.close(terminal)
    os.write(controller, typed.encode())
    shown = b""
    while select.select([controller], [], [], 300)[0]:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    return process.wait(timeout=60), shown.decode(errors="replace")


def test_foreign_code_on_a_terminal_answering_yes(cache, tiny_stock_dir, tmp_path):
    """On a terminal where every prompt would be answered y (`yes | stgridpool ...`), a repo whose
    processor_config.json names its own code inside the `video_processor` entry is refused with our one line:
    Transformers never asks, and the repo's code never runs."""
    tmp, _ = cache
    marker = tmp_path / "marker"
    repo = evil_repo(tiny_stock_dir, tmp_path / "evil", marker, "video_processor")
    sample = str(tmp / "cache" / "demo-v1" / "sample.mp4")
    args = ["ask", sample, "--model", str(repo), "--num-frames", "2", "--max-new-tokens", "1"]
    code, shown = run_in_terminal(args, cli_env(tmp_path), typed="y\n" * 20)
    assert "Do you wish to run the custom code" not in shown and not marker.exists(), shown
    lines = [line for line in shown.splitlines() if line.strip() not in ("", "y")]
    assert code == 2 and len(lines) == 1, shown
    assert lines[0].startswith(f"stgridpool: error: --model {repo}: processor_config.json names code evil.py"), shown
    assert lines[0].endswith("pass --trust-remote-code if you trust it"), shown


def test_unusable_models_exit_2_with_one_line(cache, tmp_path, capsys):
    """The loader's refusals (tests/test_loading.py has every case) reach the user as one line, exit 2."""
    tmp, _ = cache
    sample = tmp / "cache" / "demo-v1" / "sample.mp4"
    repo = copy_repo(tmp / "cache" / "demo-v1" / "model", tmp_path / "no-weights")
    (repo / "model.safetensors").unlink()
    for model, words in ((repo, "it has no weights"), (tmp_path / "nowhere", "no such folder")):
        code = run_main(["ask", str(sample), "--model", str(model), "--cache-dir", str(tmp / "cache")])
        line = one_line(capsys.readouterr().err)
        assert code == 2 and line.startswith(f"stgridpool: error: --model {model}: ") and words in line, line


def test_bad_options_exit_2_with_one_line(cache, tmp_path, capsys, monkeypatch):
    """Each bad option is refused in one line, exit 2, before any model loads."""
    import torch

    import stgridpool.loading

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(stgridpool.loading, "load_model", must_not_load)
    tmp, _ = cache
    sample = str(tmp / "cache" / "demo-v1" / "sample.mp4")
    common = ["--cache-dir", str(tmp / "cache")]
    (tmp_path / "folder.png").mkdir()
    cases = [
        (["ask", sample, "--max-new-tokens", "0"], "--max-new-tokens '0' is invalid"),
        (["ask", sample, "--max-new-tokens=-1"], "--max-new-tokens '-1' is invalid"),
        # above the model's context (the embedded default's max_position_embeddings): it could generate forever
        (["ask", sample, "--max-new-tokens", "99999999999999999999999"],
         "--max-new-tokens 99999999999999999999999 is invalid: allowed are integers 1 to 65536 (the context of"),
        (["ask", sample, "--max-new-tokens", "65537"], "--max-new-tokens 65537 is invalid: allowed are integers 1 to"),
        (["ask", sample, "--device", "foo"], "--device 'foo' is invalid"),
        (
            ["ask", sample, "--device", "cuda:7"] if torch.cuda.device_count() < 8 else None,
            "--device 'cuda:7' is invalid",
        ),
        (["ask", sample, "--device", "cuda"] if not torch.cuda.is_available() else None, "no cuda device"),
        (["ask", ""], "VIDEO '' is invalid"),
        (["ask", sample, "--attn-implementation", "flash"], "--attn-implementation: invalid choice: 'flash'"),
        (["visualize", sample, "-o", str(tmp_path / "v.png"), "--thumb", "0"], "--thumb '0' is invalid"),
        (["visualize", sample, "-o", str(tmp_path / "v.png"), "--thumb=-5"], "--thumb '-5' is invalid"),
        (["visualize", sample, "-o", str(tmp_path / "folder.png")], "is a folder"),
        (["visualize", sample, "-o", str(tmp_path / "out.txt")], ".txt is not an image format"),
        (["visualize", sample, "-o", str(tmp_path / "out")], "no extension"),
        (["visualize", sample, "-o", str(tmp_path / "missing" / "v.png")], "does not exist"),
        (["ask", sample, "--cache-dir", str(tmp_path / "folder.png" / "..")], None),  # placeholder, replaced below
    ]
    cache_file = tmp_path / "cache-file"
    cache_file.write_text("not a folder")
    cases[-1] = (["ask", sample, "--cache-dir", str(cache_file)], "--cache-dir")
    for args, words in cases:
        if args is None:
            continue
        extra = common if "--cache-dir" not in args else []
        code = run_main([*args, *extra])
        line = one_line(capsys.readouterr().err)
        assert code == 2 and words in line, (args, line)
    assert not (tmp_path / "v.png").exists()


def test_whole_video_is_decoded_before_the_model_loads(cache, tmp_path, capsys, monkeypatch):
    """A video damaged after its first frames is refused before any model is loaded."""
    from test_video_stgridpool import bad_inputs

    import stgridpool.loading

    tmp, _ = cache
    truncated, words = bad_inputs(tmp_path)["truncated_mkv"]

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the video was checked")

    monkeypatch.setattr(stgridpool.loading, "load_model", must_not_load)
    code = run_main(["ask", str(truncated), "--cache-dir", str(tmp / "cache")])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and words in line and str(truncated) in line, line


def test_unexpected_errors_are_one_line_unless_debug(cache, capsys, monkeypatch):
    import stgridpool.cli

    tmp, _ = cache

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(stgridpool.cli, "decode", boom)
    args = ["ask", "--cache-dir", str(tmp / "cache")]
    assert run_main(args) == 1
    line = one_line(capsys.readouterr().err)
    assert "RuntimeError: boom" in line and "--debug" in line
    with pytest.raises(RuntimeError, match="boom"):
        run_main([*args, "--debug"])


def test_embedded_default_is_rebuilt_when_damaged(tmp_path):
    """Weights deleted, and a build folder left by a killed build: the next run rebuilds and cleans up."""
    from stgridpool.demo import ensure_demo

    cache_dir = tmp_path / "cache"
    model_dir, clip = ensure_demo(cache_dir)
    (model_dir / "model.safetensors").unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = cache_dir / f".build-{int(dead.stdout)}-abc"
    stale.mkdir()
    assert ensure_demo(cache_dir) == (model_dir, clip)
    assert (model_dir / "model.safetensors").is_file()
    assert sorted(p.name for p in cache_dir.iterdir()) == ["demo-v1"]


def test_question_text_is_never_a_placeholder(tiny_stock_dir):
    """`<video>`, `<image>` and `<|im_end|>` in the question are text: the only placeholders are the template's
    one video, expanded to the model's count, and the question's tokens are those of plain text."""
    import numpy as np

    from processing_stgridpool import STGridPoolProcessor
    from stgridpool.prompt import video_question_inputs

    processor = STGridPoolProcessor.from_pretrained(tiny_stock_dir)
    tokenizer = processor.tokenizer
    frames = np.zeros((4, 54, 54, 3), np.uint8)
    special = {
        name: tokenizer.convert_tokens_to_ids(name) for name in ("<video>", "<image>", "<|im_end|>", "<|im_start|>")
    }

    def counts(question):
        ids = video_question_inputs(processor, frames, question, do_sample_frames=False)["input_ids"][0].tolist()
        return ids, {name: ids.count(token) for name, token in special.items()}

    plain_ids, plain = counts("what is the tag used in")
    ids, hostile = counts("what is the <video> tag used in <image> <|im_end|> <|im_start|>")
    assert hostile == plain and plain["<video>"] == processor.num_video_tokens(4) and plain["<image>"] == 0
    assert len(ids) > len(plain_ids)  # the markup is there, as text tokens
    # and the template around the question is what the stock path makes for a plain question
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what is the tag used in"}]}],
        add_generation_prompt=True,
    )
    stock = processor(text=prompt, videos=[frames], do_sample_frames=False, return_tensors="pt")["input_ids"][
        0
    ].tolist()
    assert plain_ids == stock


# ---------------------------------------------------------------------------------------------------------------
# GPU speed (issue 25): the processors run where the model is on a GPU; --attn-implementation
# ---------------------------------------------------------------------------------------------------------------


def test_processor_device_is_the_models_gpu_else_the_cpu(tiny_stock_dir):
    """The choice reads only `model.device`: a CUDA device (any index) is kept, anything else gives the CPU."""
    import types

    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    from stgridpool.prompt import processor_device

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_stock_dir)
    assert processor_device(model) == torch.device("cpu")
    for device, expected in (("cuda:1", "cuda:1"), ("cuda", "cuda"), ("meta", "cpu"), ("mps", "cpu")):
        assert processor_device(types.SimpleNamespace(device=torch.device(device))) == torch.device(expected)


def test_processor_device_cpu_gives_the_default_inputs(tiny_stock_dir):
    """`device="cpu"` passed explicitly (what a CPU model gets) changes nothing: the same pixels, images too."""
    import torch
    from PIL import Image

    from processing_stgridpool import STGridPoolProcessor
    from stgridpool.prompt import video_question_inputs

    processor = STGridPoolProcessor.from_pretrained(tiny_stock_dir)
    frames = np.random.default_rng(0).integers(0, 256, (4, 72, 128, 3), dtype=np.uint8)
    plain = video_question_inputs(processor, frames, "what", do_sample_frames=False)
    on_cpu = video_question_inputs(processor, frames, "what", do_sample_frames=False, device=torch.device("cpu"))
    assert plain.keys() == on_cpu.keys()
    assert all(torch.equal(plain[key], on_cpu[key]) for key in plain)
    image = Image.fromarray(frames[0])
    plain, on_cpu = (
        processor(text="<image> what", images=[image], return_tensors="pt", **kw) for kw in ({}, {"device": "cpu"})
    )
    assert torch.equal(plain["pixel_values"], on_cpu["pixel_values"])


def spy_video_device(monkeypatch) -> list:
    """The `device` every fast video processor call prepares its frames on (the real method still runs)."""
    from transformers.video_processing_utils import BaseVideoProcessor

    seen, prepare = [], BaseVideoProcessor._prepare_input_videos

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("device"))
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(BaseVideoProcessor, "_prepare_input_videos", spy)
    return seen


def test_attn_implementation_reaches_the_model_and_eager_answers_as_sdpa(cache, capsys, monkeypatch):
    """`--attn-implementation eager` and `sdpa` load the model with that attention and give the same greedy answer;
    the video processor is told the model's device (the CPU here)."""
    import torch

    import stgridpool.loading

    tmp, _ = cache
    loaded, load_model = [], stgridpool.loading.load_model

    def recording_load_model(*args, **kwargs):
        model = load_model(*args, **kwargs)
        loaded.append(model.config._attn_implementation)
        return model

    monkeypatch.setattr(stgridpool.loading, "load_model", recording_load_model)
    devices = spy_video_device(monkeypatch)
    answers = {}
    for name in ("eager", "sdpa"):
        args = ["ask", "--cache-dir", str(tmp / "cache"), "--num-frames", "4", "--max-new-tokens", "5"]
        result = run_in_process([*args, "--attn-implementation", name], capsys)
        assert result.returncode == 0, result.stderr
        answers[name] = result.stdout.strip()
    assert loaded == ["eager", "sdpa"]
    assert answers["eager"] == answers["sdpa"] != ""
    assert devices == [torch.device("cpu")] * 2
