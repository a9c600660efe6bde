"""video_stgridpool: sampling by time and the PyAV reader. Clips are encoded here with PyAV (tests/helpers.py); in the
gray clips frame k's gray level encodes k, in the textured ones every frame differs from every other."""

import errno
import io
import os
import struct
import threading
import tracemalloc
import warnings
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from helpers import (
    gray_frames,
    index_gray_level,
    remux,
    textured_frames,
    with_box_in_moov,
    write_audio_only,
    write_clip,
    write_raw_h264,
    write_scene_cut_clip,
)

import video_stgridpool
from processing_stgridpool import STGridPoolVideoProcessor
from video_stgridpool import VideoDecodeError, read_video_pyav, sample_frame_indices, sample_frame_times

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
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", gray_frames(LEVELS), rate=25)  # 1.2 s


def full_decode(path) -> list[np.ndarray]:
    """Every frame of the first video stream, decoded in one pass, single-threaded, rotation applied as a player
    does: the oracle the reader is compared to."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        return [
            np.rot90(frame.to_ndarray(format="rgb24"), k=round(frame.rotation / 90) % 4)
            for frame in container.decode(stream)
        ]


# ---------------------------------------------------------------------------------------------------------------
# Sampling by time
# ---------------------------------------------------------------------------------------------------------------


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


def test_more_frames_than_the_video_has_gives_every_frame_once(tmp_path):
    """A file asked for far more frames than it has (num_frames, fps, the processor's stored num_frames) gives each
    of its frames once: the output's memory is bounded by the video, not by the request. Also in VFR video, where
    sampling below the frame count may pick a long-shown frame more than once."""
    clip = write_clip(tmp_path / "two_seconds.mp4", gray_frames([LEVELS[i % 30] for i in range(50)]))
    vfr = write_clip(
        tmp_path / "vfr.mkv", gray_frames(LEVELS[:6]), pts=[0, 1, 2, 3, 40, 41], time_base=Fraction(1, 10), rate=10
    )
    for path, total in [(clip, 50), (vfr, 6)]:
        for request in ({"num_frames": 100_000}, {"fps": 100_000.0}, {}):
            video, metadata = read_video_pyav(path, **request)
            assert list(metadata.frames_indices) == list(range(total)) and len(video) == total, (path.name, request)
        processor = STGridPoolVideoProcessor(num_frames=100_000)
        assert processor(videos=[str(path)], return_tensors="np")["pixel_values_videos"].shape[1] == total
    assert list(read_video_pyav(vfr, num_frames=5)[1].frames_indices) == [0, 3, 3, 3, 3]  # fewer: by time


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


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def bad_inputs(tmp_path) -> dict:
    """name -> (path, words the error must contain)."""
    (tmp_path / "notes.txt").write_text("not a video")
    write_audio_only(tmp_path / "audio.m4a")
    clip = write_clip(tmp_path / "long.mkv", gray_frames(LEVELS * 4)).read_bytes()
    (tmp_path / "truncated.mkv").write_bytes(clip[: len(clip) // 2])
    offset = write_clip(  # timestamps from 2.5 s: a cut is still seen
        tmp_path / "offset.mkv",
        gray_frames(LEVELS * 4),
        pts=[2500 + 40 * i for i in range(120)],
        time_base=Fraction(1, 1000),
    ).read_bytes()
    (tmp_path / "truncated_offset.mkv").write_bytes(offset[: len(offset) // 2])
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
        "truncated_offset_mkv": (tmp_path / "truncated_offset.mkv", "truncated"),
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


def test_file_like_objects(tmp_path):
    """A binary file-like object reads like its file (BytesIO, an open file); text mode, something that is no file,
    and empty bytes are refused naming what they are."""
    path = write_clip(tmp_path / "clip.mkv", textured_frames(150), bframes=2, gop=20)
    expected, _ = read_video_pyav(path, num_frames=9)
    with open(path, "rb") as file:
        assert np.array_equal(read_video_pyav(file, num_frames=9)[0], expected)
    assert np.array_equal(read_video_pyav(io.BytesIO(path.read_bytes()), num_frames=9)[0], expected)
    with pytest.raises(VideoDecodeError, match=r"^<BytesIO>: is empty \(0 bytes\), not a video file$"):
        read_video_pyav(io.BytesIO(b""))
    with pytest.raises(VideoDecodeError, match=r"^<BytesIO>: not a readable video file"):
        read_video_pyav(io.BytesIO(b"not a video at all" * 10))
    with open(path, encoding="latin-1") as text, pytest.raises(TypeError, match="text mode"):
        read_video_pyav(text)
    with pytest.raises(TypeError, match=r"source=12 is invalid: allowed are a path or a binary file-like object"):
        read_video_pyav(12)


# ---------------------------------------------------------------------------------------------------------------
# File names, damaged files, bad sampling arguments
# ---------------------------------------------------------------------------------------------------------------


def test_file_names_are_files_not_protocol_urls(tmp_path, monkeypatch):
    """12.10: `concat:a.mp4|b.mp4` is a file name: FFmpeg's concat protocol must not join a.mp4 and b.mp4."""
    monkeypatch.chdir(tmp_path)
    write_clip("a.mp4", gray_frames(LEVELS[:10]))
    write_clip("b.mp4", gray_frames(LEVELS[10:20]))
    with pytest.raises(VideoDecodeError, match=r"^concat:a.mp4\|b.mp4: no such file$"):
        read_video_pyav("concat:a.mp4|b.mp4")
    write_clip("seven.mp4", gray_frames(LEVELS[:7])).rename("concat:a.mp4|b.mp4")  # (FFmpeg cannot write it)
    assert read_video_pyav("concat:a.mp4|b.mp4")[1].total_num_frames == 7
    with pytest.raises(VideoDecodeError, match=r"^http:x.mp4: no such file$"):
        read_video_pyav("http:x.mp4")


def test_wrong_reasons_are_now_right(tmp_path):
    """12.12: a FIFO, /dev/zero, a symlink loop and an mp4 cut inside its header each get their own reason."""
    os.mkfifo(tmp_path / "fifo.mp4")
    (tmp_path / "loop1.mp4").symlink_to(tmp_path / "loop2.mp4")
    (tmp_path / "loop2.mp4").symlink_to(tmp_path / "loop1.mp4")
    (tmp_path / "dangling.mp4").symlink_to(tmp_path / "gone.mp4")
    clip = write_clip(tmp_path / "faststart.mp4", gray_frames(LEVELS), faststart=True).read_bytes()
    assert clip.find(b"moov") < clip.find(b"mdat")  # the header first: the cut leaves part of it
    (tmp_path / "cut64.mp4").write_bytes(clip[:64])
    (tmp_path / "cut400.mp4").write_bytes(clip[:400])
    cases = {
        tmp_path / "fifo.mp4": "is a named pipe (FIFO), not a video file",
        Path("/dev/zero"): "is a device, not a video file",
        tmp_path / "loop1.mp4": "is a symbolic link loop",
        tmp_path / "dangling.mp4": f"is a broken symbolic link (to {tmp_path / 'gone.mp4'}, which does not exist)",
        tmp_path / "cut64.mp4": "damaged or truncated, or not a video file: FFmpeg finds no streams in its 64 bytes",
        tmp_path / "cut400.mp4": "damaged or truncated",
    }
    for path, words in cases.items():
        with pytest.raises(VideoDecodeError) as info:
            read_video_pyav(path, num_frames=4)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and words in message and "\n" not in message, message
        for wrong in ("empty (0 bytes)", "no such file", "has no video stream"):
            assert wrong not in message, message


def test_file_cut_short_warns(tmp_path):
    """12.13: a file cut at 95% decodes what it has, with a warning naming the file; an intact one does not warn."""
    from stgridpool.demo import moving_shapes_frames

    data = write_clip(tmp_path / "whole.mp4", moving_shapes_frames(100, 64), faststart=True).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) * 95 // 100])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_video_pyav(tmp_path / "whole.mp4", num_frames=8)
    with pytest.warns(UserWarning, match=r"cut.mp4: its frames stop at 3\.\d\d s of the 4\.00 s it declares"):
        video, metadata = read_video_pyav(tmp_path / "cut.mp4", num_frames=8)
    assert 90 <= metadata.total_num_frames < 100 and len(video) == 8


