"""Video decoding with PyAV (processing_stgridpool), through the pure function and the Transformers processor path,
plus the pure helpers of stgridpool.visualize. Clips are encoded here with PyAV; frame k's gray level encodes k."""

import dataclasses
import errno
import struct
import threading
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from helpers import gray_frames, index_gray_level, write_clip

import processing_stgridpool
from configuration_stgridpool import VideoPoolingSettings
from modeling_stgridpool_llava import norm_spatial_pool
from processing_stgridpool import (
    STGridPoolProcessor,
    STGridPoolVideoProcessor,
    VideoDecodeError,
    read_video_pyav,
    sample_frame_indices,
    sample_frame_times,
)
from stgridpool.demo import save_tiny_stock_checkpoint
from stgridpool.visualize import nsp_token_weights, ptg_images, ptg_trace

LEVELS = [index_gray_level(i) for i in range(30)]


def decoded_indices(video: np.ndarray) -> list[int]:
    """Frame indices encoded in gray levels of decoded frames [T, H, W, 3]."""
    return [round((float(frame.mean()) - 4) / 8) for frame in video]


def needs_rotation_writer() -> None:
    """Skip where PyAV cannot write display-rotation metadata (before 16; lmms-eval 0.7.3 pins av<16): reading
    it is what these tests check, and every PyAV this project supports reads it."""
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip(f"writing rotation metadata needs PyAV >= 16 (installed: {av.__version__})")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_stock_checkpoint(tmp_path_factory.mktemp("tiny") / "stock")


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mkv"])
def test_uniform_sampling_picks_expected_frames(tmp_path, suffix):
    path = write_clip(tmp_path / f"clip{suffix}", gray_frames(LEVELS))
    video, metadata = read_video_pyav(path, num_frames=8)
    expected = [0, 3, 7, 11, 15, 18, 22, 26]  # j * 30 // 8
    assert sample_frame_indices(30, 8) == expected
    assert list(metadata.frames_indices) == expected
    assert decoded_indices(video) == expected
    assert video.dtype == np.uint8 and video.shape == (8, 32, 48, 3)
    assert metadata.total_num_frames == 30 and metadata.duration == pytest.approx(1.2)


def test_short_video_keeps_every_frame(tmp_path):
    path = write_clip(tmp_path / "short.mp4", gray_frames(LEVELS[:5]))
    video, metadata = read_video_pyav(path, num_frames=32)
    assert decoded_indices(video) == [0, 1, 2, 3, 4]


def test_fps_sampling(tmp_path):
    path = write_clip(tmp_path / "clip.mp4", gray_frames(LEVELS), rate=25)  # 1.2 s
    video, metadata = read_video_pyav(path, fps=5)  # 6 frames, one every 0.2 s = 5 frames
    assert decoded_indices(video) == [0, 5, 10, 15, 20, 25]
    with pytest.raises(ValueError, match="both given"):
        read_video_pyav(path, num_frames=4, fps=5)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_variable_frame_rate_is_sampled_by_time(tmp_path, suffix):
    pts = [0, 1, 2, 10, 11, 30, 31, 32, 50, 51]  # tenths of a second; the last frame ends at 5.2 s
    path = write_clip(tmp_path / f"vfr{suffix}", gray_frames(LEVELS[:10]), pts=pts, time_base=Fraction(1, 10), rate=10)
    video, metadata = read_video_pyav(path, num_frames=5)
    # instants 0, 1.04, 2.08, 3.12, 4.16 s show frames 0 (0 s), 3 (1.0 s), 4 (1.1 s), 6 (3.1 s), 7 (3.2 s)
    assert decoded_indices(video) == [0, 3, 4, 6, 7]
    assert [float(t) for t in metadata.frame_times] == pytest.approx([p / 10 for p in pts])
    # uniform by index would have been [0, 2, 4, 6, 8]
    assert sample_frame_indices(10, 5) == [0, 2, 4, 6, 8]
    # the frame times are exact Fractions, made from the integer timestamps when read (a sequence, not a list)
    times = metadata.frame_times
    assert len(times) == 10 and list(times) == [Fraction(p, 10) for p in pts] and times[2:4] == [Fraction(2, 10), 1]
    assert metadata.end_time == Fraction(52, 10)
    for n in (1, 3, 5, 9):
        assert sample_frame_times(times, metadata.end_time, n) == sample_frame_times(list(times), Fraction(52, 10), n)
    assert decoded_indices(read_video_pyav(path, fps=2)[0]) == sample_frame_times(list(times), Fraction(52, 10), fps=2)


def test_sample_frame_times_matches_indices_for_constant_rate():
    for total in (7, 30, 64, 100):
        times = [Fraction(i, 30) for i in range(total)]
        for n in (1, 3, 8, 32):
            assert sample_frame_times(times, Fraction(total, 30), n) == sample_frame_indices(total, n)


@pytest.mark.parametrize(
    "rotation, shape, corner", [(90, (48, 32), (1, 0)), (-90, (48, 32), (0, 1)), (180, (32, 48), (1, 1))]
)
def test_rotation_metadata_is_applied(tmp_path, rotation, shape, corner):
    needs_rotation_writer()
    image = np.zeros((32, 48, 3), np.uint8)
    image[:8, :8] = 255  # a white block at the top-left of the stored frame
    path = write_clip(tmp_path / "rot.mp4", np.stack([image] * 3), rotation=rotation)
    video, metadata = read_video_pyav(path)
    assert video.shape[1:3] == shape and (metadata.height, metadata.width) == shape
    rows, cols = np.nonzero(video[0, :, :, 0] > 128)
    # counterclockwise rotation: top-left goes to bottom-left (90), top-right (-90), bottom-right (180)
    assert (rows.mean() > shape[0] / 2, cols.mean() > shape[1] / 2) == tuple(map(bool, corner))


