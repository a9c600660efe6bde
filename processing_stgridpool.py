"""ST-GridPool processor: LLaVA-OneVision's processor, emitting as many <video> placeholders as the model makes.

Only the video token count and video decoding change; images, text and chat templates stay stock. The count comes
from `configuration_stgridpool` (the same functions the model's config uses), so the two agree for the same settings.

Video files: stock Transformers (5.17 .. 5.24) decodes video paths in `BaseVideoProcessor.fetch_videos`, with
torchcodec only (it needs system FFmpeg libraries and fails on a plain pip install). `STGridPoolVideoProcessor`
overrides that one method, in both versions, to decode with PyAV (its wheels bundle FFmpeg): `read_video_pyav` below,
a pure function that samples frames uniformly over the video's *duration* by presentation timestamps (exactly the
stock `arange(n) * total // n` indices for constant frame rate; evenly spaced in time for variable frame rate) and
applies the rotation metadata. torchcodec is used only when asked for (`video_decoder="torchcodec"`).
"""

import bisect
import math
import os
from fractions import Fraction

import numpy as np
from transformers import LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor
from transformers.video_utils import VideoMetadata

try:  # inside a Hub repo, loaded by Transformers' remote-code loader
    from .configuration_stgridpool import pooled_frame_size, validate_video_geometry, video_token_count
except ImportError:  # installed as top-level modules of this project
    from configuration_stgridpool import pooled_frame_size, validate_video_geometry, video_token_count


# ---------------------------------------------------------------------------------------------------------------
# Video decoding with PyAV
# ---------------------------------------------------------------------------------------------------------------

DEFAULT_NUM_FRAMES = 32  # LLaVA-OneVision's; LLaVA-Video checkpoints store 64 in their video processor config


class VideoDecodeError(ValueError):
    """A video file that cannot be used; the message names the file and what is wrong, in one line."""