def test_bad_sampling_arguments_blame_the_argument(clip):
    """12.26: fps=inf is a ValueError naming fps; an index past the end is blamed on sample_indices_fn."""
    for fps in (float("inf"), float("nan"), -1):
        with pytest.raises(ValueError, match=rf"fps={fps!r} is invalid: allowed values are finite numbers > 0"):
            read_video_pyav(clip, fps=fps)
    for bad in ([0, 30], [-1, 3]):
        with pytest.raises(ValueError) as info:
            read_video_pyav(clip, sample_indices_fn=lambda metadata, bad=bad: bad)
        assert not isinstance(info.value, VideoDecodeError)
        message = str(info.value)
        assert f"sample_indices_fn returned frame index {bad[-1] if bad[-1] >= 30 else bad[0]}" in message
        assert "has 30 frames: allowed are indices 0 .. 29" in message and "truncated" not in message


# ---------------------------------------------------------------------------------------------------------------
# Exact frames on every container and codec: bit for bit a full decode's, seeking or not
# ---------------------------------------------------------------------------------------------------------------

OFFSET = [2500 + 40 * t for t in range(150)]  # milliseconds: timestamps that start at 2.5 s
CLIPS = {  # name -> (suffix, write_clip keyword arguments, how it is remuxed afterwards or None); 150 frames
    "mp4_h264_bframes_open_gop": (".mp4", {"bframes": 3, "gop": 24, "open_gop": True}, None),
    "mp4_h264_no_bframes": (".mp4", {"gop": 30}, None),
    "mp4_faststart": (".mp4", {"bframes": 3, "gop": 32, "open_gop": True, "faststart": True}, None),
    "mp4_vfr": (".mp4", {"bframes": 2, "gop": 16, "time_base": Fraction(1, 50)}, None),
    "mp4_nonzero_start": (
        ".mp4",
        {"bframes": 3, "gop": 24, "open_gop": True, "pts": [1000 + t for t in range(150)]},
        None,
    ),
    "mp4_rotated": (".mp4", {"bframes": 2, "gop": 24, "rotation": 90}, None),
    "mp4_edit_list_cuts_5": (".mp4", {"bframes": 3, "gop": 24, "open_gop": True}, {"earlier": 5}),
    "mp4_edit_list_past_first_gop": (".mp4", {"bframes": 3, "gop": 24, "open_gop": True}, {"earlier": 30}),
    "mp4_sound_track_first": (".mp4", {"bframes": 3, "gop": 24}, {"audio": True}),
    "mp4_fragmented": (".mp4", {"bframes": 3, "gop": 24}, {"options": {"movflags": "frag_keyframe+empty_moov"}}),
    "mov_h264": (".mov", {"bframes": 2, "gop": 20}, None),
    "mp4_hevc": (".mp4", {"codec": "libx265", "gop": 24}, None),
    "webm_vp9": (".webm", {"gop": 30}, None),
    "mkv_h264_bframes": (".mkv", {"bframes": 2, "gop": 20}, None),
    "mkv_vfr": (".mkv", {"bframes": 2, "gop": 16, "time_base": Fraction(1, 50)}, None),
    "mkv_offset_2_5_s": (".mkv", {"bframes": 2, "gop": 20, "pts": OFFSET, "time_base": Fraction(1, 1000)}, None),
    "webm_offset_2_5_s": (".webm", {"gop": 30, "pts": OFFSET, "time_base": Fraction(1, 1000)}, None),
    "avi_h264_bframes": (".avi", {"bframes": 3, "gop": 50}, None),
    "avi_h264_no_bframes": (".avi", {"gop": 30}, None),
}
VFR_PTS = sorted({int(1.7 * t + (t % 7) ** 2) for t in range(300)})[:150]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """CLIPS[name] -> the clip's path, encoded on first use (rotated ones only where PyAV can write them)."""
    folder = tmp_path_factory.mktemp("clips")
    paths = {}

    def clip(name: str):
        suffix, kwargs, remuxed = CLIPS[name]
        if kwargs.get("rotation"):
            needs_rotation_writer()
        if kwargs.get("codec", "libx264") not in av.codecs_available:
            pytest.skip(f"this PyAV has no {kwargs['codec']} encoder")
        if name not in paths:
            kwargs = {**kwargs, "pts": VFR_PTS} if "vfr" in name else kwargs
            path = folder / (name + suffix)
            if remuxed is None:
                write_clip(path, textured_frames(150), **kwargs)
            else:
                remux(write_clip(folder / (name + "_source" + suffix), textured_frames(150), **kwargs), path, **remuxed)
            paths[name] = path
        return paths[name]

    return clip