def write_audio_only(path):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for k in range(10):
            frame.pts = k * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def bad_inputs(tmp_path) -> dict:
    """name -> (path, words the error must contain)."""
    (tmp_path / "notes.txt").write_text("not a video")
    write_audio_only(tmp_path / "audio.m4a")
    clip = write_clip(tmp_path / "long.mkv", gray_frames(LEVELS * 4)).read_bytes()
    (tmp_path / "truncated.mkv").write_bytes(clip[: len(clip) // 2])
    mp4 = write_clip(tmp_path / "ok.mp4", gray_frames(LEVELS)).read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(mp4[: len(mp4) // 2])
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    return {
        "missing": (tmp_path / "missing.mp4", "no such file"),
        "directory": (tmp_path / "folder", "is a directory"),
        "text": (tmp_path / "notes.txt", "not a readable video"),
        "audio": (tmp_path / "audio.m4a", "no video stream"),
        "truncated_mkv": (tmp_path / "truncated.mkv", "truncated"),
        "truncated_mp4": (tmp_path / "truncated.mp4", "not a readable video"),
        "empty": (tmp_path / "empty.mp4", "empty"),
    }


def test_bad_inputs_raise_one_line_errors(tmp_path):
    for name, (path, words) in bad_inputs(tmp_path).items():
        with pytest.raises(VideoDecodeError) as info:
            read_video_pyav(path, num_frames=4)
        message = str(info.value)
        assert str(path) in message and words in message and "\n" not in message, (name, message)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_frames"):
            sample_frame_indices(10, bad)


def test_processor_decodes_paths_in_chat_template_and_call(tmp_path, tiny_dir):
    clip = write_clip(tmp_path / "clip.webm", gray_frames(LEVELS))
    processor = STGridPoolProcessor.from_pretrained(tiny_dir)
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


@pytest.mark.parametrize("partial, padding", [(False, 0), (True, 0), (False, 1)])
def test_nsp_token_weights_reproduce_norm_spatial_pool(partial, padding):
    torch.manual_seed(0)
    frames = torch.randn(3, 9, 9, 5) * torch.rand(3, 9, 9, 1) * 3
    settings = VideoPoolingSettings(
        nsp_keep_ratio=0.25, nsp_temperature=2.0, nsp_padding=padding, nsp_partial_windows=partial
    )
    weights = nsp_token_weights(frames, settings)
    assert weights.shape == (3, 9, 9)
    pooled = norm_spatial_pool(frames, 0.25, temperature=2.0, padding=padding, partial_windows=partial)
    if padding == 0:  # reconstruct each window's output as sum(weight * token)
        weighted = torch.nan_to_num(weights)[..., None] * frames
        rows, cols = pooled.shape[1:3]
        sums = torch.zeros_like(pooled)
        for i in range(rows):
            for j in range(cols):
                sums[:, i, j] = weighted[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].sum((1, 2))
        torch.testing.assert_close(sums, pooled, atol=1e-5, rtol=1e-5)
        assert bool(torch.isnan(weights[:, 8]).all()) != partial  # the 9th row: dropped unless partial windows
        if partial:  # a border window of 2 tokens: its weights sum to 1
            torch.testing.assert_close(weights[:, 8, 0:2].sum(-1), torch.ones(3))
    else:  # padded windows hold zero tokens too: in-frame weights sum to less than 1 there
        assert float(weights[:, 0, 0].max()) < 1 and not bool(torch.isnan(weights).any())


def test_ptg_trace_matches_spec_example():
    trace = ptg_trace(64, [(4, 2), (4, 4), (4, 8)])
    written = {t: entry["level"] for t, entry in enumerate(trace) if entry}
    assert written == {7: 1, 15: 2, 23: 1, 31: 3, 39: 1, 47: 2, 55: 1, 63: 3}
    assert trace[7]["sources"] == [1, 3, 5, 7] and trace[31]["sources"] == [7, 15, 23, 31]
    assert ptg_trace(7, [(4, 2), (4, 4), (4, 8)]) == [None] * 7


def test_ptg_images_tile_the_source_frames():
    from PIL import Image

    colors = [(i * 30, 0, 0) for i in range(8)]
    images = [Image.new("RGB", (10, 10), c) for c in colors]
    out = ptg_images(images, [(4, 2)])  # samples 1, 3, 5, 7 -> one 2x2 summary at 7
    assert [np.asarray(o).tolist() == np.asarray(i).tolist() for o, i in zip(out[:7], images[:7])] == [True] * 7
    mosaic = np.asarray(out[7])
    assert mosaic.shape == (10, 10, 3)
    assert [tuple(mosaic[r, c]) for r, c in ((0, 0), (0, 9), (9, 0), (9, 9))] == [
        colors[1],
        colors[3],
        colors[5],
        colors[7],
    ]


# ---------------------------------------------------------------------------------------------------------------
# Seeking reader (issue 15): the frames equal a full sequential decode at the same indices, bit for bit
# ---------------------------------------------------------------------------------------------------------------


def textured_frames(num_frames: int, height: int = 48, width: int = 64, seed: int = 0):
    """Noise scrolling diagonally: every frame differs from its neighbours, so a frame decoded from the wrong
    references differs from the true one. uint8 [num_frames, height, width, 3]."""
    base = np.random.default_rng(seed).integers(0, 256, (2 * height, 2 * width, 3), dtype=np.uint8)
    return np.stack([np.roll(base, (3 * t, 5 * t), (0, 1))[:height, :width] for t in range(num_frames)])


def full_decode(path) -> list[np.ndarray]:
    """Every frame of the first video stream, decoded in one pass, single-threaded, rotation applied as a player
    does: the oracle the seeking reader is compared to."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        frames = []
        for frame in container.decode(stream):
            frames.append(np.rot90(frame.to_ndarray(format="rgb24"), k=round(frame.rotation / 90) % 4))
        return frames


SEEK_CLIPS = {  # name -> (suffix, write_clip keyword arguments); 150 frames
    "h264_bframes_open_gop": (".mp4", {"bframes": 3, "gop": 24, "open_gop": True}),
    "h264_bframes_closed_gop_mkv": (".mkv", {"bframes": 2, "gop": 20}),
    "h264_faststart": (".mp4", {"bframes": 3, "gop": 32, "open_gop": True, "faststart": True}),
    "vp9_webm": (".webm", {"gop": 30}),
    "vfr": (
        ".mkv",
        {
            "bframes": 2,
            "gop": 16,
            "time_base": Fraction(1, 50),
            "pts": sorted({int(1.7 * t + (t % 7) ** 2) for t in range(300)})[:150],
        },
    ),
    "nonzero_start": (".mp4", {"bframes": 3, "gop": 24, "open_gop": True, "pts": [1000 + t for t in range(150)]}),
    "rotated": (".mp4", {"bframes": 2, "gop": 24, "rotation": 90}),
}


@pytest.fixture(scope="module")
def seek_clips(tmp_path_factory):
    """SEEK_CLIPS[name] -> the clip's path, encoded on first use (a rotated one only where PyAV can write it)."""
    folder = tmp_path_factory.mktemp("seek")
    paths = {}

    def clip(name: str):
        suffix, kwargs = SEEK_CLIPS[name]
        if kwargs.get("rotation"):
            needs_rotation_writer()
        if name not in paths:
            paths[name] = write_clip(folder / (name + suffix), textured_frames(150), **kwargs)
        return paths[name]

    return clip


@pytest.mark.parametrize("name", sorted(SEEK_CLIPS))
def test_seeking_reader_equals_full_decode(seek_clips, name):
    path = seek_clips(name)
    reference = full_decode(path)
    total = len(reference)
    assert total == 150
    rng = np.random.default_rng(1)
    index_sets = [
        [0],
        [total - 1],
        list(range(total)),  # every frame: one forward pass
        *[sample_frame_indices(total, n) for n in (2, 5, 8, 32)],
        sorted(rng.choice(total, 12, replace=False).tolist()),
        rng.integers(0, total, 20).tolist(),  # any order, repeats
        [149, 0, 75, 75, 23, 24, 25, 47, 48, 49],  # around keyframes
    ]
    for indices in index_sets:
        video, metadata = read_video_pyav(path, sample_indices_fn=lambda metadata, indices=indices: indices)
        assert list(metadata.frames_indices) == indices
        for j, index in enumerate(indices):
            assert np.array_equal(video[j], reference[index]), (name, indices, j, index)
    for n in (1, 8, 32):
        video, metadata = read_video_pyav(path, num_frames=n)
        assert np.array_equal(video, np.stack([reference[i] for i in metadata.frames_indices]))


def test_sparse_sampling_decodes_only_what_it_needs(seek_clips):
    """Sparse frames of a long-GOP clip: only the GOP runs up to each sampled frame decode (progress counts them);
    dense sampling of the same clip is one forward pass up to the last frame."""
    path = seek_clips("h264_bframes_open_gop")  # keyframes every 24 frames
    # frames 69..71 are shown before keyframe 72 but decoded after it (open GOP): they start from keyframe 48
    for indices, most in (([10, 100], 40), ([149], 30), ([71], 24), ([69, 70, 71, 72], 25)):
        seen = []
        read_video_pyav(
            path,
            sample_indices_fn=lambda metadata, indices=indices: indices,
            progress=lambda d, t, seen=seen: seen.append((d, t)),
        )
        done, todo = seen[-1]
        assert done == todo <= most, (indices, seen[-1])
    seen = []
    read_video_pyav(
        path, sample_indices_fn=lambda metadata: list(range(0, 150, 3)), progress=lambda d, t: seen.append(t)
    )
    # dense sampling never goes back: forward through each GOP, from its keyframe (every 24 frames) to its last
    # sampled frame (21 past it), skipping only the two frames before the next keyframe
    assert seen[-1] == 6 * 22 + (147 - 144 + 1)


def test_raw_stream_without_timestamps_decodes_forward(tmp_path):
    """An elementary h264 stream has no timestamps to seek by: the reader decodes forward and stays exact."""
    import av

    frames = textured_frames(60)
    path = tmp_path / "raw.h264"
    with av.open(str(path), "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height, stream.width, stream.pix_fmt = 48, 64, "yuv420p"
        stream.options = {"preset": "ultrafast", "x264-params": "keyint=10:bframes=2:b-adapt=0"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    reference = full_decode(path)
    video, metadata = read_video_pyav(path, sample_indices_fn=lambda metadata: [5, 41, 59, 0])
    assert metadata.total_num_frames == len(reference) == 60
    assert all(np.array_equal(v, reference[i]) for v, i in zip(video, [5, 41, 59, 0]))


def record_calls(monkeypatch, name: str) -> list:
    """Wrap processing_stgridpool.`name`, recording (thread id, positional arguments, result) of each call."""
    original = getattr(processing_stgridpool, name)
    calls = []

    def wrapper(*args):
        result = original(*args)
        calls.append((threading.get_ident(), args, result))
        return result

    monkeypatch.setattr(processing_stgridpool, name, wrapper)
    return calls


@pytest.mark.parametrize("name", ["h264_bframes_open_gop", "h264_bframes_closed_gop_mkv", "vfr", "nonzero_start"])
def test_parallel_decoding_equals_full_decode(seek_clips, monkeypatch, name):
    """With 4 decoding threads, the decoding runs are split among up to 4 threads (contiguous groups of about equal
    cost, every run once); the frames are still those of a full decode, and the progress count never decreases and
    ends at the total."""
    path = seek_clips(name)
    reference = full_decode(path)
    total = len(reference)
    monkeypatch.setattr(processing_stgridpool, "_decoding_threads", lambda: 4)
    plans = record_calls(monkeypatch, "_plan_runs")
    calls = record_calls(monkeypatch, "_decode_runs")
    rng = np.random.default_rng(2)
    index_sets = [
        *[sample_frame_indices(total, n) for n in (5, 8, 32)],
        rng.integers(0, total, 20).tolist(),  # any order, repeats
        [149, 0, 75, 75, 23, 24, 25, 47, 48, 49],
    ]
    for indices in index_sets:
        plans.clear()
        calls.clear()
        seen = []
        video, metadata = read_video_pyav(
            path,
            sample_indices_fn=lambda metadata, indices=indices: indices,
            progress=lambda done, todo: seen.append((done, todo)),
        )
        for j, index in enumerate(indices):
            assert np.array_equal(video[j], reference[index]), (name, indices, j, index)
        ((_, _, runs),) = plans
        assert 2 <= len(calls) <= min(4, len(runs)), (indices, runs)  # fewer where costs cannot be split 4 ways
        assert all(thread != threading.get_ident() for thread, _, _ in calls)  # in a thread pool, not this thread
        groups = sorted((args[3] for _, args, _ in calls), key=lambda group: group[0][1])  # by their first run
        assert [run for group in groups for run in group] == runs  # contiguous groups, every run once
        counts = [done for done, _ in seen]
        assert counts == sorted(counts) and {todo for _, todo in seen} == {counts[-1]}, seen[-5:]


def fail_seeking_at(monkeypatch, target: int, error: Exception | None) -> list:
    """Make the seek for the run starting at frame `target` fail: untrusted (None) or raising `error`. Returns the
    list of threads in which it failed."""
    seek, failed = processing_stgridpool._seek_to_keyframe, []

    def failing_seek(container, stream, index, key, run_start):
        if run_start != target:
            return seek(container, stream, index, key, run_start)
        failed.append(threading.get_ident())
        if error is not None:
            raise error
        return None

    monkeypatch.setattr(processing_stgridpool, "_seek_to_keyframe", failing_seek)
    return failed


@pytest.mark.parametrize(
    "error", [None, av.error.InvalidDataError(errno.EINVAL, "made up")], ids=["untrusted", "ffmpeg"]
)
def test_failure_in_one_decoding_thread_falls_back_to_forward_pass(seek_clips, monkeypatch, error):
    """A thread that cannot trust its seek, or meets an FFmpeg error, makes the reader decode forward from the start,
    with the right frames all the same."""
    path = seek_clips("h264_bframes_open_gop")  # keyframes every 24 frames
    reference = full_decode(path)
    indices = sample_frame_indices(150, 8)  # [0, 18, 37, 56, 75, 93, 112, 131]: frame 131 runs alone from 120
    monkeypatch.setattr(processing_stgridpool, "_decoding_threads", lambda: 4)
    failed = fail_seeking_at(monkeypatch, 131, error)
    forward = record_calls(monkeypatch, "_decode_forward")
    seen = []
    video, _ = read_video_pyav(path, num_frames=8, progress=lambda done, todo: seen.append((done, todo)))
    assert failed and failed[0] != threading.get_ident()  # in a pool thread
    assert len(forward) == 1 and seen[-1] == (132, 132)  # then one forward pass, up to frame 131
    assert np.array_equal(video, np.stack([reference[i] for i in indices]))


def test_other_error_in_a_decoding_thread_propagates(seek_clips, monkeypatch):
    path = seek_clips("h264_bframes_open_gop")
    monkeypatch.setattr(processing_stgridpool, "_decoding_threads", lambda: 4)
    failed = fail_seeking_at(monkeypatch, 131, RuntimeError("not an FFmpeg error"))
    forward = record_calls(monkeypatch, "_decode_forward")
    with pytest.raises(RuntimeError, match="not an FFmpeg error"):
        read_video_pyav(path, num_frames=8)
    assert failed and failed[0] != threading.get_ident() and not forward


def test_decoding_threads_are_one_per_usable_cpu_and_a_spare_where_there_are_several(monkeypatch):
    for cpus, threads in [(1, 1), (2, 3), (16, 17)]:
        monkeypatch.setattr(processing_stgridpool, "_usable_cpus", lambda cpus=cpus: cpus)
        assert processing_stgridpool._decoding_threads() == threads


def test_split_runs_into_contiguous_groups_of_about_equal_cost():
    split = processing_stgridpool._split_runs
    assert split(list("abcd"), [1, 1, 1, 1], 2) == [["a", "b"], ["c", "d"]]
    assert split(list("abcd"), [100, 1, 1, 100], 2) == [["a", "b"], ["c", "d"]]
    assert split(list("abcde"), [30, 30, 30, 30, 30], 4) == [["a"], ["b"], ["c", "d"], ["e"]]
    assert split(list("abcde"), [10, 10, 10, 10, 1000], 4) == [["a", "b", "c", "d"], ["e"]]  # no gain in more
    assert split(["a"], [7], 1) == [["a"]]


# ---------------------------------------------------------------------------------------------------------------
# The mp4/mov index from the sample tables: exactly the demux pass's, or not used
# ---------------------------------------------------------------------------------------------------------------


def needs_index_entries() -> None:
    """Skip where PyAV does not expose FFmpeg's index entries (older PyAV, older FFmpeg): the reader then always
    demuxes."""
    if not hasattr(av.video.stream.VideoStream, "index_entries"):
        pytest.skip(f"PyAV {av.__version__} has no Stream.index_entries")


def demux_pass_index(path) -> processing_stgridpool._StreamIndex:
    with av.open(str(path)) as container:
        return processing_stgridpool._probe_stream(container, container.streams.video[0])


def table_index(path):
    """(the sample tables, or None where refused; the packets computed from them; the index made from those)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        tables = processing_stgridpool._mp4_tables(str(path), container, stream)
        if tables is None:
            return None, None, None
        first_dts = next(container.demux(stream)).dts
        packets = processing_stgridpool._mp4_packets(tables, first_dts)
        return tables, packets, processing_stgridpool._index_from_mp4_packets(stream, packets)


def demuxed_packets(path) -> list[tuple]:
    """Every packet of the video stream as (pts, dts, duration, size, keyframe, discard), as demuxing gives them."""
    with av.open(str(path)) as container:
        return [
            (packet.pts, packet.dts, packet.duration, packet.size, packet.is_keyframe, packet.is_discard)
            for packet in container.demux(container.streams.video[0])
            if packet.size
        ]


def ffmpeg_index(path) -> list[tuple]:
    """FFmpeg's own index of the video stream (PyAV 18), entry by entry: (dts, size, position, flags)."""
    with av.open(str(path)) as container:
        return [(e.timestamp, e.size, e.pos, e.flags) for e in container.streams.video[0].index_entries]


def assert_same_index(index, reference) -> None:
    for field in dataclasses.fields(reference):
        mine, theirs = getattr(index, field.name), getattr(reference, field.name)
        if field.name == "times":
            mine, theirs = list(mine), list(theirs)
        assert mine == theirs, field.name


def remux(source, target, earlier: int = 0, options: dict | None = None, audio: bool = False):
    """Copy `source`'s packets into `target` (muxer `options`), every timestamp moved `earlier` frames earlier: the
    mp4 muxer then writes an edit list whose presentation starts at time 0, past those frames (FFmpeg drops them:
    discard flags). audio: add an AAC track before the video (the video is then the second track, and its samples
    lie in chunks between the sound's, as in a camera's file)."""
    with av.open(str(source)) as src:
        stream = src.streams.video[0]
        packets = [(packet, packet.pts, packet.dts) for packet in src.demux(stream) if packet.size]
        step = packets[0][0].duration * earlier
        with av.open(str(target), "w", options=options or {}) as out:
            sound = out.add_stream("aac", rate=48000, layout="mono") if audio else None  # streams before muxing
            out_stream = out.add_stream_from_template(stream)
            if sound is not None:
                seconds = float(packets[-1][1] * stream.time_base) + 1
                for start in range(0, int(seconds * 48000), 1024):
                    wave = np.sin(np.arange(start, start + 1024, dtype=np.float32) * 0.05)[None]
                    frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout="mono")
                    frame.sample_rate, frame.pts = 48000, start
                    out.mux(sound.encode(frame))
                out.mux(sound.encode())
            for packet, pts, dts in packets:
                packet.time_base = stream.time_base
                packet.pts, packet.dts = pts - step, dts - step
                packet.stream = out_stream
                out.mux(packet)
    return target


MP4_CLIPS = {  # name -> write_clip keyword arguments (and `cut`: frames an edit list cuts from the start); 150 frames
    "h264_no_bframes": {"gop": 30},
    "h264_bframes_mov": {"bframes": 2, "gop": 20, "suffix": ".mov"},
    "h264_vfr": SEEK_CLIPS["vfr"][1],
    "hevc_bframes": {"codec": "libx265", "gop": 24},
    "edit_list_cuts_5_frames": {**SEEK_CLIPS["h264_bframes_open_gop"][1], "cut": 5},
    "sound_track_first": {"bframes": 3, "gop": 24, "audio": True},
}


@pytest.fixture(scope="module")
def mp4_clips(tmp_path_factory, seek_clips):
    """Every mp4/mov clip of SEEK_CLIPS and MP4_CLIPS, by name -> path, encoded on first use."""
    folder = tmp_path_factory.mktemp("mp4")

    def clip(name: str):
        if name in SEEK_CLIPS:
            return seek_clips(name)
        kwargs = dict(MP4_CLIPS[name])
        path = folder / (name + kwargs.pop("suffix", ".mp4"))
        if not path.exists():
            if kwargs.get("codec") == "libx265" and "libx265" not in av.codecs_available:
                pytest.skip("this PyAV has no libx265 encoder")
            cut, audio = kwargs.pop("cut", 0), kwargs.pop("audio", False)
            source = path.with_stem(name + "_source") if cut or audio else path
            written = write_clip(source, textured_frames(150), **kwargs)
            if cut or audio:
                remux(written, path, earlier=cut, audio=audio)
        return path

    return clip


MP4_NAMES = sorted(name for name, (suffix, _) in SEEK_CLIPS.items() if suffix == ".mp4") + sorted(MP4_CLIPS)


@pytest.mark.parametrize("name", MP4_NAMES)
def test_mp4_packets_from_the_sample_tables_are_those_demuxing_gives(mp4_clips, monkeypatch, name):
    """B-frames (open and closed GOPs), faststart, VFR, rotated, a start delay (empty edit), mov, hevc, an edit list
    that cuts the first frames, a sound track before the video: every packet computed from the sample tables is the
    demuxed one, field by field, and FFmpeg's own index entry; the index is the demux pass's; the reader takes it
    without a demux pass, and its frames are exact."""
    needs_index_entries()
    path = mp4_clips(name)
    tables, packets, index = table_index(path)
    assert tables is not None, name
    columns = (packets.pts, packets.dts, packets.durations, packets.sizes, packets.keyframe, packets.discard)
    assert list(zip(*(column.tolist() for column in columns))) == demuxed_packets(path), name
    flags = packets.keyframe * processing_stgridpool.AVINDEX_KEYFRAME
    flags |= packets.discard * processing_stgridpool.AVINDEX_DISCARD_FRAME
    mine = zip(packets.dts.tolist(), packets.sizes.tolist(), packets.positions.tolist(), flags.tolist())
    assert list(mine) == [(dts, size, pos, flags & 3) for dts, size, pos, flags in ffmpeg_index(path)], name
    assert_same_index(index, demux_pass_index(path))
    if name == "edit_list_cuts_5_frames":
        assert int(packets.discard.sum()) == 5 and len(index.pts) == 145
    probes = record_calls(monkeypatch, "_probe_stream")
    reference = full_decode(path)
    indices = [len(reference) - 1, 0, 61, 62, 100]
    video, _ = read_video_pyav(path, sample_indices_fn=lambda metadata: indices)
    assert all(np.array_equal(video[j], reference[i]) for j, i in enumerate(indices)), name
    assert not probes, name


def test_reader_takes_the_table_index_for_mp4_and_the_demux_pass_for_others(seek_clips, monkeypatch):
    needs_index_entries()
    probes = record_calls(monkeypatch, "_probe_stream")
    demuxed = {"h264_bframes_open_gop": False, "h264_faststart": False, "h264_bframes_closed_gop_mkv": True}
    demuxed["vp9_webm"] = True
    for name, expected in demuxed.items():
        probes.clear()
        read_video_pyav(seek_clips(name), num_frames=8)
        assert bool(probes) == expected, name


def test_packets_unlike_ffmpegs_index_past_the_first_gops_are_refused(seek_clips, monkeypatch):
    """Packets computed wrong where the first GOPs' check cannot see them (here the last one's size, or one frame's
    place in the file) disagree with FFmpeg's own index: the reader demuxes every packet instead, exactly."""
    needs_index_entries()
    path = seek_clips("h264_faststart")
    _, packets, _ = table_index(path)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert processing_stgridpool._ffmpeg_index_agrees(stream, packets)
        for column, at in [("sizes", -1), ("positions", 100)]:
            wrong = getattr(packets, column).copy()
            wrong[at] += 1
            wrong_packets = dataclasses.replace(packets, **{column: wrong})
            assert not processing_stgridpool._ffmpeg_index_agrees(stream, wrong_packets), column
    compute = processing_stgridpool._mp4_packets

    def last_size_wrong(tables, first_dts):
        packets = compute(tables, first_dts)
        packets.sizes[-1] += 1
        return packets

    monkeypatch.setattr(processing_stgridpool, "_mp4_packets", last_size_wrong)
    probes = record_calls(monkeypatch, "_probe_stream")
    reference = full_decode(path)
    video, _ = read_video_pyav(path, sample_indices_fn=lambda metadata: [149, 3, 77])
    assert len(probes) == 1 and np.array_equal(video, np.stack([reference[i] for i in (149, 3, 77)]))


def write_scene_cut_clip(path):
    """An h264 mp4 with I-frames at a scene cut that are not keyframes to x264 (so not in the sync table, stss), but
    are to FFmpeg's h264 parser (an I-frame of a stream with one reference frame)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height, stream.width, stream.pix_fmt = 48, 64, "yuv420p"
        stream.options = {"preset": "veryfast", "x264-params": "keyint=100:min-keyint=100:scenecut=40:ref=1:bframes=0"}
        for image in np.concatenate([textured_frames(40), textured_frames(110, seed=5)]):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_mp4_index_refused_where_it_would_not_be_exact(tmp_path, seek_clips, monkeypatch):
    """An edit list that starts past the first GOP (FFmpeg's index then drops samples), a fragmented mp4, a
    faststart mp4 cut short (its tables list frames whose data is gone), and an h264 stream whose parser sees
    keyframes the sync table does not list (an I-frame at a scene cut, one reference frame): the reader demuxes
    every packet instead, and its frames are still exact."""
    needs_index_entries()
    source = write_clip(tmp_path / "source.mp4", textured_frames(150), bframes=3, gop=24, open_gop=True)
    cut_past_gop = remux(source, tmp_path / "cut30.mp4", earlier=30)
    fragmented = remux(source, tmp_path / "fragmented.mp4", options={"movflags": "frag_keyframe+empty_moov"})
    faststart = bytearray(remux(source, tmp_path / "faststart.mp4", options={"movflags": "faststart"}).read_bytes())
    ((media_data, _),) = processing_stgridpool._boxes(bytes(faststart))[b"mdat"]
    faststart[media_data - 8 : media_data - 4] = bytes(4)  # size 0: the media data runs to the end of the file
    cut_short = tmp_path / "cut_short.mp4"
    cut_short.write_bytes(faststart[: len(faststart) * 9 // 10])
    scene_cut = write_scene_cut_clip(tmp_path / "scene_cut.mp4")
    assert all(table_index(path)[0] is None for path in (cut_past_gop, fragmented, cut_short))
    tables, _, index = table_index(scene_cut)
    assert tables is not None and index.keyframes != demux_pass_index(scene_cut).keyframes
    probes = record_calls(monkeypatch, "_probe_stream")
    for path in (cut_past_gop, fragmented, scene_cut):
        probes.clear()
        reference = full_decode(path)
        indices = sample_frame_indices(len(reference), 9)
        video, _ = read_video_pyav(path, sample_indices_fn=lambda metadata, indices=indices: indices)
        assert np.array_equal(video, np.stack([reference[i] for i in indices])), path.name
        assert len(probes) == 1, path.name
        assert_same_index(probes[0][2], demux_pass_index(path))
    with pytest.warns(UserWarning, match="frames stop at"):  # as before: the frames it has are used
        _, metadata = read_video_pyav(cut_short, num_frames=4)
    assert metadata.total_num_frames == len(demux_pass_index(cut_short).pts) < 150


def box(kind: bytes, *children: bytes, version: int | None = None) -> bytes:
    """An mp4 box: size, type, (version and flags for a full box), then its payload."""
    payload = (b"" if version is None else bytes([version, 0, 0, 0])) + b"".join(children)
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def moov(stbl=(), edits=None, extra=(), track_id: int = 7) -> bytes:
    """The payload of a moov box holding one video track of 4 samples (timescale 1000); `stbl` replaces its tables
    by type, `edits` are (duration, media time) pairs for an edit list, `extra` boxes go after the track."""
    tables = {
        b"stsd": box(b"stsd", struct.pack(">I", 1), box(b"avc1"), version=0),
        b"stts": box(b"stts", struct.pack(">I4I", 2, 3, 40, 1, 20), version=0),  # 3 x 40 ticks, then 20
        b"ctts": box(b"ctts", struct.pack(">I4I", 2, 1, 80, 3, 0), version=0),
        b"stsz": box(b"stsz", struct.pack(">II4I", 0, 4, 9, 8, 7, 6), version=0),
        b"stss": box(b"stss", struct.pack(">II", 1, 1), version=0),  # sample 1 (the first) is the one sync sample
        b"stsc": box(b"stsc", struct.pack(">I6I", 2, 1, 3, 1, 2, 1, 1), version=0),  # chunk 1: 3 samples, then 1
        b"stco": box(b"stco", struct.pack(">III", 2, 100, 500), version=0),  # chunks at bytes 100 and 500
        **dict(stbl),
    }
    track = [
        box(b"tkhd", struct.pack(">III", 0, 0, track_id), version=0),
        box(
            b"mdia",
            box(b"mdhd", struct.pack(">IIII", 0, 0, 1000, 160), version=0),
            box(b"hdlr", struct.pack(">I4s", 0, b"vide"), version=0),
            box(b"minf", box(b"stbl", *[table for table in tables.values() if table])),
        ),
    ]
    if edits is not None:
        rows = b"".join(struct.pack(">IiI", duration, time, 1 << 16) for duration, time in edits)
        track.insert(1, box(b"edts", box(b"elst", struct.pack(">I", len(edits)), rows, version=0)))
    movie = box(b"mvhd", struct.pack(">IIII", 0, 0, 500, 80), version=0)  # timescale 500: half the track's
    return movie + box(b"trak", *track) + b"".join(extra)


def test_mp4_sample_tables_reads_what_ffmpeg_reads_and_refuses_the_rest():
    tables = processing_stgridpool._mp4_sample_tables
    parsed = tables(moov(edits=[(5, -1), (80, 80)]), 7, 4)  # a start delay, then the B-frame shift (80 movie ticks)
    assert parsed.timescale == 1000 and parsed.edit_start == 80
    assert parsed.sizes.tolist() == [9, 8, 7, 6] and parsed.durations.tolist() == [40, 40, 40, 20]
    assert parsed.offsets.tolist() == [80, 0, 0, 0] and parsed.positions.tolist() == [100, 109, 117, 500]
    assert parsed.sync.tolist() == [True, False, False, False]
    assert tables(moov(stbl={b"ctts": b""}), 7, 4).offsets.tolist() == [0, 0, 0, 0]
    assert tables(moov(stbl={b"stss": b""}), 7, 4).sync.all()  # no stss: every sample is a sync sample
    wide = {b"stco": b"", b"co64": box(b"co64", struct.pack(">IQQ", 2, 100, 2**33), version=0)}  # 64-bit offsets
    assert tables(moov(stbl=wide), 7, 4).positions.tolist() == [100, 109, 117, 2**33]
    packets = processing_stgridpool._mp4_packets(parsed, first_dts=-80)
    assert packets.dts.tolist() == [-80, -40, 0, 40] and packets.pts.tolist() == [0, -40, 0, 40]
    assert packets.discard.tolist() == [False, True, False, False]  # shown at media time 40, before the edit's 80

    def stbl_box(kind: bytes, fmt: str, *values) -> dict:
        return {kind: box(kind, struct.pack(fmt, *values), version=0)}

    refused = {
        "tracks with id 8": (moov(), 8, 4),
        "stsz counts 4 samples, FFmpeg's index 5": (moov(), 7, 5),
        "an edit list other than one edit": (moov(edits=[(80, 0), (80, 80)]), 7, 4),
        "or negative entries": (moov(stbl=stbl_box(b"ctts", ">IIi", 1, 4, -40)), 7, 4),
        "stts: its sample count": (moov(stbl=stbl_box(b"stts", ">III", 1, 3, 40)), 7, 4),
        "a duration of 0": (moov(stbl=stbl_box(b"stts", ">IIIII", 2, 3, 40, 1, 0)), 7, 4),
        "fragmented": (moov(extra=[box(b"mvex")]), 7, 4),
        "compact sample sizes": (moov(stbl={b"stz2": box(b"stz2", version=0)}), 7, 4),
        "partial sync samples": (moov(stbl={b"stps": box(b"stps", version=0)}), 7, 4),
        "one sample description": (moov(stbl=stbl_box(b"stsd", ">I", 2)), 7, 4),
        "shorter than its entry count": (moov(stbl=stbl_box(b"stsz", ">II", 0, 4)), 7, 4),
        "stss: empty": (moov(stbl=stbl_box(b"stss", ">I", 0)), 7, 4),
        "the first is not a sync sample": (moov(stbl=stbl_box(b"stss", ">II", 1, 2)), 7, 4),
        "stsc puts 6 samples in chunks": (moov(stbl=stbl_box(b"stsc", ">I3I", 1, 1, 3, 1)), 7, 4),
        "the edit starts past the first GOP": (moov(stbl=stbl_box(b"stss", ">III", 2, 1, 2), edits=[(80, 80)]), 7, 4),
        "the edit ends before the last frame": (moov(edits=[(20, 80)]), 7, 4),
    }
    for reason, (data, track_id, samples) in refused.items():
        with pytest.raises(processing_stgridpool._NotIndexable, match=reason):
            tables(data, track_id, samples)


def test_keyframes_unlike_the_demux_pass_change_no_frame(tmp_path, monkeypatch):
    """Past the first packets `_index_stream` checks, an h264 mp4's keyframes from the sync table may differ from
    the h264 parser's that demuxing reports. Forced past the check: sync samples the parser does not call keyframes
    (a P-frame listed in stss) and keyframes the table lacks (scene-cut I-frames) change where decoding starts, never
    the frames returned: seeks land on sync samples only, and each landing packet's own flag is checked."""
    needs_index_entries()
    data = bytearray(write_clip(tmp_path / "source.mp4", textured_frames(150), gop=30).read_bytes())
    third = data.index(b"stss") + 4 + 16  # after the type: version and flags, entry count, two entries
    assert struct.unpack_from(">I", data, third) == (61,)  # sample numbers count from 1: frame 60
    struct.pack_into(">I", data, third, 68)  # frame 67, a P-frame
    p_frame_listed = tmp_path / "p_frame_listed.mp4"
    p_frame_listed.write_bytes(data)
    monkeypatch.setattr(processing_stgridpool, "_first_packets_agree", lambda demuxed, packets: True)
    for path, differs in [(p_frame_listed, [67]), (write_scene_cut_clip(tmp_path / "scene_cut.mp4"), None)]:
        index = table_index(path)[2]
        assert index.keyframes != demux_pass_index(path).keyframes
        if differs:
            assert sorted(set(index.keyframes) - set(demux_pass_index(path).keyframes)) == differs
        reference = full_decode(path)
        for cpus in (1, 4):
            monkeypatch.setattr(processing_stgridpool, "_decoding_threads", lambda cpus=cpus: cpus)
            for indices in ([149, 3, 90, 41, 66, 67, 68], list(range(0, 150, 7))):
                video, _ = read_video_pyav(path, sample_indices_fn=lambda metadata, indices=indices: indices)
                assert np.array_equal(video, np.stack([reference[i] for i in indices])), (path.name, cpus, indices)
