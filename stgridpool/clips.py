"""Small synthetic video clips written with PyAV: the CLI's sample clip and the tests' fixtures."""

from fractions import Fraction
from pathlib import Path

import numpy as np

CODECS = {".mp4": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9"}


def write_clip(
    path,
    frames,
    *,
    rate: int = 25,
    codec: str | None = None,
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
    rotation: int = 0,
) -> Path:
    """Encode RGB frames (uint8 [T, H, W, 3], H and W even) to `path`; the container follows the suffix.

    codec: defaults by suffix (h264 for .mp4/.mkv, vp9 for .webm). pts: explicit presentation timestamps in
    `time_base` units (default 1/rate), e.g. irregular gaps for a variable-frame-rate clip. rotation: display
    rotation metadata, counterclockwise degrees (a player shows the frames rotated by it).
    """
    import av

    path = Path(path)
    codec = codec or CODECS.get(path.suffix, "libx264")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "10", "preset": "ultrafast", "bf": "0"}  # near-lossless: gray levels survive
        elif codec == "libvpx-vp9":
            stream.options = {"crf": "10", "b": "0", "deadline": "realtime", "cpu-used": "8"}
        time_base = time_base or Fraction(1, rate)
        stream.codec_context.time_base = time_base  # the muxer picks the container's own (mkv: 1/1000)
        if rotation:
            stream.set_display_rotation(rotation)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def gray_frames(levels, height: int = 32, width: int = 48) -> np.ndarray:
    """Frames whose every pixel is the given gray level: uint8 [len(levels), height, width, 3]."""
    return np.stack([np.full((height, width, 3), level, np.uint8) for level in levels])


def index_gray_level(index: int) -> int:
    """Gray level that encodes a frame index 0..31, 8 levels apart (robust to lossy coding)."""
    return 4 + 8 * index


def moving_shapes_frames(num_frames: int = 48, size: int = 96) -> np.ndarray:
    """A short sample scene: a red square moving right, a blue disc moving down, a green bar growing.

    uint8 [num_frames, size, size, 3]."""
    yy, xx = np.mgrid[:size, :size]
    frames = []
    for t in range(num_frames):
        phase = t / max(num_frames - 1, 1)
        image = np.full((size, size, 3), 235, np.uint8)
        x0 = int(4 + phase * (size - 32))
        image[20:44, x0 : x0 + 24] = (220, 40, 40)
        cy, cx = int(12 + phase * (size - 24)), size * 2 // 3
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= 100] = (40, 70, 220)
        image[size - 12 : size - 4, 4 : 4 + int(8 + phase * (size - 16))] = (40, 170, 60)
        frames.append(image)
    return np.stack(frames)


def write_sample_clip(path, num_frames: int = 48, size: int = 96) -> Path:
    """The CLI's built-in sample video: `moving_shapes_frames` as a 2-second h264 mp4 (24 fps)."""
    return write_clip(path, moving_shapes_frames(num_frames, size), rate=24)
