"""ST-GridPool processor: LLaVA-OneVision's processor, emitting as many <video> placeholders as the model makes.

Only the video token count and video decoding change; images, text and chat templates stay stock. The count comes
from `configuration_stgridpool` (the same functions the model's config uses), so the two agree for the same settings.

Video files: stock Transformers (5.17 .. 5.24) decodes video paths in `BaseVideoProcessor.fetch_videos`, with
torchcodec only (it needs system FFmpeg libraries and fails on a plain pip install). `STGridPoolVideoProcessor`
overrides that one method, in both versions, to decode with PyAV (its wheels bundle FFmpeg): `read_video_pyav` of
`video_stgridpool`, which samples frames evenly over the video's *duration* (exactly the stock `arange(n) * total // n`
indices for constant frame rate) and applies the rotation metadata. torchcodec is used only when asked for
(`video_decoder="torchcodec"`).
"""

import math
import os

import numpy as np
from transformers import LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor
from transformers.video_utils import VideoMetadata

try:  # inside a Hub repo, loaded by Transformers' remote-code loader
    from .configuration_stgridpool import VideoPoolingSettings
    from .video_stgridpool import (
        DEFAULT_NUM_FRAMES,
        _check_num_frames_and_fps,
        read_video_pyav,
        sample_frame_indices,
        sample_frame_times,
    )
except ImportError:  # installed as top-level modules of this project
    from configuration_stgridpool import VideoPoolingSettings
    from video_stgridpool import (
        DEFAULT_NUM_FRAMES,
        _check_num_frames_and_fps,
        read_video_pyav,
        sample_frame_indices,
        sample_frame_times,
    )


