"""Test kits: synthetic video clips written with PyAV (every container and codec feature the reader must handle)."""

import itertools
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
    bframes: int = 0,
    gop: int | None = None,
    open_gop: bool = False,
    faststart: bool = False,
    crf: int = 10,
    preset: str = "ultrafast",
) -> Path:
    """Encode RGB frames (uint8 [T, H, W, 3], H and W even; or an iterable of them) to `path`; the container follows
    the suffix.

    codec: defaults by suffix (h264 for .mp4/.mkv, vp9 for .webm). pts: explicit presentation timestamps in
    `time_base` units (default 1/rate), e.g. irregular gaps for a variable-frame-rate clip, or a first one that is
    not 0. rotation: display rotation metadata, counterclockwise degrees (a player shows the frames rotated by it).
    bframes: B-frames between references (h264). gop: frames between keyframes (encoder default 250 when None).
    open_gop: h264 open GOPs (keyframes that are not IDR; the frames shown before them may reference the previous
    GOP). faststart: mp4 with its index (moov) before the frames. crf: quality (10: near-lossless, gray levels survive).
    preset: x264's (ultrafast: fastest to write, but no CABAC and no deblocking, so cheaper to decode than real video).
    """
    import av

    path = Path(path)
    codec = codec or CODECS.get(path.suffix, "libx264")
    frames = iter(frames)
    first = next(frames)
    muxer_options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=muxer_options) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            options = {"crf": str(crf), "preset": preset, "bf": str(bframes)}
            params = [f"bframes={bframes}", "b-adapt=0"] if bframes else []  # ultrafast alone turns B-frames off
            params += ["open-gop=1"] if open_gop else []
            params += [f"keyint={gop}", f"min-keyint={gop}", "scenecut=0"] if gop else []  # keyframes every `gop`
            if params:
                options["x264-params"] = ":".join(params)
        elif codec == "libvpx-vp9":
            options = {"crf": str(crf), "b": "0", "deadline": "realtime", "cpu-used": "8"}
        else:
            options = {}
        if gop:
            options["g"] = str(gop)
        stream.options = options
        time_base = time_base or Fraction(1, rate)
        stream.codec_context.time_base = time_base  # the muxer picks the container's own (mkv: 1/1000)
        if rotation:
            stream.set_display_rotation(rotation)
        for i, image in enumerate(itertools.chain([first], frames)):
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