@pytest.mark.parametrize("name", sorted(CLIPS))
def test_frames_equal_a_full_decode(clips, name):
    path = clips(name)
    reference = full_decode(path)
    total = len(reference)
    cut = CLIPS[name][2] or {}
    assert total == 150 - cut.get("earlier", 0) or "past_first_gop" in name, total
    rng = np.random.default_rng(1)
    index_sets = [
        [0],
        [total - 1],
        list(range(total)),  # every frame: one forward pass
        *[sample_frame_indices(total, n) for n in (2, 5, 8, 32)],
        sorted(rng.choice(total, 12, replace=False).tolist()),
        rng.integers(0, total, 20).tolist(),  # any order, repeats
        [total - 1, 0, 75, 75, 23, 24, 25, 47, 48, 49],  # around keyframes
    ]
    for indices in index_sets:
        video, metadata = read_video_pyav(path, sample_indices_fn=lambda metadata, indices=indices: indices)
        assert metadata.total_num_frames == total and list(metadata.frames_indices) == indices
        for j, index in enumerate(indices):
            assert np.array_equal(video[j], reference[index]), (name, indices, j, index)
    for n in (1, 8, 32):
        video, metadata = read_video_pyav(path, num_frames=n)
        assert np.array_equal(video, np.stack([reference[i] for i in metadata.frames_indices])), (name, n)
    with open(path, "rb") as file:
        video, metadata = read_video_pyav(io.BytesIO(file.read()), num_frames=8)
    assert np.array_equal(video, np.stack([reference[i] for i in metadata.frames_indices])), name