class STGridPoolVideoProcessor(LlavaOnevisionVideoProcessor):
    r"""`LlavaOnevisionVideoProcessor` that decodes video files with PyAV and samples `num_frames` frames.

    Differences from stock, all about files: `fetch_videos` (the one method Transformers 5.17 and 5.24 both call to
    load a path) decodes with `read_video_pyav` unless `video_decoder="torchcodec"`, keeping `num_frames` frames
    (32 unless the config says otherwise; `num_frames=None` keeps every frame) evenly spaced in time, so a file is
    never decoded whole by accident; a video shorter than `num_frames` keeps all its frames instead of failing.
    Arrays and tensors are processed exactly as stock: every frame given is used (`do_sample_frames=False`), or with
    `do_sample_frames=True` the frames stock's `sample_frames` picks (by `num_frames`, or by `fps` with the video's
    frame rate from `video_metadata`), with stock's error when that asks for more frames than the array has.

    `num_frames` and `fps` given together in one call are refused; the stored `num_frames` is only a default and
    gives way to an `fps` passed in the call (and the reverse). Videos of different frame counts in one call with
    `return_tensors` set are refused in one line naming each video's count (stock fails to stack them).

    Saving: `video_processor_type` stays the stock `LlavaOnevisionVideoProcessor` and `auto_map` names this class
    for `AutoVideoProcessor`: loaded with `trust_remote_code=True` from a repo holding this file it comes back as
    this class; without remote code, stock Transformers loads the stock class from the same file.
    `STGridPoolProcessor` turns whatever video processor it is given into this class. URLs (http/https) are left
    to the stock loader: this code does no network.
    """

    num_frames = DEFAULT_NUM_FRAMES
    video_decoder = "pyav"

    def __init__(self, **kwargs):
        if kwargs.get("num_frames") is None:
            kwargs.pop("num_frames", None)
        _check_num_frames_and_fps(kwargs.get("num_frames"), kwargs.get("fps"), "STGridPoolVideoProcessor")
        decoder = kwargs.setdefault("video_decoder", "pyav")
        if decoder not in ("pyav", "torchcodec"):
            raise ValueError(f"video_decoder={decoder!r} is invalid: allowed values are 'pyav', 'torchcodec'")
        kwargs.pop("auto_map", None)  # written back by to_dict
        super().__init__(**kwargs)

    def to_dict(self):
        output = super().to_dict()
        output["video_processor_type"] = "LlavaOnevisionVideoProcessor"  # loadable without remote code
        output["auto_map"] = {"AutoVideoProcessor": f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"}
        return output

    def preprocess(self, videos, **kwargs):
        # Stock fills in every default before sampling, so a stored num_frames would collide with an fps passed
        # here: of the two, only what this call asks for counts, and the stored values only when it asks for neither.
        num_frames, fps = kwargs.get("num_frames"), kwargs.get("fps")
        _check_num_frames_and_fps(num_frames, fps, "the call")
        if fps is not None:
            kwargs["num_frames"] = None
        elif num_frames is not None or self.num_frames is not None:
            kwargs["fps"] = None
        return super().preprocess(videos, **kwargs)

    def _preprocess(self, videos: list, return_tensors=None, **kwargs):
        # Stock stacks the sampled videos [T, C, H, W] into one tensor; different T fail there, in a message that
        # names neither the videos nor what is allowed.
        counts = [len(video) for video in videos]
        if return_tensors is not None and len(set(counts)) > 1:
            videos_of = {}
            for i, count in enumerate(counts):
                videos_of.setdefault(count, []).append(str(i))
            said = ", ".join(
                f"video {names[0]} has {count} frames"
                if len(names) == 1
                else f"videos {', '.join(names[:-1])} and {names[-1]} have {count} frames"
                for count, names in videos_of.items()
            )
            raise ValueError(
                f"{said}: videos of different frame counts cannot be stacked into one tensor "
                f"(return_tensors={return_tensors!r}); allowed: the same frame count for every video of a call. "
                f"Pass them in separate calls, or sample each to the same count (do_sample_frames=True, "
                f"num_frames={min(counts)} or fewer)"
            )
        return super()._preprocess(videos, return_tensors=return_tensors, **kwargs)

    def sample_frames(self, metadata: VideoMetadata, num_frames: int | None = None, fps: float | None = None, **kwargs):
        """Indices of the frames to keep; `num_frames` / `fps` default to this processor's (`fps` needs the frame
        rate in the metadata).

        Frame arrays: stock's indices, and stock's error when more frames are asked for than the video has. Video
        files keep every frame of a video shorter than asked: evenly spaced in time over the duration
        (`sample_frame_times`) where `read_video_pyav` gave the frame times, else (a stock decoder: torchcodec, URLs)
        stock's indices."""
        if num_frames is None and fps is None:
            num_frames, fps = self.num_frames, self.fps
            if num_frames is not None and fps is not None:
                fps = None  # both stored: num_frames wins, as in the processor config it is the usual one
        frame_times = getattr(metadata, "frame_times", None)  # set by read_video_pyav: exact Fractions
        if frame_times:
            return np.array(sample_frame_times(frame_times, metadata.end_time, num_frames, fps))
        _check_num_frames_and_fps(num_frames, fps, "sample_frames")
        if fps is not None and not metadata.fps:
            raise ValueError(
                f"fps={fps!r} sampling needs the video's frame rate: pass video_metadata with its fps "
                f"(e.g. video_metadata={{'fps': 30}}), or num_frames instead"
            )
        if metadata.video_backend is None:  # frames given as arrays: stock's own sampling (it differs by version),
            # on a copy without the stored defaults it would fill in: the call's num_frames / fps resolved above rule
            stock = object.__new__(type(self))
            stock.__dict__.update(vars(self), num_frames=None, fps=None)
            indices = super(STGridPoolVideoProcessor, stock).sample_frames(metadata, num_frames=num_frames, fps=fps)
            return np.asarray(indices)  # 5.17 gives a tensor, which indexes a one-frame sample as a scalar
        if fps is not None:
            num_frames = max(1, int(metadata.total_num_frames / metadata.fps * fps))  # stock's formula
        return np.array(sample_frame_indices(metadata.total_num_frames, num_frames))

    def fetch_videos(self, video_url_or_urls, sample_indices_fn=None):
        """Decode one path (or a list of them) -> (frames uint8 [T, H, W, 3], VideoMetadata) (lists: two tuples)."""
        if isinstance(video_url_or_urls, (list, tuple)):
            return list(zip(*[self.fetch_videos(x, sample_indices_fn=sample_indices_fn) for x in video_url_or_urls]))
        source = os.fspath(video_url_or_urls) if isinstance(video_url_or_urls, os.PathLike) else video_url_or_urls
        if self.video_decoder == "torchcodec" or (
            isinstance(source, str) and source.startswith(("http://", "https://"))
        ):
            return super().fetch_videos(source, sample_indices_fn=sample_indices_fn)
        if isinstance(source, str) and source.startswith("file://"):
            source = source[len("file://") :]
        if sample_indices_fn is None:  # do_sample_frames=False: a file still gets this processor's num_frames / fps
            fps = self.fps if self.num_frames is None else None
            return read_video_pyav(source, num_frames=self.num_frames, fps=fps)
        return read_video_pyav(source, sample_indices_fn=sample_indices_fn)


def _frame_side(num_image_tokens) -> int | None:
    """Tokens per frame side as the vision tower emits them, counted as stock counts them: the integer square root
    of `num_image_tokens` (27 for SigLIP-384/14's 729; 24 for CLIP-336/14's 577, whose extra token is the class
    token the "default" feature selection drops). None unless `num_image_tokens` is a positive integer."""
    if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int) or num_image_tokens < 1:
        return None
    return math.isqrt(num_image_tokens)