def sample_frame_indices(total_num_frames: int, num_frames: int | None = None) -> list[int]:
    """Uniformly spaced indices of `num_frames` out of `total_num_frames` frames: `j * total // num_frames`.

    The stock Transformers formula. `num_frames=None`, or more frames than the video has, gives every frame.
    """
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= 0):
        raise ValueError(f"num_frames={num_frames!r} is invalid: allowed values are integers >= 1, or None for all frames")
    if num_frames is None or num_frames >= total_num_frames:
        return list(range(total_num_frames))
    return [j * total_num_frames // num_frames for j in range(num_frames)]


def sample_frame_times(
    frame_times: list, end_time, num_frames: int | None = None, fps: float | None = None
) -> list[int]:
    """Indices of the frames shown at `num_frames` instants evenly spaced over the video's duration.

    frame_times: presentation times of the frames, ascending (any numbers; Fractions are exact); end_time: when the
    last frame stops being shown. Instant j = t0 + j * (end_time - t0) / n; the frame shown then is the last one
    with time <= instant. For constant frame rate this equals `sample_frame_indices`. `fps` (frames per second of
    video) sets n = max(1, floor(duration * fps)) instead of `num_frames`; neither gives every frame. A video with
    fewer frames than n gives every frame. In variable-frame-rate video a frame held for a long time may be picked
    more than once, as a viewer would see it at those instants.
    """
    total = len(frame_times)
    if num_frames is not None and fps is not None:
        raise ValueError(f"num_frames={num_frames!r} and fps={fps!r} were both given: allowed is one of them, or neither")
    if fps is not None:
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
            raise ValueError(f"fps={fps!r} is invalid: allowed values are numbers > 0")
        num_frames = max(1, int((end_time - frame_times[0]) * Fraction(fps)))
    if num_frames is None or (not isinstance(num_frames, bool) and isinstance(num_frames, int) and num_frames >= total):
        return sample_frame_indices(total, num_frames)
    sample_frame_indices(total, num_frames)  # validates num_frames
    start, span = frame_times[0], end_time - frame_times[0]
    instants = (start + span * Fraction(j, num_frames) for j in range(num_frames))
    return [max(bisect.bisect_right(frame_times, instant) - 1, 0) for instant in instants]


def _probe_frame_times(container, stream) -> tuple[list[Fraction], Fraction]:
    """Presentation times (seconds, exact) of every video packet, sorted, and the time the last frame ends.

    Demuxing only (no decoding): cheap. Packets without a timestamp are counted at the previous one's time."""
    time_base = stream.time_base or Fraction(1, 1)
    times, durations = [], []
    for packet in container.demux(stream):
        if packet.size == 0:  # the flush packet at the end
            continue
        pts = packet.pts if packet.pts is not None else packet.dts
        times.append(Fraction(pts) * time_base if pts is not None else (times[-1] if times else Fraction(0)))
        durations.append(Fraction(packet.duration or 0) * time_base)
    order = sorted(range(len(times)), key=times.__getitem__)
    times = [times[i] for i in order]
    if not times:
        return times, Fraction(0)
    last = durations[order[-1]]
    if last <= 0:  # no packet duration: the median gap, or the average rate
        gaps = sorted(b - a for a, b in zip(times, times[1:]) if b > a)
        rate = stream.average_rate or stream.guessed_rate
        last = gaps[len(gaps) // 2] if gaps else (1 / Fraction(rate) if rate else Fraction(1, 30))
    return times, times[-1] + last


def _rotate(image: np.ndarray, degrees_ccw: int) -> np.ndarray:
    """Apply a display rotation (counterclockwise degrees, multiple of 90) to an [H, W, 3] image."""
    return np.ascontiguousarray(np.rot90(image, k=round(degrees_ccw / 90) % 4)) if degrees_ccw else image


def read_video_pyav(
    path,
    num_frames: int | None = None,
    fps: float | None = None,
    sample_indices_fn=None,
    progress=None,
) -> tuple[np.ndarray, VideoMetadata]:
    """Decode a video file with PyAV, keeping `num_frames` frames evenly spaced in time (`sample_frame_times`).

    path: a local file. num_frames / fps: how many frames to keep (one of them; neither keeps all).
    sample_indices_fn: instead of those, `f(metadata=VideoMetadata) -> indices` (the stock hook; `metadata` carries
    `frame_times` and `end_time`, exact seconds). progress: optional callable `progress(decoded_so_far, frames_to_decode)`.
    Returns (frames uint8 [T, H, W, 3] RGB, as a player shows them (rotation metadata applied), and
    `VideoMetadata` with `frames_indices`).
    Raises `VideoDecodeError` (one line naming the file) for anything that is not a decodable video.
    """
    import av  # PyAV: an install requirement of this project; imported lazily like Transformers' backends

    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoDecodeError(f"{path}: no such file")
    if os.path.isdir(path):
        raise VideoDecodeError(f"{path}: is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(f"{path}: is empty (0 bytes), not a video file")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams}) or ["no streams"]
                raise VideoDecodeError(f"{path}: has no video stream (it has: {', '.join(kinds)})")
            stream = container.streams.video[0]
            times, end_time = _probe_frame_times(container, stream)
            if not times:
                raise VideoDecodeError(f"{path}: has a video stream but no video frames")
            # A truncated file often still opens; its header's duration then outlasts its frames. The container's
            # duration counts other streams too (audio may outlast video), so only the video stream's, or a lone one's.
            if stream.duration and stream.time_base:
                declared = float(stream.duration * stream.time_base)
            elif container.duration and len(container.streams) == 1:
                declared = container.duration / 1_000_000  # AV_TIME_BASE units
            else:
                declared = None
            if declared and end_time < Fraction(declared) * Fraction(9, 10) - 1:
                raise VideoDecodeError(
                    f"{path}: damaged or truncated: its frames stop at {float(end_time):.1f} s of the {declared:.1f} s "
                    f"it declares"
                )
            duration = end_time - times[0]
            metadata = VideoMetadata(
                total_num_frames=len(times),
                fps=float(len(times) / duration) if duration > 0 else None,
                duration=float(duration),
                video_backend="pyav",
            )
            metadata.frame_times, metadata.end_time = times, end_time  # exact (Fractions), for sampling by time
            if sample_indices_fn is not None:
                indices = [int(i) for i in sample_indices_fn(metadata=metadata)]
            else:
                indices = sample_frame_times(times, end_time, num_frames, fps)
            if len(indices) == 0:
                raise ValueError(f"{path}: the frame sampling picked no frames (sample_indices_fn returned none)")
            frames = _decode_at(container, stream, indices, path, len(times), progress)
    except VideoDecodeError:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, EOFError) as error:  # not a container FFmpeg can read
        reason = str(getattr(error, "strerror", None) or error).split(":")[0].strip() or type(error).__name__
        raise VideoDecodeError(f"{path}: not a readable video file ({reason})") from None
    except OSError as error:  # permissions and the like, before FFmpeg sees the file
        raise VideoDecodeError(f"{path}: cannot be opened ({error.strerror or error})") from None
    video = np.stack(frames)
    metadata.frames_indices = np.array(indices)
    metadata.height, metadata.width = video.shape[1:3]
    return video, metadata


def _decode_at(container, stream, indices: list[int], path: str, total: int, progress=None) -> list[np.ndarray]:
    """Decode frames in presentation order and return the RGB arrays [H, W, 3] at `indices` (repeats allowed)."""
    import av

    wanted = {}
    for position, index in enumerate(indices):
        wanted.setdefault(index, []).append(position)
    last = max(indices)
    out: list = [None] * len(indices)
    container.seek(0)
    decoded = 0
    try:
        for frame in container.decode(stream):
            if decoded in wanted:
                image = _rotate(frame.to_ndarray(format="rgb24"), frame.rotation)
                for position in wanted[decoded]:
                    out[position] = image
            decoded += 1
            if progress is not None:
                progress(decoded, last + 1)
            if decoded > last:
                break
    except av.error.FFmpegError as error:
        if decoded == 0:
            raise VideoDecodeError(f"{path}: no decodable video frames ({error.strerror or error})") from None
        raise VideoDecodeError(f"{path}: damaged or truncated: decoding stopped after frame {decoded - 1} ({error.strerror or error})") from None
    if decoded == 0:
        raise VideoDecodeError(f"{path}: no decodable video frames")
    if decoded <= last:
        raise VideoDecodeError(
            f"{path}: damaged or truncated: the container lists {total} frames but only {decoded} decode"
        )
    return out


class STGridPoolVideoProcessor(LlavaOnevisionVideoProcessor):
    r"""`LlavaOnevisionVideoProcessor` that decodes video files with PyAV and samples `num_frames` frames.

    Differences from stock, all about files: `fetch_videos` (the one method Transformers 5.17 and 5.24 both call to
    load a path) decodes with `read_video_pyav` unless `video_decoder="torchcodec"`, keeping `num_frames` frames
    (32 unless the config says otherwise; `num_frames=None` keeps every frame) evenly spaced in time, so a file is
    never decoded whole by accident; a video shorter than `num_frames` keeps all its frames instead of failing.
    Arrays and tensors are processed exactly as stock: every frame given is used (`do_sample_frames=False`).

    It saves itself as a `LlavaOnevisionVideoProcessor` (plus the keys `num_frames`, `do_sample_frames`,
    `video_decoder`), so a repo loads with stock Transformers too; `STGridPoolProcessor` turns whatever video
    processor it is given into this class. URLs (http/https) are left to the stock loader: this code does no network.
    """

    num_frames = DEFAULT_NUM_FRAMES
    video_decoder = "pyav"

    def __init__(self, **kwargs):
        if kwargs.get("num_frames") is None:
            kwargs.pop("num_frames", None)
        decoder = kwargs.setdefault("video_decoder", "pyav")
        if decoder not in ("pyav", "torchcodec"):
            raise ValueError(f"video_decoder={decoder!r} is invalid: allowed values are 'pyav', 'torchcodec'")
        super().__init__(**kwargs)

    def to_dict(self):
        output = super().to_dict()
        output["video_processor_type"] = "LlavaOnevisionVideoProcessor"  # loadable without remote code
        return output

    def sample_frames(self, metadata: VideoMetadata, num_frames: int | None = None, fps: float | None = None, **kwargs):
        """Indices of the frames to keep: evenly spaced in time over the duration (`sample_frame_times`) when the
        metadata carries frame times (videos decoded from files), else evenly spaced indices; never more frames than
        the video has. `num_frames` / `fps` default to this processor's."""
        if num_frames is None and fps is None:
            num_frames, fps = self.num_frames, self.fps
            if num_frames is not None and fps is not None:
                fps = None  # both stored: num_frames wins, as in the processor config it is the usual one
        frame_times = getattr(metadata, "frame_times", None)  # set by read_video_pyav: exact Fractions
        if frame_times:
            return np.array(sample_frame_times(frame_times, metadata.end_time, num_frames, fps))
        if fps is not None and num_frames is None:
            if not metadata.fps:
                raise ValueError("fps sampling needs the video's frame rate: pass video_metadata, or num_frames instead")
            num_frames = max(1, int(metadata.total_num_frames / metadata.fps * fps))
        return np.array(sample_frame_indices(metadata.total_num_frames, num_frames))

    def fetch_videos(self, video_url_or_urls, sample_indices_fn=None):
        """Decode one path (or a list of them) -> (frames uint8 [T, H, W, 3], VideoMetadata) (lists: two tuples)."""
        if isinstance(video_url_or_urls, (list, tuple)):
            return list(zip(*[self.fetch_videos(x, sample_indices_fn=sample_indices_fn) for x in video_url_or_urls]))
        source = os.fspath(video_url_or_urls) if isinstance(video_url_or_urls, os.PathLike) else video_url_or_urls
        if self.video_decoder == "torchcodec" or (isinstance(source, str) and source.startswith(("http://", "https://"))):
            return super().fetch_videos(source, sample_indices_fn=sample_indices_fn)
        if isinstance(source, str) and source.startswith("file://"):
            source = source[len("file://") :]
        if sample_indices_fn is None:  # do_sample_frames=False: a file still gets this processor's num_frames / fps
            fps = self.fps if self.num_frames is None else None
            return read_video_pyav(source, num_frames=self.num_frames, fps=fps)
        return read_video_pyav(source, sample_indices_fn=sample_indices_fn)


def as_stgridpool_video_processor(video_processor):
    """`video_processor` as an `STGridPoolVideoProcessor` with the same settings (None stays None)."""
    if video_processor is None or isinstance(video_processor, STGridPoolVideoProcessor):
        return video_processor
    skip = ("video_processor_type", "processor_class", "_processor_class")
    settings = {k: v for k, v in video_processor.to_dict().items() if k not in skip}
    return STGridPoolVideoProcessor(**settings)


class STGridPoolProcessor(LlavaOnevisionProcessor):
    r"""`LlavaOnevisionProcessor` whose video placeholder count follows the ST-GridPool settings.

    Takes the stock arguments plus the geometry fields of `STGridPoolConfig`, under the same names
    (`video_pooling_mode`, `nsp_keep_ratio`, `nsp_padding`, `nsp_partial_windows`, `video_newline_position`);
    they are saved in `processor_config.json`. Keep them equal to the model's config: the converter does.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        video_processor=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
        video_pooling_mode="stgridpool",
        nsp_keep_ratio=0.25,
        nsp_padding=0,
        nsp_partial_windows=False,
        video_newline_position="one_token",
        **kwargs,
    ):
        # Every stock argument stays explicit: Transformers rebuilds processors from this signature.
        validate_video_geometry(
            video_pooling_mode=video_pooling_mode,
            nsp_keep_ratio=nsp_keep_ratio,
            nsp_padding=nsp_padding,
            nsp_partial_windows=nsp_partial_windows,
            video_newline_position=video_newline_position,
        )
        self.video_pooling_mode = video_pooling_mode
        self.nsp_keep_ratio = nsp_keep_ratio
        self.nsp_padding = nsp_padding
        self.nsp_partial_windows = nsp_partial_windows
        self.video_newline_position = video_newline_position
        video_processor = as_stgridpool_video_processor(video_processor)  # PyAV decoding of paths
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )

    def num_video_tokens(self, num_frames: int) -> int:
        """<video> placeholders for one video of `num_frames` frames under this processor's settings."""
        side = int(math.sqrt(self.num_image_tokens))  # tokens per frame side as the vision tower emits them
        rows, cols = pooled_frame_size(
            side,
            side,
            video_pooling_mode=self.video_pooling_mode,
            nsp_keep_ratio=self.nsp_keep_ratio,
            nsp_padding=self.nsp_padding,
            nsp_partial_windows=self.nsp_partial_windows,
        )
        return video_token_count(num_frames, rows, cols, self.video_newline_position)

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        video = video_inputs["pixel_values_videos"][video_idx]
        num_frames = len(video) if isinstance(video, (list, tuple)) else video.shape[0]
        return self.video_token * self.num_video_tokens(num_frames)

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)
        if video_sizes is not None:
            data.num_video_tokens = [self.num_video_tokens(num_frames) for num_frames, _, _ in video_sizes]
        return data


__all__ = ["STGridPoolProcessor", "STGridPoolVideoProcessor", "read_video_pyav", "sample_frame_indices", "sample_frame_times"]