def test_scene_cut_and_raw_stream_frames_are_exact(tmp_path):
    """I-frames at a scene cut that the container's sync table does not list (h264, one reference frame); an
    elementary h264 stream, which has no timestamps at all (decoded forward, frames counted)."""
    for path in (
        write_scene_cut_clip(tmp_path / "scene_cut.mp4"),
        write_raw_h264(tmp_path / "raw.h264", textured_frames(60)),
    ):
        reference = full_decode(path)
        for indices in (
            [5, 41, 59, 0],
            sample_frame_indices(len(reference), 9),
            [len(reference) - 1, 3, 90 % len(reference)],
        ):
            video, metadata = read_video_pyav(path, sample_indices_fn=lambda metadata, indices=indices: indices)
            assert metadata.total_num_frames == len(reference)
            assert np.array_equal(video, np.stack([reference[i] for i in indices])), (path.name, indices)


# ---------------------------------------------------------------------------------------------------------------
# User-reported defects, each at its cause
# ---------------------------------------------------------------------------------------------------------------


def test_avi_with_bframes_gives_the_frames_shown(tmp_path):
    """AVI stores decoding-order timestamps: with B-frames they are not the order frames are shown in. Frames must
    not be matched by them: the reader decodes forward, counting frames as shown (the old reader matched decoded
    frames by them: every frame of this clip asked for, 216 of 300 came back wrong)."""
    path = write_clip(tmp_path / "bpyr.avi", textured_frames(300, 90, 160), bframes=3, gop=50, crf=23)
    reference = full_decode(path)
    rng = np.random.default_rng(3)
    for request in ({"num_frames": 64}, {}, {"sample_indices_fn": lambda metadata: rng.integers(0, 300, 40)}):
        video, metadata = read_video_pyav(path, **request)
        assert metadata.total_num_frames == 300 == len(reference)
        wrong = [i for j, i in enumerate(metadata.frames_indices) if not np.array_equal(video[j], reference[i])]
        assert wrong == [], (request, len(wrong))


@pytest.mark.parametrize("suffix", [".mkv", ".webm"])
def test_matroska_timestamps_not_starting_at_0(tmp_path, suffix):
    """A Matroska/WebM file whose timestamps start at 2.5 s (`-output_ts_offset`, recordings, `-copyts` cuts) or at
    0.3 s: its duration counts from 0, its frames from their first timestamp. Neither is refused nor warned about,
    and its frames are exact."""
    for start in (2500, 300):
        path = write_clip(
            tmp_path / f"offset{start}{suffix}",
            textured_frames(150),
            pts=[start + 40 * t for t in range(150)],
            time_base=Fraction(1, 1000),
            gop=30,
        )
        reference = full_decode(path)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            video, metadata = read_video_pyav(path, num_frames=8)
        assert metadata.duration == pytest.approx(6.0) and metadata.frame_times[0] == Fraction(start, 1000)
        assert list(metadata.frames_indices) == sample_frame_indices(150, 8)
        assert np.array_equal(video, np.stack([reference[i] for i in metadata.frames_indices]))