def as_stgridpool_video_processor(video_processor):
    """`video_processor` as an `STGridPoolVideoProcessor` with the same settings (None stays None)."""
    if video_processor is None or isinstance(video_processor, STGridPoolVideoProcessor):
        return video_processor
    skip = ("video_processor_type", "processor_class", "_processor_class", "auto_map")
    settings = {k: v for k, v in video_processor.to_dict().items() if k not in skip}
    return STGridPoolVideoProcessor(**settings)


class STGridPoolProcessor(LlavaOnevisionProcessor):
    r"""`LlavaOnevisionProcessor` whose video placeholder count follows the ST-GridPool settings.

    Takes the stock arguments plus the geometry fields of `STGridPoolConfig`, under the same names
    (`video_pooling_mode`, `nsp_keep_ratio`, `nsp_padding`, `nsp_partial_windows`, `video_newline_position`);
    they are saved in `processor_config.json`. Keep them equal to the model's config: the converter does.
    They are validated once, here (the window-fits check included, against the frame size `num_image_tokens`
    implies), into `video_pooling`, a `VideoPoolingSettings`, which counts the tokens.
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
        settings = VideoPoolingSettings(
            video_pooling_mode=video_pooling_mode,
            nsp_keep_ratio=nsp_keep_ratio,
            nsp_padding=nsp_padding,
            nsp_partial_windows=nsp_partial_windows,
            video_newline_position=video_newline_position,
        )
        side = _frame_side(num_image_tokens)  # stock takes any num_image_tokens: only a video needs one
        if side is not None:  # the window-fits check, as the config does it
            settings.check_frame_size(side)
        self._video_pooling = settings  # validated here, where the values enter: counts use it as it is
        for name, value in settings.geometry().items():  # saved under these names in processor_config.json
            setattr(self, name, value)
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

    @property
    def video_pooling(self) -> VideoPoolingSettings:
        """The ST-GridPool geometry settings given at construction (the other fields at their defaults: they do not
        change token counts)."""
        return self._video_pooling

    def num_video_tokens(self, num_frames: int) -> int:
        """<video> placeholders for one video of `num_frames` frames under this processor's settings."""
        settings, side = self._video_pooling, _frame_side(self.num_image_tokens)
        if side is None:
            raise ValueError(
                f"num_image_tokens={self.num_image_tokens!r} cannot give a video's token count: allowed are integers "
                f">= 1, the tokens of one frame (729 = 27 x 27 for SigLIP-384/14)"
            )
        settings.check_frame_size(side)
        return settings.num_tokens(num_frames, side, side)

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        video = video_inputs["pixel_values_videos"][video_idx]
        num_frames = len(video) if isinstance(video, (list, tuple)) else video.shape[0]
        return self.video_token * self.num_video_tokens(num_frames)

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)
        if video_sizes is not None:
            data.num_video_tokens = [self.num_video_tokens(num_frames) for num_frames, _, _ in video_sizes]
        return data


__all__ = ["STGridPoolProcessor", "STGridPoolVideoProcessor"]
