"""Video files -> the frames ST-GridPool sees: `read_video_pyav`, decoding with PyAV.

`read_video_pyav(source, num_frames)` keeps the frames shown at `num_frames` instants evenly spaced over the video's
duration (for constant frame rate exactly stock Transformers' indices `j * total // num_frames`), as a player shows
them (rotation applied), bit for bit the frames a full decode from the start gives at those indices.

How, top to bottom: one pass over the packets (demuxing only, nothing decoded) lists the frames' presentation
timestamps and which frames are keyframes (`_index_video`). Where those timestamps can be trusted, each sampled frame
is decoded from the keyframe before it, or by going on from the previous sampled frame when that is shorter
(`_plan_runs`), every decoded frame matched to the index by its timestamp; these runs are shared among a few threads,
each with its own container (`_seeking`). Where the timestamps cannot be trusted (missing, repeated, or in decoding
order, as AVI stores them) or a seek lands anywhere unexpected, the file is decoded from the start instead, counting
frames in the order they are shown (`_forward`). PyAV is imported when a file is decoded, so this module (and a Hub
repo's remote code) loads without it.
"""

import bisect
import errno
import importlib
import io
import itertools
import math
import os
import stat
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from transformers.video_utils import VideoMetadata

DEFAULT_NUM_FRAMES = 32  # LLaVA-OneVision's; LLaVA-Video checkpoints store 64 in their video processor config
# Decoding threads when seeking, at most: each holds its own container and decoder (reference frames, up to ~200 MB
# at 4K), and past about 4 the seeks of a 720p read got slower again on a 16-core machine.
MAX_DECODE_THREADS = 4


class VideoDecodeError(ValueError):
    """A video file that cannot be used; the message names the file and what is wrong, in one line."""


# ---------------------------------------------------------------------------------------------------------------
# Which frames: sampling by time
# ---------------------------------------------------------------------------------------------------------------


def sample_frame_indices(total_num_frames: int, num_frames: int | None = None) -> list[int]:
    """Uniformly spaced indices of `num_frames` out of `total_num_frames` frames: `j * total // num_frames`.

    The stock Transformers formula. `num_frames=None`, or more frames than the video has, gives every frame.
    """
    _check_num_frames_and_fps(num_frames, None, "sample_frame_indices")
    if num_frames is None or num_frames >= total_num_frames:
        return list(range(total_num_frames))
    return [j * total_num_frames // num_frames for j in range(num_frames)]


def sample_frame_times(
    frame_times: Sequence, end_time, num_frames: int | None = None, fps: float | None = None
) -> list[int]:
    """Indices of the frames shown at `num_frames` instants evenly spaced over the video's duration.

    frame_times: presentation times of the frames, ascending (any numbers; Fractions are exact); end_time: when the
    last frame stops being shown. Instant j = t0 + j * (end_time - t0) / n; the frame shown then is the last one
    with time <= instant. For constant frame rate this equals `sample_frame_indices`. `fps` (frames per second of
    video) sets n = max(1, floor(duration * fps)) instead of `num_frames`; neither gives every frame. A video with
    fewer frames than n gives every frame, once. In variable-frame-rate video a frame held for a long time may be
    picked more than once, as a viewer would see it at those instants.
    """
    total = len(frame_times)
    _check_num_frames_and_fps(num_frames, fps, "sample_frame_times")
    if fps is not None:
        num_frames = max(1, int((end_time - frame_times[0]) * Fraction(fps)))
    if num_frames is None or num_frames >= total:
        return sample_frame_indices(total, num_frames)
    start, span = frame_times[0], end_time - frame_times[0]
    instants = (start + span * Fraction(j, num_frames) for j in range(num_frames))
    return [max(bisect.bisect_right(frame_times, instant) - 1, 0) for instant in instants]


def _check_num_frames_and_fps(num_frames, fps, where: str) -> None:
    """ValueError naming the value and what is allowed, for a bad `num_frames` or `fps`, or both given."""
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1):
        raise ValueError(
            f"num_frames={num_frames!r} is invalid: allowed values are integers >= 1, or None for all frames"
        )
    if fps is not None and (
        isinstance(fps, bool) or not isinstance(fps, (int, float)) or not (math.isfinite(fps) and fps > 0)
    ):
        raise ValueError(f"fps={fps!r} is invalid: allowed values are finite numbers > 0, or None")
    if num_frames is not None and fps is not None:
        raise ValueError(
            f"num_frames={num_frames!r} and fps={fps!r} were both given in {where}: allowed is one of them"
        )