@pytest.mark.parametrize("at_end", [True, False], ids=["moov_end", "moov_start"])
@pytest.mark.parametrize("size", ["64bit_5GB", "32bit_4GB"])
def test_huge_free_box_in_moov_is_not_allocated(tmp_path, size, at_end):
    """An mp4 whose moov holds a `free` box claiming gigabytes in a small file: the reader decodes it or says it is
    damaged, and never allocates what the box claims (MemoryError) or anything near it."""
    header = (
        struct.pack(">I4sQ", 1, b"free", 5 * 2**30) if size == "64bit_5GB" else struct.pack(">I4s", 2**32 - 16, b"free")
    )
    data = write_clip(tmp_path / "source.mp4", textured_frames(60), bframes=2, gop=12, faststart=True).read_bytes()
    path = tmp_path / "free.mp4"
    path.write_bytes(with_box_in_moov(data, header + bytes(16), at_end))
    tracemalloc.start()
    try:
        video, _ = read_video_pyav(path, num_frames=4)
        assert video.shape == (4, 48, 64, 3)
    except VideoDecodeError as error:
        assert str(error).startswith(f"{path}: ") and "\n" not in str(error)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak


# ---------------------------------------------------------------------------------------------------------------
# Seeking and threads
# ---------------------------------------------------------------------------------------------------------------


def test_sparse_sampling_decodes_only_what_it_needs(clips):
    """Sparse frames of a long-GOP clip: only the runs from a keyframe to each sampled frame decode (progress counts
    them, from the calling thread, never decreasing); dense sampling goes on forward instead of seeking back."""
    path = clips("mp4_h264_bframes_open_gop")  # keyframes every 24 frames
    # frames 69..71 are shown before keyframe 72 but decoded after it (open GOP): they start from keyframe 48
    for indices, most in (([10, 100], 40), ([149], 30), ([71], 24), ([69, 70, 71, 72], 25)):
        seen, threads = [], set()

        def progress(done, todo, seen=seen, threads=threads):
            seen.append((done, todo))
            threads.add(threading.get_ident())

        read_video_pyav(path, sample_indices_fn=lambda metadata, indices=indices: indices, progress=progress)
        done, todo = seen[-1]
        assert done == todo <= most and threads == {threading.get_ident()}, (indices, seen[-1])
        assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    seen = []
    read_video_pyav(
        path, sample_indices_fn=lambda metadata: list(range(0, 150, 3)), progress=lambda d, t: seen.append(t)
    )
    # forward through each GOP, from its keyframe (every 24 frames) to its last sampled frame (21 past it)
    assert seen[-1] == 6 * 22 + (147 - 144 + 1)


def record_calls(monkeypatch, name: str) -> list:
    """Wrap video_stgridpool.`name`, recording (thread id, positional arguments) of each call."""
    original = getattr(video_stgridpool, name)
    calls = []

    def wrapper(*args):
        calls.append((threading.get_ident(), args))
        return original(*args)

    monkeypatch.setattr(video_stgridpool, name, wrapper)
    return calls


@pytest.mark.parametrize("name", ["mp4_h264_bframes_open_gop", "mkv_h264_bframes", "mkv_vfr", "mp4_nonzero_start"])
def test_parallel_decoding_equals_full_decode(clips, monkeypatch, name):
    """With 4 decoding threads, the runs decode in a thread pool (not in this thread), each run once; the frames are
    still a full decode's, and progress never decreases and ends at the total."""
    path = clips(name)
    reference = full_decode(path)
    monkeypatch.setattr(video_stgridpool, "_decoding_threads", lambda: 4)
    runs = record_calls(monkeypatch, "_decode_run")
    rng = np.random.default_rng(2)
    for indices in (sample_frame_indices(150, 8), rng.integers(0, 150, 20).tolist(), [149, 0, 75, 75, 23, 24, 48]):
        runs.clear()
        seen = []
        video, _ = read_video_pyav(
            path,
            sample_indices_fn=lambda metadata, indices=indices: indices,
            progress=lambda done, todo: seen.append((done, todo)),
        )
        assert np.array_equal(video, np.stack([reference[i] for i in indices])), (name, indices)
        assert len(runs) > 1 and all(thread != threading.get_ident() for thread, _ in runs)
        decoded = sorted(frame for _, args in runs for frame in args[3])
        assert decoded == sorted(set(indices)), decoded  # every sampled frame in exactly one run
        counts = [done for done, _ in seen]
        assert counts == sorted(counts) and {todo for _, todo in seen} == {counts[-1]}, seen


def fail_seeking_at(monkeypatch, target: int, error: Exception) -> list:
    """Make the seek of the run that starts at frame `target` raise `error`. Returns the threads it failed in."""
    seek, failed = video_stgridpool._seek, []

    def failing_seek(container, stream, index, key, first):
        if first == target:
            failed.append(threading.get_ident())
            raise error
        return seek(container, stream, index, key, first)

    monkeypatch.setattr(video_stgridpool, "_seek", failing_seek)
    return failed


