"""Test kits: synthetic video clips written with PyAV (every container and codec feature the reader must handle);
model repos: copies to change, a repo carrying foreign code, and a Hub cache holding repos as `huggingface_hub`
downloads them (model ids that resolve offline)."""

import hashlib
import itertools
import json
import os
import shutil
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


def textured_frames(num_frames: int, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """Noise scrolling diagonally: every frame differs from its neighbours, so a frame decoded from the wrong
    references, or the wrong frame, differs from the true one. uint8 [num_frames, height, width, 3]."""
    base = np.random.default_rng(seed).integers(0, 256, (2 * height, 2 * width, 3), dtype=np.uint8)
    return np.stack([np.roll(base, (3 * t, 5 * t), (0, 1))[:height, :width] for t in range(num_frames)])


def remux(source, target, earlier: int = 0, options: dict | None = None, audio: bool = False) -> Path:
    """Copy `source`'s video packets into `target` (muxer `options`), every timestamp moved `earlier` frames earlier:
    the mp4 muxer then writes an edit list whose presentation starts at time 0, past those frames (the decoder drops
    them). audio: add an AAC track before the video (the video is then the second track, and its samples lie in
    chunks between the sound's, as in a camera's file)."""
    import av

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
            for packet, pts, dts in packets:  # the muxer rescales packets in place: set all from the originals
                packet.time_base = stream.time_base
                packet.pts, packet.dts = pts - step, dts - step
                packet.stream = out_stream
                out.mux(packet)
    return Path(target)


def write_scene_cut_clip(path) -> Path:
    """An h264 mp4 with I-frames at a scene cut that are not keyframes to x264 (so not in the sync table, stss), but
    are to FFmpeg's h264 parser (an I-frame of a stream with one reference frame)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height, stream.width, stream.pix_fmt = 48, 64, "yuv420p"
        stream.options = {"preset": "veryfast", "x264-params": "keyint=100:min-keyint=100:scenecut=40:ref=1:bframes=0"}
        for image in np.concatenate([textured_frames(40), textured_frames(110, seed=5)]):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)


def write_raw_h264(path, frames) -> Path:
    """An elementary h264 stream (no container: no timestamps), B-frames, a keyframe every 10 frames."""
    import av

    with av.open(str(path), "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "x264-params": "keyint=10:bframes=2:b-adapt=0"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)


def write_audio_only(path) -> Path:
    """An m4a file holding one AAC sound track and nothing else."""
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
    return Path(path)


def with_box_in_moov(data: bytes, box: bytes, at_end: bool) -> bytes:
    """An mp4 file's bytes (a faststart one: its moov box before the media data, its chunk offsets 32-bit) with
    `box` added at the start or end of the moov box: moov's size and every chunk offset (stco) grow to match."""
    import struct

    moov = data.index(b"moov") - 4
    (size,) = struct.unpack_from(">I", data, moov)
    at = moov + size if at_end else moov + 8
    out = bytearray(data[:at] + box + data[at:])
    struct.pack_into(">I", out, moov, size + len(box))
    stco = out.index(b"stco")
    (count,) = struct.unpack_from(">I", out, stco + 8)
    for k in range(count):
        (offset,) = struct.unpack_from(">I", out, stco + 12 + 4 * k)
        struct.pack_into(">I", out, stco + 12 + 4 * k, offset + len(box))
    return bytes(out)


def add_to_hub_cache(cache: Path, repo_id: str, folder: Path, refs: tuple[str, ...] = ("main",)) -> str:
    """Lay `folder`'s files out in the Hub cache `cache` (what HF_HUB_CACHE names) as `huggingface_hub` leaves a
    downloaded model repo: `models--ORG--NAME/blobs/<sha256>`, `snapshots/<commit>/<path>` linking to the blobs,
    and `refs/<ref>` holding the commit for each ref in `refs`. With HF_HUB_OFFLINE=1, `repo_id` then loads from
    there at any of `refs` (or the commit). Returns the commit: 40 hex digits, a digest of the files."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    blobs = {}  # path in the repo -> blob name
    for path in sorted(path for path in Path(folder).rglob("*") if path.is_file()):
        data = path.read_bytes()
        blobs[path.relative_to(folder).as_posix()] = blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
    commit = hashlib.sha1(f"{repo_id} {sorted(blobs.items())}".encode()).hexdigest()
    for name, blob in blobs.items():
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return commit


def use_hub_cache(monkeypatch, cache: Path) -> None:
    """Point this process's `huggingface_hub` (read at call time) and its child processes (the environment) at the
    Hub cache `cache`, offline."""
    from huggingface_hub import constants

    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setattr(constants, name, value)
        monkeypatch.setenv(name, "1" if value is True else value)


def copy_repo(repo: Path, dst: Path) -> Path:
    """A copy of `repo` whose files can be changed (hard links: replace a file, never write through one)."""
    shutil.copytree(repo, dst, copy_function=os.link)
    return dst


def write_json(path: Path, data) -> None:
    """Write `data` as JSON to `path` as a new file (never through a hard link of `copy_repo`)."""
    path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


EVIL_CODE = """from pathlib import Path

Path({marker!r}).write_text("ran")
from transformers import LlavaOnevisionVideoProcessor, PreTrainedTokenizerFast


class EvilVideoProcessor(LlavaOnevisionVideoProcessor):
    pass


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def evil_repo(stock: Path, dst: Path, marker: Path, where: str) -> Path:
    """A copy of `stock` whose `where` (processor_config.json's `video_processor` entry, or tokenizer_config.json)
    names the class of its own evil.py in an `auto_map`, with a class type Transformers does not know, so
    Transformers would ask whether to run evil.py (which writes `marker` when imported)."""
    repo = copy_repo(stock, dst)
    (repo / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    if where == "video_processor":
        data = json.loads((stock / "processor_config.json").read_text())
        data["video_processor"].update(
            video_processor_type="EvilVideoProcessor", auto_map={"AutoVideoProcessor": "evil.EvilVideoProcessor"}
        )
        write_json(repo / "processor_config.json", data)
    else:
        data = json.loads((stock / "tokenizer_config.json").read_text())
        data.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]})
        write_json(repo / "tokenizer_config.json", data)
    return repo
