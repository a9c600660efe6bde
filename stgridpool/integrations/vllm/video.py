"""The "stgridpool" video loader for vLLM: a video file becomes the frames our processor picks from it.

vLLM's default loader ("opencv") keeps `np.linspace(0, total - 1, n, dtype=int)` of a file's frames and decodes them
with OpenCV; our processor (`video_stgridpool.read_video_pyav`) keeps the frames shown at n instants evenly
spaced over the duration (`j * total // n` for constant frame rate), decoded with PyAV and rotated as a player shows
them. Same n, different frames: e.g. 32 of 300 -> stock 0, 9, 19, ..., 299; ours 0, 9, 18, ..., 290.
This loader runs `read_video_pyav` itself, so vLLM sees exactly the frames our processor sees. Select it with
`--media-io-kwargs '{"video": {"video_backend": "stgridpool"}}'` (or `media_io_kwargs=` in `LLM(...)`).
"""

import io
from typing import Any

import numpy as np
from vllm.multimodal.video import VIDEO_LOADER_REGISTRY, VideoLoader

from video_stgridpool import read_video_pyav

from . import VIDEO_LOADER


@VIDEO_LOADER_REGISTRY.register(VIDEO_LOADER)
class STGridPoolVideoLoader(VideoLoader):
    """Frames of a video file as `read_video_pyav` picks them: with an `fps`, one every 1/`fps` seconds (by time,
    as our processor's `fps`); else `num_frames` evenly spaced in time; with neither (both -1), every frame.
    vLLM passes a num_frames with every call (32 unless `--media-io-kwargs` or the request sets one; our processor's
    default is 32 too), an fps only when one is set: so an fps decides, and a num_frames set beside it is ignored."""

    @classmethod
    def load_bytes(cls, data: bytes, num_frames: int = -1, fps: float = -1, **kwargs: Any) -> tuple[np.ndarray, dict]:
        """Raw file bytes -> (frames uint8 [T, H, W, 3] RGB, metadata dict as vLLM's loaders return it)."""
        sampling = {"fps": fps} if fps > 0 else {"num_frames": num_frames} if num_frames > 0 else {}
        frames, metadata = read_video_pyav(io.BytesIO(data), **sampling)
        return frames, {
            "total_num_frames": metadata.total_num_frames,
            "fps": metadata.fps,
            "duration": metadata.duration,
            "video_backend": VIDEO_LOADER,
            "frames_indices": [int(i) for i in metadata.frames_indices],
            "do_sample_frames": False,
        }


__all__ = ["STGridPoolVideoLoader"]