# ---------------------------------------------------------------------------------------------------------------
# The index: one demuxing pass
# ---------------------------------------------------------------------------------------------------------------


class _FrameTimes(Sequence):
    """Presentation times of the frames in seconds (exact Fractions), made from the integer timestamps when read:
    an hour of video has 90,000 frames, and sampling reads a few hundred of them (bisection)."""

    def __init__(self, pts: list[int], time_base: Fraction):
        self.pts, self.time_base = pts, time_base

    def __len__(self) -> int:
        return len(self.pts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [p * self.time_base for p in self.pts[i]]
        return self.pts[i] * self.time_base


@dataclass
class _Index:
    """The frames of a video stream, in the order they are shown: frame i is the i-th a full decode gives."""

    pts: list[int]  # presentation timestamps, ascending, in units of `time_base`
    time_base: Fraction
    end_time: Fraction  # seconds: when the last frame stops being shown
    keyframes: list[int]  # frames whose packets are keyframes (decoding can start there), ascending
    keyframe_dts: dict[int, int | None]  # keyframe -> its packet's decoding timestamp (some demuxers seek by it)
    trusted: bool  # every frame has its own presentation timestamp: frames can be found by seeking and matching

    def frame_at(self, pts: int) -> int | None:
        """The frame with presentation timestamp `pts`, or None where no frame has it."""
        at = bisect.bisect_left(self.pts, pts)
        return at if at < len(self.pts) and self.pts[at] == pts else None


def _index_video(container, stream) -> _Index:
    """Index the video stream from its packets (demuxed, not decoded).

    Packets the decoder drops (discarded, e.g. cut by an mp4 edit list) are not frames. The timestamps are trusted
    only when every packet has one, no two are equal, and they are presentation times: a codec that reorders frames
    (B-frames) shows them in another order than it decodes them, so its packets' presentation timestamps, in
    demuxing order, cannot all ascend; where they do, they count packets in decoding order (AVI). Packets without a
    timestamp are counted at the stream's frame rate."""
    raw, keys = [], []  # raw: pts in demuxing order; keys: (pts, dts) of keyframe packets
    missing, last_pts, last = False, -math.inf, None  # last: the packet of the frame shown last
    for packet in container.demux(stream):
        if not packet.size or packet.is_discard:  # the flush packet at the end; frames the decoder drops
            continue
        pts = packet.pts
        if pts is None:
            missing, pts = True, len(raw)
        raw.append(pts)
        if packet.is_keyframe:
            keys.append((pts, packet.dts))
        if pts >= last_pts:
            last_pts, last = pts, packet
    last_duration = last.duration if last is not None else 0  # how long the last frame is shown
    time_base = stream.time_base or Fraction(1, 1)
    rate = Fraction(stream.average_rate or stream.guessed_rate or 25)
    if missing:  # frame numbers at the frame rate
        raw, time_base, last_duration = list(range(len(raw))), 1 / rate, 1
    pts = sorted(raw)
    distinct = all(a < b for a, b in itertools.pairwise(pts))
    reorders = getattr(stream.codec_context, "has_b_frames", True)  # no codec context: FFmpeg has no decoder for it
    decoding_order = reorders and raw == pts
    if not last_duration or last_duration <= 0:  # unknown: the median gap, or the frame rate
        gaps = sorted(b - a for a, b in itertools.pairwise(pts) if b > a)
        last_duration = gaps[len(gaps) // 2] if gaps else 1 / (rate * time_base)
    keyframe_dts = {bisect.bisect_left(pts, p): dts for p, dts in keys}
    end_time = (pts[-1] + last_duration) * time_base if pts else Fraction(0)
    trusted = not missing and distinct and not decoding_order
    return _Index(pts, time_base, end_time, sorted(keyframe_dts), keyframe_dts, trusted)


def _declared_end(container, stream) -> float | None:
    """When the header says the video ends, in seconds from 0 (None: it does not say). A stream's duration counts
    from its first timestamp; a container's too, except Matroska's (WebM's), whose segment duration counts from 0.
    Only the video stream's, or a lone stream's: the container's counts other streams too (audio may outlast it)."""
    if stream.duration and stream.time_base:
        return float((stream.duration + (stream.start_time or 0)) * stream.time_base)
    if container.duration and len(container.streams) == 1:
        start = 0 if container.format.name.startswith("matroska") else container.start_time or 0
        return (start + container.duration) / 1_000_000  # AV_TIME_BASE units
    return None


def _check_complete(name: str, index: _Index, declared_end: float | None) -> None:
    """A truncated file often still opens; its header's duration then outlasts its frames. Refuse a file whose frames
    stop before 90% of the duration it declares less 1 s; warn when they stop short by more than 3 frames and 0.5%
    of it (a cut of a few frames at the end is how muxers round, not damage). Both count from the first frame."""
    start = float(index.pts[0] * index.time_base)
    if not declared_end or declared_end <= start:
        return
    declared, duration = declared_end - start, float(index.end_time) - start
    if duration < declared * 0.9 - 1:
        raise VideoDecodeError(
            f"{name}: damaged or truncated: its frames stop at {duration:.1f} s of the {declared:.1f} s it declares"
        )
    if declared - duration > max(3 * duration / len(index.pts), 0.005 * declared):
        warnings.warn(
            f"{name}: its frames stop at {duration:.2f} s of the {declared:.2f} s it declares (damaged or truncated?); "
            f"the frames it has are used",
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def read_video_pyav(
    source,
    num_frames: int | None = None,
    fps: float | None = None,
    sample_indices_fn=None,
    progress=None,
    on_frame=None,
) -> tuple[np.ndarray, VideoMetadata]:
    """Decode a video with PyAV, keeping `num_frames` frames evenly spaced in time (`sample_frame_times`).

    source: a local file's path, or a binary file-like object (read whole into memory first). num_frames / fps: how
    many frames to keep (one of them; neither keeps all; more than the video has keeps every frame once).
    sample_indices_fn: instead of those, `f(metadata=VideoMetadata) -> indices` (the stock hook; `metadata` carries
    `frame_times` and `end_time`, exact seconds; the indices are returned as asked, in any order, repeats included).
    progress: optional `progress(frames_passed, frames_to_pass)`, called from this thread, the count never
    decreasing (frames from the keyframes decoding starts at to the sampled frames).
    on_frame: optional `on_frame(rows, image)`, called from this thread as each sampled frame is decoded, before
    this function returns: `image` uint8 [H, W, 3] is the frame the returned array holds at each of `rows` (a frame
    asked for twice fills two rows, in one call). Frames come in no particular order, and one may come again when a
    seek cannot be trusted and decoding starts over from the start of the file: the later call is the right one.
    Returns (frames uint8 [T, H, W, 3] RGB as a player shows them, rotation applied; `VideoMetadata` with
    `frames_indices`). Raises `VideoDecodeError` (one line naming the file) for anything that is not a decodable video.
    """
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"
    try:  # PyAV: an install requirement of this project, but not of a Hub repo's users who pass decoded frames
        av = importlib.import_module("av")
    except ImportError:
        raise ImportError(f"decoding the video file {name} needs PyAV: pip install av") from None
    open_container, size = _opener(av, source, name)
    try:
        with open_container() as container:
            stream = _video_stream(container, name, size)
            index = _index_video(container, stream)
            if not index.pts:
                raise VideoDecodeError(
                    f"{name}: damaged or truncated: it declares a video stream but holds no video frames ({size} bytes)"
                )
            _check_complete(name, index, _declared_end(container, stream))
            times = _FrameTimes(index.pts, index.time_base)
            duration = index.end_time - times[0]
            metadata = VideoMetadata(
                total_num_frames=len(times),
                fps=float(len(times) / duration) if duration > 0 else None,
                duration=float(duration),
                video_backend="pyav",
            )
            metadata.frame_times, metadata.end_time = times, index.end_time  # exact, for sampling by time
            if sample_indices_fn is not None:
                indices = _checked_indices(sample_indices_fn(metadata=metadata), len(times))
            else:
                indices = sample_frame_times(times, index.end_time, num_frames, fps)
            video = _Video(indices, name, on_frame)
            seekable = index.trusted and bool(index.keyframes)
            seeked = seekable and _seeking(av, open_container, container, index, video, progress)
    except (av.error.FFmpegError, UnicodeDecodeError, EOFError) as error:  # not a container FFmpeg can read
        raise VideoDecodeError(f"{name}: not a readable video file ({_reason(error)})") from None
    except OSError as error:  # permissions and the like, before FFmpeg sees the file
        raise VideoDecodeError(f"{name}: cannot be opened ({error.strerror or error})") from None
    if not seeked:
        video = _Video(indices, name, on_frame)
        _forward(av, open_container, index, video, progress)
    metadata.frames_indices = np.array(indices)
    metadata.height, metadata.width = video.array.shape[1:3]
    return video.array, metadata


def _opener(av, source, name: str):
    """(a function opening a new container on `source` at each call: each decoding thread opens its own, the size of
    the source in bytes), once the source is known to be something FFmpeg can be given: VideoDecodeError or TypeError
    naming what it is otherwise."""
    if isinstance(source, (str, os.PathLike)):
        _check_regular_file(name)
        url = "file:" + os.path.abspath(name)  # never a protocol: `concat:a.mp4|b.mp4` and `http:x` are file names
        return (lambda: av.open(url)), os.path.getsize(name)
    if not callable(getattr(source, "read", None)):
        raise TypeError(f"source={source!r} is invalid: allowed are a path or a binary file-like object")
    data = source.read()
    if not isinstance(data, bytes):
        raise TypeError(f"source={source!r} is invalid: it is opened in text mode; allowed is binary mode ('rb')")
    if not data:
        raise VideoDecodeError(f"{name}: is empty (0 bytes), not a video file")
    return (lambda: av.open(io.BytesIO(data))), len(data)


def _check_regular_file(path: str) -> None:
    """Raise VideoDecodeError saying what `path` is when it is not a non-empty regular file."""
    try:
        info = os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise VideoDecodeError(f"{path}: is a symbolic link loop, not a video file") from None
        if error.errno == errno.ENOENT and os.path.islink(path):
            raise VideoDecodeError(
                f"{path}: is a broken symbolic link (to {os.readlink(path)}, which does not exist)"
            ) from None
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            raise VideoDecodeError(f"{path}: no such file") from None
        raise VideoDecodeError(f"{path}: cannot be opened ({error.strerror or error})") from None
    kind = None
    if stat.S_ISDIR(info.st_mode):
        kind = "a directory"
    elif stat.S_ISFIFO(info.st_mode):
        kind = "a named pipe (FIFO)"
    elif stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
        kind = "a device"
    elif stat.S_ISSOCK(info.st_mode):
        kind = "a socket"
    elif not stat.S_ISREG(info.st_mode):
        kind = "not a regular file"
    if kind:
        raise VideoDecodeError(f"{path}: is {kind}, not a video file: allowed are regular files")
    if info.st_size == 0:
        raise VideoDecodeError(f"{path}: is empty (0 bytes), not a video file")


def _video_stream(container, name: str, size: int):
    """The container's first video stream; VideoDecodeError saying what the file (`size` bytes) holds instead."""
    if container.streams.video:
        return container.streams.video[0]
    kinds = sorted({s.type for s in container.streams})
    if not container.streams:
        raise VideoDecodeError(
            f"{name}: damaged or truncated, or not a video file: FFmpeg finds no streams in its {size} bytes"
        )
    if not {"audio", "subtitle"} & set(kinds):  # e.g. an mp4 whose header was cut off
        raise VideoDecodeError(
            f"{name}: damaged or truncated, or not a video file: FFmpeg finds no video stream in its {size} bytes "
            f"(only: {', '.join(kinds)})"
        )
    raise VideoDecodeError(f"{name}: has no video stream (it has: {', '.join(kinds)})")


def _reason(error) -> str:
    return str(getattr(error, "strerror", None) or error).split(":")[0].strip() or type(error).__name__


def _checked_indices(indices, total: int) -> list[int]:
    """`sample_indices_fn`'s answer as a list of ints, each a frame of the video (ValueError naming the function)."""
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("sample_indices_fn returned no frame indices: allowed are 1 or more indices")
    bad = [i for i in indices if not 0 <= i < total]
    if bad:
        raise ValueError(
            f"sample_indices_fn returned frame index {bad[0]}, but the video has {total} frames: "
            f"allowed are indices 0 .. {total - 1}"
        )
    return indices


class _Video:
    """The frames returned, filled in as the sampled frames are decoded (by the calling thread only): `array`, uint8
    [len(indices), H, W, 3], allocated at the first frame; each frame index goes to the rows that asked for it, and
    to `on_frame(rows, image)` where one is given."""

    def __init__(self, indices: list[int], name: str, on_frame=None):
        self.rows: dict[int, list[int]] = {}
        for row, index in enumerate(indices):
            self.rows.setdefault(index, []).append(row)
        self.count, self.name, self.array, self.on_frame = len(indices), name, None, on_frame

    def wanted(self) -> list[int]:
        """The distinct frame indices asked for, ascending."""
        return sorted(self.rows)

    def put(self, index: int, image: np.ndarray) -> None:
        if self.array is None:
            self.array = np.empty((self.count, *image.shape), np.uint8)
        if image.shape != self.array.shape[1:]:
            raise VideoDecodeError(
                f"{self.name}: frame {index} is {image.shape[1]}x{image.shape[0]} where another sampled frame is "
                f"{self.array.shape[2]}x{self.array.shape[1]}: videos whose frame size changes are not supported"
            )
        self.array[self.rows[index]] = image
        if self.on_frame is not None:
            self.on_frame(self.rows[index], image)


def _rgb(frame) -> np.ndarray:
    """A decoded frame as a player shows it: RGB uint8 [H, W, 3], its display rotation (counterclockwise) applied."""
    image = frame.to_ndarray(format="rgb24")
    quarter_turns = round(frame.rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(image, k=quarter_turns)) if quarter_turns else image


def _forward(av, open_container, index: _Index, video: _Video, progress) -> None:
    """Decode from the start, counting frames in the order the decoder shows them, up to the last sampled one. FFmpeg's
    frame and slice threads both help here (no seek empties their pipeline)."""
    wanted = set(video.rows)
    last, decoded = max(wanted), 0
    try:
        with open_container() as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if decoded in wanted:
                    video.put(decoded, _rgb(frame))
                decoded += 1
                if progress is not None:
                    progress(decoded, last + 1)
                if decoded > last:
                    return
    except av.error.FFmpegError as error:
        where = f"decoding stopped after frame {decoded - 1}" if decoded else "no frame decodes"
        raise VideoDecodeError(f"{video.name}: damaged or truncated: {where} ({_reason(error)})") from None
    raise VideoDecodeError(
        f"{video.name}: damaged or truncated: the container lists {len(index.pts)} frames but only {decoded} decode"
    )


# ---------------------------------------------------------------------------------------------------------------
# Seeking
# ---------------------------------------------------------------------------------------------------------------


class _Untrusted(Exception):
    """A seek landed elsewhere than asked, or decoded frames are not the index's: decode from the start instead."""


def _plan_runs(frames: list[int], keyframes: list[int]) -> list[tuple[int | None, list[int]]]:
    """Group the sampled frames (ascending, distinct) into decoding runs: (keyframe to seek to, frames to keep).

    A run goes on forward to the next sampled frame unless the keyframe at or before that frame lies past where the
    run stands: decoding from there costs fewer frames than going on. Keyframe None: the frame precedes every
    keyframe (decoding starts at the start of the file)."""
    runs: list[tuple[int | None, list[int]]] = []
    for frame in frames:
        at = bisect.bisect_right(keyframes, frame) - 1
        key = keyframes[at] if at >= 0 else None
        if runs and (key is None or key <= runs[-1][1][-1]):
            runs[-1][1].append(frame)
        else:
            runs.append((key, [frame]))
    return runs


def _decoding_threads() -> int:
    """Threads to decode seeking runs with: one per CPU this process may use (its affinity mask, which containers and
    `taskset` narrow) and a spare where it may use several, at most MAX_DECODE_THREADS. PyAV takes the GIL back
    between FFmpeg calls, and a thread waiting for it leaves its CPU idle: the spare fills those gaps."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(MAX_DECODE_THREADS, cpus + 1 if cpus > 1 else 1)


def _seeking(av, open_container, container, index: _Index, video: _Video, progress) -> bool:
    """Decode the runs the sampled frames need (`_plan_runs`) into `video`; False where a run cannot be trusted or
    FFmpeg fails in one (then the caller decodes from the start, which says whether the file is damaged).

    One thread: the runs one after the other in `container` (the one indexed). Several: a thread pool, each thread
    opening its own container at its first run; PyAV lets go of the GIL while FFmpeg demuxes, decodes and converts
    to RGB, so runs decode in parallel. Each run returns its frames, and this thread writes them into `video`."""
    runs = _plan_runs(video.wanted(), index.keyframes)
    costs = {key: frames[-1] - (key or 0) + 1 for key, frames in runs}  # frames passed from keyframe to last
    total, done = sum(costs.values()), 0
    threads = min(_decoding_threads(), len(runs))
    if threads == 1:
        container.streams.video[0].thread_type = "SLICE"  # frame threads refill their pipeline after every seek
        results = ((key, _decode_run(container, index, key, frames)) for key, frames in runs)
    else:
        results = _in_threads(open_container, index, runs, threads)
    try:
        for key, images in results:
            for frame, image in images:
                video.put(frame, image)
            done += costs[key]
            if progress is not None:
                progress(done, total)
    except (_Untrusted, av.error.FFmpegError):
        return False
    finally:
        results.close()
    return True


def _in_threads(open_container, index: _Index, runs: list, threads: int):
    """Yield (keyframe, [(frame, image)]) of each run as a pool of `threads` threads decodes it; on leaving early,
    the runs not started are cancelled, the others finish, and every container closes."""
    local, opened = threading.local(), []

    def decode(key: int | None, frames: list[int]):
        if not hasattr(local, "container"):
            local.container = open_container()
            opened.append(local.container)
            local.container.streams.video[0].thread_type = "SLICE"
        return key, _decode_run(local.container, index, key, frames)

    try:
        with ThreadPoolExecutor(threads) as pool:
            pending = {pool.submit(decode, key, frames) for key, frames in runs}
            try:
                for future in as_completed(pending):
                    pending.discard(future)  # its frames are let go of once the caller has them
                    yield future.result()
            finally:
                for future in pending:
                    future.cancel()
    finally:
        for container in opened:
            container.close()


def _decode_run(container, index: _Index, key: int | None, frames: list[int]) -> list[tuple[int, np.ndarray]]:
    """Seek to keyframe `key` and decode forward to the last of `frames` (ascending) -> [(frame, its image)].

    Every decoded frame must carry a timestamp of the index, later than the one before: _Untrusted otherwise. Frames
    no other frame references (non-reference B-frames) are skipped unless sampled: the decoder is told per packet
    (`skip_frame`), which changes no other frame."""
    stream = container.streams.video[0]
    codec = stream.codec_context
    start, first_packet = _seek(container, stream, index, key, frames[0])
    wanted = {index.pts[frame]: frame for frame in frames}
    last, previous, images = index.pts[frames[-1]], -math.inf, []
    skipping = False  # what codec.skip_frame was last set to, kept here: reading it back costs a call per packet
    try:
        for packet in itertools.chain([first_packet], container.demux(stream)):
            skip = packet.pts is not None and packet.pts not in wanted
            if skip != skipping:
                codec.skip_frame, skipping = "NONREF" if skip else "DEFAULT", skip
            for frame in packet.decode():
                if frame.pts is None or frame.pts <= previous or index.frame_at(frame.pts) is None:
                    raise _Untrusted(f"frame timestamp {frame.pts} after {previous}")
                previous = frame.pts
                if frame.pts < start:  # shown before the keyframe decoding started at: may lack its references
                    continue
                if frame.pts in wanted:
                    images.append((wanted.pop(frame.pts), _rgb(frame)))
                if frame.pts >= last:
                    if wanted:
                        raise _Untrusted(f"frames {sorted(wanted.values())} never decoded")
                    return images
    finally:
        codec.skip_frame = "DEFAULT"
    raise _Untrusted(f"the stream ended before frame {frames[-1]}")


def _seek(container, stream, index: _Index, key: int | None, target: int):
    """Seek to keyframe `key` (None: the start) -> (the pts decoding starts from, the first packet); _Untrusted where
    no seek lands on a keyframe at or before frame `target`.

    Demuxers find keyframes by presentation time (mkv, webm) or decoding time (mp4): the keyframe's pts is tried,
    then its dts, then the start of the file. Frames at or after the landing keyframe's pts decode exactly as in a
    full decode; earlier ones (an open GOP's leading frames) may lack references and are skipped."""
    attempts = [] if key is None else [index.pts[key], index.keyframe_dts.get(key)]
    for timestamp in dict.fromkeys(t for t in attempts if t is not None):
        container.seek(timestamp, stream=stream, backward=True)
        packet = _first_packet(container, stream)
        if packet is not None and packet.is_keyframe and packet.pts is not None and packet.pts <= index.pts[target]:
            return packet.pts, packet
    container.seek(0)  # the start: what a full decode sees, every frame exact
    packet = _first_packet(container, stream)
    if packet is None:
        raise _Untrusted("no packet at the start of the file")
    return -math.inf, packet


def _first_packet(container, stream):
    return next((packet for packet in container.demux(stream) if packet.size), None)


__all__ = [
    "DEFAULT_NUM_FRAMES",
    "VideoDecodeError",
    "read_video_pyav",
    "sample_frame_indices",
    "sample_frame_times",
]
