"""The processor side of the newest-Transformers issue (11), the hardening items of the video reader and processor
(12: 10, 12, 13, 25, 26) and the settings object in the processor (17). Clips are encoded here with PyAV."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import gray_frames, index_gray_level, write_clip

from configuration_stgridpool import VideoPoolingSettings
from processing_stgridpool import STGridPoolProcessor, STGridPoolVideoProcessor
from video_stgridpool import VideoDecodeError, read_video_pyav

ROOT = Path(__file__).resolve().parents[1]
LEVELS = [index_gray_level(i) for i in range(30)]
CODE_MODULES = ("configuration_stgridpool.py", "processing_stgridpool.py", "video_stgridpool.py")


def gray_indices(pixel_values) -> list[int]:
    """Frame indices encoded in the gray levels of processed frames [T, 3, H, W] (normalised by CLIP mean/std)."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    red = pixel_values[:, 0].float().mean((1, 2)).numpy() * OPENAI_CLIP_STD[0] + OPENAI_CLIP_MEAN[0]
    return [round((float(level) * 255 - 4) / 8) for level in red]


@pytest.fixture(scope="module")
def processor(tiny_stock_dir):
    return STGridPoolProcessor.from_pretrained(tiny_stock_dir)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", gray_frames(LEVELS), rate=25)  # 1.2 s


# ---------------------------------------------------------------------------------------------------------------
# Issue 11: frame sampling by fps, num_frames and fps together, save/load of the video processor
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fps", [1, 4, 5, 12.5])
def test_fps_sampling_matches_stock_for_files_and_arrays(processor, clip, fps):
    from transformers import LlavaOnevisionVideoProcessor
    from transformers.video_utils import VideoMetadata

    stock = LlavaOnevisionVideoProcessor(size={"height": 54, "width": 54})
    metadata = VideoMetadata(total_num_frames=30, fps=25.0, duration=1.2)
    expected = [int(i) for i in stock.sample_frames(metadata, fps=fps)]
    video_processor = processor.video_processor
    assert video_processor.num_frames == 8  # stored in the tiny checkpoint: must not collide with fps
    # a file, through the video processor and through the processor's __call__
    out = video_processor(videos=[str(clip)], do_sample_frames=True, fps=fps, return_tensors="pt", return_metadata=True)
    assert list(out["video_metadata"][0].frames_indices) == expected
    assert gray_indices(out["pixel_values_videos"][0]) == expected
    inputs = processor(text="<video>", videos=[str(clip)], do_sample_frames=True, fps=fps, return_tensors="pt")
    assert gray_indices(inputs["pixel_values_videos"][0]) == expected
    # arrays with their frame rate: stock's indices, and stock's own pixels
    arrays = dict(
        videos=[gray_frames(LEVELS)],
        video_metadata=[{"fps": 25.0, "total_num_frames": 30}],
        do_sample_frames=True,
        fps=fps,
        return_tensors="pt",
    )
    ours = video_processor(**arrays)
    assert ours["pixel_values_videos"].shape[1] == len(expected)
    assert gray_indices(ours["pixel_values_videos"][0]) == expected
    if len(expected) > 1:  # stock 5.17 cannot process a one-frame sample of an array (it drops the frame axis)
        theirs = stock(**arrays)
        assert (ours["pixel_values_videos"] == theirs["pixel_values_videos"]).all()


def test_num_frames_sampling_of_arrays_matches_stock(processor):
    from transformers import LlavaOnevisionVideoProcessor

    stock = LlavaOnevisionVideoProcessor(size={"height": 54, "width": 54})
    frames = gray_frames(LEVELS)
    for num_frames in (None, 3, 7):  # None: the stored 8 (stock has no default: given explicitly)
        ours = processor.video_processor(
            videos=[frames], do_sample_frames=True, num_frames=num_frames, return_tensors="pt"
        )
        theirs = stock(videos=[frames], do_sample_frames=True, num_frames=num_frames or 8, return_tensors="pt")
        assert (ours["pixel_values_videos"] == theirs["pixel_values_videos"]).all()