@pytest.mark.parametrize(
    "error",
    [video_stgridpool._Untrusted("made up"), av.error.InvalidDataError(errno.EINVAL, "made up")],
    ids=["untrusted", "ffmpeg"],
)
@pytest.mark.parametrize("threads", [1, 4])
def test_a_run_that_cannot_be_trusted_falls_back_to_decoding_forward(clips, monkeypatch, error, threads):
    """A seek that lands elsewhere, or an FFmpeg error in a run, makes the reader decode from the start, with the
    right frames all the same."""
    path = clips("mp4_h264_bframes_open_gop")  # keyframes every 24 frames
    reference = full_decode(path)
    indices = sample_frame_indices(150, 8)  # [0, 18, 37, 56, 75, 93, 112, 131]: frame 131 runs alone from 120
    monkeypatch.setattr(video_stgridpool, "_decoding_threads", lambda: threads)
    failed = fail_seeking_at(monkeypatch, 131, error)
    forward = record_calls(monkeypatch, "_forward")
    seen = []
    video, _ = read_video_pyav(path, num_frames=8, progress=lambda done, todo: seen.append((done, todo)))
    assert failed and (failed[0] == threading.get_ident()) == (threads == 1)
    assert len(forward) == 1 and seen[-1] == (132, 132)  # then one pass from the start, up to frame 131
    assert np.array_equal(video, np.stack([reference[i] for i in indices]))


def test_other_error_in_a_decoding_thread_propagates(clips, monkeypatch):
    path = clips("mp4_h264_bframes_open_gop")
    monkeypatch.setattr(video_stgridpool, "_decoding_threads", lambda: 4)
    failed = fail_seeking_at(monkeypatch, 131, RuntimeError("not an FFmpeg error"))
    forward = record_calls(monkeypatch, "_forward")
    with pytest.raises(RuntimeError, match="not an FFmpeg error"):
        read_video_pyav(path, num_frames=8)
    assert failed and failed[0] != threading.get_ident() and not forward


# ---------------------------------------------------------------------------------------------------------------
# on_frame: the frames as they decode
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, threads", [("mp4_h264_bframes_open_gop", 1), ("mp4_h264_bframes_open_gop", 4), ("avi_h264_bframes", 1)]
)
def test_on_frame_delivers_every_row_from_the_calling_thread(clips, monkeypatch, name, threads):
    """Seeking (mp4, in one thread or a pool) or decoding forward (AVI): each sampled frame is delivered once, from the
    calling thread, with every row it fills (a frame asked for twice: both rows, in one call), as the image the
    returned array holds there."""
    path = clips(name)
    monkeypatch.setattr(video_stgridpool, "_decoding_threads", lambda: threads)
    forward = record_calls(monkeypatch, "_forward")
    indices = [149, 0, 75, 75, 23, 24, 48, 0, 131]
    calls = []
    video, _ = read_video_pyav(
        path,
        sample_indices_fn=lambda metadata: indices,
        on_frame=lambda rows, image: calls.append((threading.get_ident(), list(rows), image)),
    )
    assert len(forward) == name.startswith("avi")
    assert {thread for thread, _, _ in calls} == {threading.get_ident()}
    assert len(calls) == len(set(indices))
    assert sorted(row for _, rows, _ in calls for row in rows) == list(range(len(indices)))
    for _, rows, image in calls:
        assert len({indices[row] for row in rows}) == 1, rows
        assert all(np.array_equal(image, video[row]) for row in rows), rows


def test_on_frame_delivers_again_after_falling_back_to_decoding_forward(clips, monkeypatch):
    """A seek that cannot be trusted sends decoding back to the start: the frames delivered before come again, and
    the last delivery of each row is what the returned array holds."""
    path = clips("mp4_h264_bframes_open_gop")
    monkeypatch.setattr(video_stgridpool, "_decoding_threads", lambda: 1)
    fail_seeking_at(monkeypatch, 131, video_stgridpool._Untrusted("made up"))  # the last of 8 sampled frames
    deliveries, latest = [0] * 8, {}

    def on_frame(rows, image):
        for row in rows:
            deliveries[row] += 1
            latest[row] = image

    video, _ = read_video_pyav(path, num_frames=8, on_frame=on_frame)
    assert deliveries == [2] * 7 + [1]
    assert all(np.array_equal(latest[row], video[row]) for row in range(8))