def test_num_frames_and_fps_refused_only_when_both_passed(processor, clip):
    with pytest.raises(ValueError, match=r"num_frames=4 and fps=2 were both given"):
        processor.video_processor(videos=[str(clip)], do_sample_frames=True, num_frames=4, fps=2)
    with pytest.raises(ValueError, match=r"num_frames=4 and fps=2 were both given"):
        processor(text="<video>", videos=[gray_frames(LEVELS)], do_sample_frames=True, num_frames=4, fps=2)
    # a stored fps gives way to a num_frames passed in the call, as a stored num_frames does to fps
    video_processor = STGridPoolVideoProcessor(size={"height": 54, "width": 54}, fps=5)
    video_processor.num_frames = None  # (None at construction means the default, 32; stored both, num_frames wins)
    out = video_processor(videos=[str(clip)], do_sample_frames=True, num_frames=3, return_tensors="pt")
    assert gray_indices(out["pixel_values_videos"][0]) == [0, 10, 20]
    out = video_processor(videos=[str(clip)], do_sample_frames=True, return_tensors="pt")
    assert gray_indices(out["pixel_values_videos"][0]) == [0, 5, 10, 15, 20, 25]  # the stored fps


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"num_frames": 0}, "num_frames=0 is invalid"),
        ({"num_frames": -3}, "num_frames=-3 is invalid"),
        ({"num_frames": 2.5}, "num_frames=2.5 is invalid"),
        ({"num_frames": None, "fps": float("inf")}, "fps=inf is invalid"),
        ({"num_frames": None, "fps": 0}, "fps=0 is invalid"),
    ],
)
def test_bad_num_frames_or_fps_fail_at_construction(kwargs, words):
    with pytest.raises(ValueError, match=words):
        STGridPoolVideoProcessor(**kwargs)


def test_save_load_keeps_the_class_and_stock_still_loads(processor, tmp_path):
    from transformers import AutoVideoProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())["video_processor"]
    assert saved["video_processor_type"] == "LlavaOnevisionVideoProcessor"
    assert saved["auto_map"] == {"AutoVideoProcessor": "processing_stgridpool.STGridPoolVideoProcessor"}
    # without remote code: the stock classes, from the same files
    assert type(AutoVideoProcessor.from_pretrained(tmp_path)) is LlavaOnevisionVideoProcessor
    assert type(LlavaOnevisionProcessor.from_pretrained(tmp_path).video_processor) is LlavaOnevisionVideoProcessor
    again = STGridPoolProcessor.from_pretrained(tmp_path)
    assert type(again.video_processor) is STGridPoolVideoProcessor
    assert again.video_processor.to_dict() == processor.video_processor.to_dict()


def make_remote_repo(tiny_stock_dir, folder: Path) -> Path:
    """A repo as the converter writes it, as far as the processor goes: our processor's files, the code modules,
    and `auto_map` for AutoProcessor."""
    STGridPoolProcessor.from_pretrained(tiny_stock_dir).save_pretrained(folder)
    shutil.copy(tiny_stock_dir / "config.json", folder / "config.json")
    for name in CODE_MODULES:
        shutil.copy(ROOT / name, folder / name)
    path = folder / "processor_config.json"
    data = json.loads(path.read_text())
    data["auto_map"] = {"AutoProcessor": "processing_stgridpool.STGridPoolProcessor"}
    path.write_text(json.dumps(data, indent=2))
    return folder


REMOTE_SCRIPT = """
import json, sys
if sys.argv[3] == "no-av":
    sys.modules["av"] = None  # `import av` raises ImportError, as where PyAV is not installed
sys.path.insert(0, sys.argv[1] + "/tests")
from remote_check import isolate  # the project's own modules cannot be imported: only the repo's code runs
isolate(__import__("pathlib").Path(sys.argv[1]))
import numpy as np
from transformers import AutoProcessor, AutoVideoProcessor

repo, out = sys.argv[2], {}
def origin(obj):
    return type(obj).__module__.split(".")[0] + ":" + type(obj).__name__
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
out["processor"], out["video_processor"] = origin(processor), origin(processor.video_processor)
frames = np.random.default_rng(0).integers(0, 256, (6, 54, 54, 3), dtype=np.uint8)
inputs = processor(text="<video>", videos=[frames], return_tensors="pt")
out["pixels"] = list(inputs["pixel_values_videos"].shape)
out["placeholders"] = int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<video>")).sum())
out["expected"] = processor.num_video_tokens(6)
video_processor = AutoVideoProcessor.from_pretrained(repo, trust_remote_code=True)
out["auto_video_processor"] = origin(video_processor)
video_processor.save_pretrained(sys.argv[4])
out["round_trip"] = origin(AutoVideoProcessor.from_pretrained(sys.argv[4], trust_remote_code=True))
out["round_trip_same"] = AutoVideoProcessor.from_pretrained(sys.argv[4], trust_remote_code=True).to_dict() == \\
    video_processor.to_dict()
try:
    processor(text="<video>", videos=[repo + "/missing.mp4"])
    out["file_error"] = None
except Exception as error:
    out["file_error"] = type(error).__name__ + ": " + str(error)
if sys.argv[3] == "with-av":  # a file, decoded by the repo's own reader (video_stgridpool, imported relatively)
    decoded = processor.video_processor(videos=[sys.argv[5]], return_tensors="np")  # the stored num_frames: 8
    out["decoded"] = list(decoded["pixel_values_videos"].shape)
    out["readers"] = sorted(name for name in sys.modules if name.endswith("video_stgridpool"))
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize("av", ["no-av", "with-av"])
def test_remote_code_repo_loads_without_pyav_and_round_trips(tiny_stock_dir, tmp_path, av):
    repo = make_remote_repo(tiny_stock_dir, tmp_path / "repo")
    clip = write_clip(tmp_path / "clip.webm", gray_frames(LEVELS))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    script = textwrap.dedent(REMOTE_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-c", script, str(ROOT), str(repo), av, str(tmp_path / "resaved"), str(clip)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT ", 1)[1])
    remote = "transformers_modules"
    assert out["processor"] == f"{remote}:STGridPoolProcessor"
    assert out["video_processor"] == f"{remote}:STGridPoolVideoProcessor"
    assert out["auto_video_processor"] == out["round_trip"] == f"{remote}:STGridPoolVideoProcessor"
    assert out["round_trip_same"]
    assert out["pixels"] == [1, 6, 3, 54, 54] and out["placeholders"] == out["expected"] == 6 * 13 * 13 + 1
    if av == "no-av":
        assert (
            out["file_error"] == f"ImportError: decoding the video file {repo}/missing.mp4 needs PyAV: pip install av"
        )
    else:
        assert out["file_error"] == f"VideoDecodeError: {repo}/missing.mp4: no such file"
        assert out["decoded"] == [1, 8, 3, 54, 54]
        assert out["readers"] and all(name.startswith(f"{remote}.") for name in out["readers"]), out["readers"]


def test_processor_decodes_paths_in_chat_template_and_call(tmp_path, tiny_stock_dir):
    clip = write_clip(tmp_path / "clip.webm", gray_frames(LEVELS))
    processor = STGridPoolProcessor.from_pretrained(tiny_stock_dir)
    assert isinstance(processor.video_processor, STGridPoolVideoProcessor)
    video_id = processor.tokenizer.convert_tokens_to_ids("<video>")
    for key in ("path", "url"):
        conversation = [
            {
                "role": "user",
                "content": [{"type": "video", key: str(clip)}, {"type": "text", "text": "what is happening?"}],
            }
        ]
        inputs = processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", num_frames=4
        )
        assert tuple(inputs["pixel_values_videos"].shape) == (1, 4, 3, 54, 54)
        assert int((inputs["input_ids"] == video_id).sum()) == processor.num_video_tokens(4)
    # processor(videos=path) with the stored num_frames (the tiny checkpoint stores 8)
    inputs = processor(text="<video>\nwhat", videos=[str(clip)], return_tensors="pt")
    assert inputs["pixel_values_videos"].shape[1] == 8
    # same frames as read_video_pyav: the first sampled frame is frame 0's gray level
    expected = processor.video_processor(
        videos=[read_video_pyav(clip, num_frames=8)[0]], do_sample_frames=False, return_tensors="pt"
    )
    torch.testing.assert_close(inputs["pixel_values_videos"], expected["pixel_values_videos"])
    # saved and reloaded: still PyAV decoding, same num_frames; the file loads with stock classes too
    processor.video_processor.num_frames = 5
    processor.save_pretrained(tmp_path / "saved")
    again = STGridPoolProcessor.from_pretrained(tmp_path / "saved")
    assert isinstance(again.video_processor, STGridPoolVideoProcessor) and again.video_processor.num_frames == 5
    assert again(text="<video>", videos=[str(clip)], return_tensors="pt")["pixel_values_videos"].shape[1] == 5
    from transformers import LlavaOnevisionProcessor

    assert LlavaOnevisionProcessor.from_pretrained(tmp_path / "saved").video_processor.num_frames == 5
    with pytest.raises(VideoDecodeError, match="no such file"):
        processor(text="<video>", videos=[str(tmp_path / "nope.mp4")])


# ---------------------------------------------------------------------------------------------------------------
# Issue 17 and 12.25: the processor's geometry through VideoPoolingSettings
# ---------------------------------------------------------------------------------------------------------------


def test_processor_geometry_is_validated_like_the_config(tiny_stock_dir):
    from stgridpool.demo import build_tiny_processor, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    with pytest.raises(
        ValueError, match=r"nsp_keep_ratio=0.0011.*larger than the padded frame \(27 \+ 2\*nsp_padding=0"
    ):
        build_tiny_processor(tokenizer, processor_class=STGridPoolProcessor, nsp_keep_ratio=1 / 900)
    with pytest.raises(ValueError, match=r"nsp_keep_ratio=0.3 is invalid"):
        build_tiny_processor(tokenizer, processor_class=STGridPoolProcessor, nsp_keep_ratio=0.3)
    with pytest.raises(ValueError, match=r"video_pooling_mode='max' is invalid"):
        STGridPoolProcessor(video_pooling_mode="max")
    with pytest.raises(ValueError, match=r"nsp_keep_ratio=0.0011"):  # no frame size yet: checked once there is one
        STGridPoolProcessor(nsp_keep_ratio=1 / 900, num_image_tokens=729)
    # padding makes the window fit: 27 + 2 * 2 = 31 >= 30
    processor = build_tiny_processor(
        tokenizer, processor_class=STGridPoolProcessor, nsp_keep_ratio=1 / 900, nsp_padding=2
    )
    assert processor.num_video_tokens(4) == VideoPoolingSettings(nsp_keep_ratio=1 / 900, nsp_padding=2).num_tokens(
        4, 27, 27
    )
    assert processor.num_video_tokens(4) == 4 * 1 + 1


def test_processor_counts_and_saved_keys_through_settings(tiny_stock_dir, tmp_path):
    from stgridpool.demo import build_tiny_processor, build_tiny_tokenizer

    geometry = {
        "video_pooling_mode": "stgridpool",
        "nsp_keep_ratio": 1 / 9,
        "nsp_padding": 1,
        "nsp_partial_windows": True,
        "video_newline_position": "frame",
    }
    processor = build_tiny_processor(build_tiny_tokenizer(), processor_class=STGridPoolProcessor, **geometry)
    settings = VideoPoolingSettings(**geometry)
    assert processor.video_pooling == settings
    assert processor.num_video_tokens(8) == settings.num_tokens(8, 27, 27) == 8 * (10 * 10 + 1)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert {name: saved[name] for name in geometry} == geometry  # the keys existing repos carry
    assert STGridPoolProcessor.from_pretrained(tmp_path).video_pooling == settings


# ---------------------------------------------------------------------------------------------------------------
# Transformers' own llava_onevision tests as the contract: what they caught
# ---------------------------------------------------------------------------------------------------------------


def test_num_image_tokens_not_square_counts_video_tokens_as_stock(processor):
    """Stock takes any num_image_tokens and counts a frame's side as its integer square root (CLIP towers' 577 =
    24 x 24 + the class token); with stock pooling ours counts the same. Only a video needs num_image_tokens: one
    without it is refused then, naming it."""
    from transformers import LlavaOnevisionProcessor

    video = [gray_frames(LEVELS[:3])]
    parts = dict(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        video_processor=processor.video_processor,
    )
    for num_image_tokens in (6, 27 * 27 + 1):
        stock = LlavaOnevisionProcessor(num_image_tokens=num_image_tokens, **parts)
        ours = STGridPoolProcessor(num_image_tokens=num_image_tokens, video_pooling_mode="bilinear", **parts)
        theirs = stock(text="<video>", videos=video, return_tensors="pt")["input_ids"]
        mine = ours(text="<video>", videos=video, return_tensors="pt")["input_ids"]
        assert mine.tolist() == theirs.tolist()
    side = 27  # the default geometry: 27 x 27 + 1 tokens counted as a 27 x 27 frame
    assert STGridPoolProcessor(num_image_tokens=side * side + 1, **parts).num_video_tokens(3) == (
        VideoPoolingSettings().num_tokens(3, side, side)
    )
    unset = STGridPoolProcessor(**parts)
    assert unset(text="no video here")["input_ids"]
    with pytest.raises(ValueError, match=r"num_image_tokens=None cannot give a video's token count: allowed are"):
        unset(text="<video>", videos=video, return_tensors="pt")


def test_arrays_asking_for_more_frames_than_they_have_fail_as_stock_files_keep_every_frame(processor, tmp_path):
    """Frame arrays sampled to more frames than they hold (by num_frames, or by fps and their frame rate) are refused
    as stock refuses them; a short video file keeps every frame (the PyAV reader, and a stock decoder's metadata)."""
    from transformers import LlavaOnevisionVideoProcessor
    from transformers.video_utils import VideoMetadata

    stock = LlavaOnevisionVideoProcessor(size={"height": 54, "width": 54})
    eight = gray_frames(LEVELS[:8])
    too_many = [
        {"num_frames": 10},
        {"num_frames": None, "fps": 5, "video_metadata": [{"fps": 4.0, "total_num_frames": 8}]},  # 8 / 4 * 5 = 10
    ]
    for asked in too_many:
        for video_processor in (stock, processor.video_processor):
            with pytest.raises(ValueError, match=r"exceeds `?total_num_frames=8"):
                video_processor(videos=[eight], do_sample_frames=True, return_tensors="pt", **asked)
    with pytest.raises(ValueError, match=r"exceeds `?total_num_frames=8"):
        processor(text="<video>", videos=[eight], do_sample_frames=True, num_frames=10, return_tensors="pt")
    short = write_clip(tmp_path / "short.mp4", gray_frames(LEVELS[:5]))
    out = processor.video_processor(videos=[str(short)], do_sample_frames=True, num_frames=10, return_tensors="pt")
    assert gray_indices(out["pixel_values_videos"][0]) == [0, 1, 2, 3, 4]
    decoded = VideoMetadata(total_num_frames=5, fps=25.0, video_backend="torchcodec")
    assert list(processor.video_processor.sample_frames(decoded, num_frames=10)) == [0, 1, 2, 3, 4]


def test_videos_of_different_frame_counts_in_one_call_get_a_one_line_error(processor):
    """Stock cannot stack videos of different lengths into one tensor and says so in a multi-line message naming
    neither video; ours names each video's frame count and what is allowed. Without tensors both give lists."""
    videos = [gray_frames(LEVELS[:8]), gray_frames(LEVELS[:5]), gray_frames(LEVELS[:8])]
    for call in (processor.video_processor, lambda **kw: processor(text="<video>" * 3, **kw)):
        with pytest.raises(ValueError) as info:
            call(videos=videos, return_tensors="pt")
        message = str(info.value)
        assert "\n" not in message, message
        assert "videos 0 and 2 have 8 frames, video 1 has 5" in message, message
        assert "allowed: the same frame count for every video of a call" in message, message
    listed = processor.video_processor(videos=videos)["pixel_values_videos"]
    assert [len(video) for video in listed] == [8, 5, 8]
    sampled = processor(text="<video>" * 3, videos=videos, do_sample_frames=True, num_frames=4, return_tensors="pt")
    assert tuple(sampled["pixel_values_videos"].shape[:2]) == (3, 4)
