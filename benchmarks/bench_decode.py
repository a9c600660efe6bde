"""Video decoding benchmark (issue 15): seconds and peak RSS to sample frames from long videos, CPU only.

Readers, each given the same frame indices (uniform `j * total // n`; equal to time-based sampling on these
constant-frame-rate clips):
- `ours`: `video_stgridpool.read_video_pyav` (seeks to keyframes where that pays, frame-exact; the decoding runs
  shared among up to `video_stgridpool.MAX_DECODE_THREADS` threads). `ours_one_thread`: the same held to one thread.
- `shipped_21afcdb`: the reader shipped at commit 21afcdb (`processing_stgridpool.read_video_pyav` there, with its
  mp4 sample-table index and one decoding thread per CPU plus a spare), extracted with `git show` into the ignored
  folder `benchmarks/.old/` when the benchmark runs.
- `old_forward_only`: the reader this project shipped before issue 15 (a copy below,
  `old_forward_only_read_video_pyav`): decodes every frame from the start up to the last sampled one. Its frames are
  the truth (a sequential decode) that every other reader's frames are compared to.
- `plain_keyframe_seek`: for each sampled frame, seek to the keyframe before it and decode up to it (the simplest
  seeking reader; not frame-exact in general, e.g. open GOPs).
- `decord` / `torchcodec` (exact seek mode), when they import in the running Python.
- `probe`: only our demux-only index pass (`video_stgridpool._index_video`).

Each (reader, clip) runs in a fresh Python process (`--worker`, `--repeat` reads, median reported) that reports
wall seconds, CPU seconds (all threads) and its peak RSS (`ru_maxrss`) and the RSS before reading (imports), so
memory is per reader. Clips are generated once into `--clips-dir` (default: a temporary folder) and reused when
present: never in the repository.

    python -m benchmarks.bench_decode --clips-dir /tmp/decode-clips --json benchmarks/results/cpu_decode.json
    python -m benchmarks.bench_decode --smoke   # seconds, in-process (no RSS); what CI runs

`--compare-shipped N` times `ours` against `shipped_21afcdb` instead: N rounds, each reader once a round in its own
fresh process (one read), the two alternating so both see the same machine load; medians and their ratio:

    python -m benchmarks.bench_decode --compare-shipped 5 --clips h264_20min_128x72 --json out.json

No timing is asserted anywhere; targets are read off the table.
"""

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# name -> clip spec. h264: B-frames (3), keyframes every 250 frames (`gop`), closed GOPs unless `open_gop`, crf 23,
# x264 preset veryfast (CABAC, deblocking, 8x8 transforms, B-pyramid: the features real encodes have and that set the
# cost of decoding; ultrafast has none of them); rate 25 fps. Content: `camera_frames`. `tile_seconds`: the clip is
# that many seconds encoded once, then repeated (packets copied, timestamps shifted) to the full length, for clips
# too slow to encode whole on a 2-core machine.
FULL_CLIPS = {
    "h264_10s_320x180": {"suffix": ".mp4", "seconds": 10, "size": (180, 320), "num_frames": 32},
    "h264_20min_128x72": {"suffix": ".mp4", "seconds": 1200, "size": (72, 128), "num_frames": 64},
    "h264_5min_1280x720": {
        "suffix": ".mp4",
        "seconds": 300,
        "size": (720, 1280),
        "num_frames": 64,
        "tile_seconds": 30,
    },
    "h264_60min_128x72": {"suffix": ".mp4", "seconds": 3600, "size": (72, 128), "num_frames": 64},
    "h264_3min_1920x1080": {
        "suffix": ".mp4",
        "seconds": 180,
        "size": (1080, 1920),
        "num_frames": 64,
        "tile_seconds": 30,
    },
    # libvpx's crf scale is not x264's: 40 gives about 250 kbit/s here (23 gave 1.2 Mbit/s, far above real 144p)
    "vp9_10min_256x144": {"suffix": ".webm", "seconds": 600, "size": (144, 256), "num_frames": 64, "crf": 40},
    # open GOPs: the frames shown just before a keyframe are decoded after it and reference the previous GOP
    "h264_opengop_5min_320x180": {
        "suffix": ".mp4",
        "seconds": 300,
        "size": (180, 320),
        "num_frames": 64,
        "gop": 48,
        "open_gop": True,
    },
}
SMOKE_CLIPS = {
    "h264_4s_64x48": {"suffix": ".mp4", "seconds": 4, "size": (48, 64), "num_frames": 8, "gop": 25},
    "vp9_2s_64x48": {"suffix": ".webm", "seconds": 2, "size": (48, 64), "num_frames": 8, "gop": 25},
}
RATE = 25
PRESET = "veryfast"
CONTENT = "cam1"  # in the clip's file name: a cached clip is reused only if made by this version of camera_frames
READERS = (
    "ours", "ours_one_thread", "shipped_21afcdb", "plain_keyframe_seek", "old_forward_only", "decord", "torchcodec"
)  # fmt: skip
INDEX_READERS = ("probe",)  # index only, no frames: it reports the frame count
SHIPPED = "21afcdb"  # the commit whose reader `shipped_21afcdb` runs
SHIPPED_DIR = ROOT / "benchmarks" / ".old" / SHIPPED  # git-ignored


# ---------------------------------------------------------------------------------------------------------------
# Clips
# ---------------------------------------------------------------------------------------------------------------


def pink_texture(height: int, width: int, seed: int) -> np.ndarray:
    """A seamlessly tiling texture with the 1/f amplitude spectrum of natural images, colour channels correlated:
    uint8 [height, width, 3]."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    falloff = np.hypot(fy, fx)
    falloff[0, 0] = 1.0
    shape = (height, width // 2 + 1)
    shared = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    channels = []
    for _ in range(3):
        own = rng.normal(size=shape) + 1j * rng.normal(size=shape)
        channels.append(np.fft.irfft2((0.8 * shared + 0.2 * own) / falloff, s=(height, width)))
    image = np.stack(channels, -1)
    return np.clip((image - image.mean()) / image.std() * 45 + 118, 0, 255).astype(np.uint8)


def camera_frames(num_frames: int, height: int, width: int, seed: int = 0):
    """Camera-like frames: a natural-statistics texture (`pink_texture`) under a pan whose speed and direction keep
    changing (sub-pixel steps: the frame is a 2x2 average of a texture at twice the resolution, for small frames),
    plus sensor grain (Gaussian, sigma 3 levels, different every frame). Everything an encoder can predict moves,
    and the grain is what it cannot: bitrate and decoding cost like filmed video, not like flat synthetic shapes.
    Yields uint8 [height, width, 3]."""
    rng = np.random.default_rng(seed + 1)
    scale = 2 if height * width <= 640 * 360 else 1
    tex_h, tex_w = (4 if scale == 2 else 2) * scale * height, (4 if scale == 2 else 2) * scale * width
    texture = pink_texture(tex_h, tex_w, seed).astype(np.uint16)
    texture = np.pad(texture, ((0, scale * height), (0, scale * width), (0, 0)), mode="wrap")  # crops wrap around
    grain = np.rint(rng.normal(0, 3.0, (8, height, width, 1))).astype(np.int16)
    y = x = 0.0
    for t in range(num_frames):
        x = (x + scale * (1.3 * np.sin(t / 97) + 0.7 * np.sin(t / 23 + 1))) % tex_w
        y = (y + scale * (0.9 * np.cos(t / 131) + 0.4 * np.sin(t / 17))) % tex_h
        crop = texture[int(y) : int(y) + scale * height, int(x) : int(x) + scale * width]
        if scale == 2:
            crop = (crop[0::2, 0::2] + crop[1::2, 0::2] + crop[0::2, 1::2] + crop[1::2, 1::2] + 2) >> 2
        noise = np.roll(grain[t % 8], (7 * t) % height, 0)  # 8 fields, shifted: no two frames share their grain
        yield np.clip(crop.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def clip_path(folder: Path, name: str, spec: dict) -> Path:
    """The clip, generated into `folder` unless already there (the name records what it holds)."""
    # The test kits, imported as the tests import them: a `tests` package installed elsewhere (latex2sympy2, an
    # lmms-eval dependency, ships one) would hide `tests.helpers`.
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from helpers import write_clip

    height, width = spec["size"]
    gop = spec.get("gop", 250)
    bframes = 3 if spec["suffix"] == ".mp4" else 0  # h264's; VP9 has none (libvpx's alt-ref frames instead)
    open_gop = spec.get("open_gop", False)
    tile = spec.get("tile_seconds")
    crf = spec.get("crf", 23)
    path = folder / (
        f"{name}_{CONTENT}_gop{gop}{'open' if open_gop else ''}_bf{bframes}_crf{crf}_{PRESET}"
        f"{f'_tile{tile}s' if tile else ''}{spec['suffix']}"
    )
    if not path.exists():
        partial = path.with_name(path.stem + ".partial" + path.suffix)
        start = time.perf_counter()
        seconds = tile or spec["seconds"]
        frames = camera_frames(seconds * RATE, height, width)
        options = {"rate": RATE, "bframes": bframes, "gop": gop, "open_gop": open_gop, "crf": crf, "preset": PRESET}
        if tile:
            segment = path.with_name(path.stem + ".segment" + path.suffix)
            write_clip(segment, frames, **options)
            repeat_clip(segment, partial, spec["seconds"] // tile)
            segment.unlink()
        else:
            write_clip(partial, frames, **options)
        partial.rename(path)
        print(
            f"  generated {path.name} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.0f} s",
            file=sys.stderr,
        )
    return path


def repeat_clip(source: Path, target: Path, times: int) -> None:
    """Write `source` `times` times over into `target`, one after the other (packets copied, timestamps shifted):
    every GOP stays a real encoded one. `source` must start with a keyframe that references nothing before it."""
    import av

    with av.open(str(source)) as src:
        stream = src.streams.video[0]
        packets = [(p, p.pts, p.dts) for p in src.demux(stream) if p.size]
        span = max(pts + (p.duration or 0) for p, pts, _ in packets) - min(pts for _, pts, _ in packets)
        with av.open(str(target), "w") as out:
            out_stream = out.add_stream_from_template(stream)
            for k in range(times):
                for packet, pts, dts in packets:  # the muxer rescales packets in place: set all from the originals
                    packet.time_base = stream.time_base
                    packet.pts, packet.dts = pts + k * span, dts + k * span
                    packet.stream = out_stream
                    out.mux(packet)


def forward_decode_cost(path: Path, max_frames: int = 3000) -> dict:
    """What decoding this clip costs: a plain forward decode of its first frames (PyAV's default threading, no RGB
    conversion), frames per second and microseconds a frame, and the clip's bitrate."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        cpu_before, start, count = cpu_seconds(), time.perf_counter(), 0
        for _ in container.decode(stream):
            count += 1
            if count >= max_frames:
                break
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_before
        duration = float(stream.duration * stream.time_base) if stream.duration else container.duration / 1e6
    return {
        "frames": count,
        "frames_per_second": count / seconds,
        "us_per_frame": 1e6 * seconds / count,
        "cpu_us_per_frame": 1e6 * cpu / count,
        "kbit_per_second": path.stat().st_size * 8 / duration / 1000 if duration else None,
    }


# ---------------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------------


def old_forward_only_read_video_pyav(path, num_frames):
    """The reader this project shipped before issue 15, kept as the baseline: a demux pass for the frame times,
    then one decode from the start up to the last sampled frame (no seeking, PyAV's default threading)."""
    import av

    from video_stgridpool import sample_frame_indices

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        times = []
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            pts = packet.pts if packet.pts is not None else packet.dts
            times.append(Fraction(pts) * stream.time_base)
        times.sort()
        indices = sample_frame_indices(len(times), num_frames)
        wanted = {}
        for position, index in enumerate(indices):
            wanted.setdefault(index, []).append(position)
        out = [None] * len(indices)
        container.seek(0)
        decoded = 0
        for frame in container.decode(stream):
            if decoded in wanted:
                image = frame.to_ndarray(format="rgb24")
                for position in wanted[decoded]:
                    out[position] = image
            decoded += 1
            if decoded > indices[-1]:
                break
    return np.stack(out), indices


def plain_keyframe_seek_reader(path, num_frames):
    """For each sampled frame: seek to the keyframe at or before its timestamp, decode until it (threads on)."""
    import av

    from video_stgridpool import sample_frame_indices

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        pts = sorted(p.pts for p in container.demux(stream) if p.size)
        indices = sample_frame_indices(len(pts), num_frames)
        out = []
        for index in indices:
            container.seek(pts[index], stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.pts >= pts[index]:
                    out.append(frame.to_ndarray(format="rgb24"))
                    break
    return np.stack(out), indices


def ours_reader(path, num_frames):
    from video_stgridpool import read_video_pyav

    video, metadata = read_video_pyav(path, num_frames=num_frames)
    return video, [int(i) for i in metadata.frames_indices]


def ours_one_thread_reader(path, num_frames):
    """`ours` held to one decoding thread (its thread count patched to 1): what the parallel runs buy, same run. The
    patch is undone after the read (`--smoke` runs every reader in one process)."""
    import video_stgridpool

    decoding_threads = video_stgridpool._decoding_threads
    video_stgridpool._decoding_threads = lambda: 1
    try:
        return ours_reader(path, num_frames)
    finally:
        video_stgridpool._decoding_threads = decoding_threads


def extract_shipped() -> Path:
    """The Hub modules the shipped reader needs, as at commit SHIPPED, written into SHIPPED_DIR (git show) unless
    already there (a copy without the repository's history, e.g. on another machine, brings them along)."""
    SHIPPED_DIR.mkdir(parents=True, exist_ok=True)
    for name in ("processing_stgridpool.py", "configuration_stgridpool.py"):
        if (SHIPPED_DIR / name).is_file():
            continue
        source = subprocess.run(
            ["git", "show", f"{SHIPPED}:{name}"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        (SHIPPED_DIR / name).write_text(source)
    return SHIPPED_DIR


def shipped_module():
    """`processing_stgridpool` as shipped at commit SHIPPED, imported from SHIPPED_DIR under another name (its
    `configuration_stgridpool` from there too: first on sys.path)."""
    import importlib.util

    if "shipped_processing" not in sys.modules:
        sys.path.insert(0, str(SHIPPED_DIR))
        spec = importlib.util.spec_from_file_location("shipped_processing", SHIPPED_DIR / "processing_stgridpool.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["shipped_processing"] = module
    return sys.modules["shipped_processing"]


def shipped_reader(path, num_frames):
    video, metadata = shipped_module().read_video_pyav(path, num_frames=num_frames)
    return video, [int(i) for i in metadata.frames_indices]


def probe_reader(path, num_frames):
    import av

    from video_stgridpool import _index_video

    with av.open(str(path)) as container:
        index = _index_video(container, container.streams.video[0])
    return None, list(range(len(index.pts)))


def decord_reader(path, num_frames):
    from decord import VideoReader, cpu

    from video_stgridpool import sample_frame_indices

    reader = VideoReader(str(path), ctx=cpu(0))
    indices = sample_frame_indices(len(reader), num_frames)
    return reader.get_batch(indices).asnumpy(), indices


def torchcodec_reader(path, num_frames):
    from torchcodec.decoders import VideoDecoder

    from video_stgridpool import sample_frame_indices

    decoder = VideoDecoder(str(path), seek_mode="exact", dimension_order="NHWC")
    indices = sample_frame_indices(decoder.metadata.num_frames, num_frames)
    return decoder.get_frames_at(indices).data.numpy(), indices


READER_FUNCTIONS = {
    "ours": ours_reader,
    "ours_one_thread": ours_one_thread_reader,
    "shipped_21afcdb": shipped_reader,
    "plain_keyframe_seek": plain_keyframe_seek_reader,
    "old_forward_only": old_forward_only_read_video_pyav,
    "decord": decord_reader,
    "torchcodec": torchcodec_reader,
    "probe": probe_reader,
}


def available(reader: str) -> str | None:
    """None if `reader` can run here, else why not."""
    module = {"decord": "decord", "torchcodec": "torchcodec.decoders"}.get(reader)
    if module is None:
        return None
    try:
        __import__(module)
    except Exception as error:  # noqa: BLE001  (torchcodec raises RuntimeError/OSError without FFmpeg's libraries)
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return None


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads: the work done, less sensitive than wall time to other
    processes on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def run_reader(reader: str, path: Path, num_frames: int) -> dict:
    """Time one read (imports done first) -> seconds, indices, per-frame hashes, RSS."""
    function = READER_FUNCTIONS[reader]
    import av  # noqa: F401  (imports outside the timed region)

    if reader == "shipped_21afcdb":
        shipped_module()
    else:
        import video_stgridpool  # noqa: F401
    if reader in ("decord", "torchcodec"):
        available(reader)
    rss_before = max_rss_mb()
    cpu_before = cpu_seconds()
    start = time.perf_counter()
    video, indices = function(path, num_frames)
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_before
    hashes = (
        [hashlib.sha1(np.ascontiguousarray(frame).tobytes()).hexdigest()[:16] for frame in video]
        if (video is not None)
        else []
    )
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "indices": indices if reader not in INDEX_READERS else len(indices),
        "hashes": hashes,
        "rss_before_mb": rss_before,
        "peak_rss_mb": max_rss_mb(),
        "shape": list(video.shape) if video is not None else None,
    }


def run_repeated(reader: str, path: Path, num_frames: int, repeat: int) -> list[dict]:
    """`repeat` reads in this process (fewer after one that takes over 20 s)."""
    runs = []
    for _ in range(repeat):
        runs.append(run_reader(reader, path, num_frames))
        if runs[-1]["seconds"] > 20:
            break
    return runs


def run_in_subprocess(reader: str, path: Path, num_frames: int, repeat: int) -> list[dict] | dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench_decode",
        "--worker",
        reader,
        str(path),
        str(num_frames),
        str(repeat),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit {result.returncode}"]
        errors = [line for line in lines if "Error: " in line and not line.startswith(" ")]
        return {"error": (errors or lines)[-1][:300]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def neighbours_exactness(path: Path, indices: list[int], hashes: list[str], total: int, reach: int = 3) -> dict:
    """For frames another reader returned at `indices`: which frame of a full sequential decode each one is
    (offset from the index asked for, within +-reach; None if none is bit-identical)."""
    from video_stgridpool import read_video_pyav

    window = sorted({j for i in indices for j in range(max(0, i - reach), min(total, i + reach + 1))})
    video, _ = read_video_pyav(path, sample_indices_fn=lambda metadata: window)
    truth = {j: hashlib.sha1(frame.tobytes()).hexdigest()[:16] for j, frame in zip(window, video)}
    offsets = []
    for index, digest in zip(indices, hashes):
        match = [j - index for j in range(index - reach, index + reach + 1) if truth.get(j) == digest]
        offsets.append(min(match, key=abs) if match else None)
    return {
        "exact": sum(o == 0 for o in offsets),
        "off_by_frames": sum(o not in (0, None) for o in offsets),
        "no_bit_identical_frame_nearby": sum(o is None for o in offsets),
        "offsets": offsets,
    }


def versions() -> dict:
    import av

    out = {
        "python": platform.python_version(),
        "av": av.__version__,
        "ffmpeg_libavcodec": ".".join(map(str, av.library_versions["libavcodec"])),
        "numpy": np.__version__,
    }
    for name in ("decord", "torchcodec"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001  (any failure: not usable here)
            out[name] = None
    return out


def machine() -> dict:
    from video_stgridpool import _decoding_threads

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "decoding_threads": _decoding_threads(),  # the most `ours` starts
        "processor": platform.processor(),
    }


def compare_shipped(clips: dict, folder: Path, rounds: int) -> dict:
    """`ours` against `shipped_21afcdb`: `rounds` rounds, each reader once a round in a fresh process (one read), the
    order alternating from round to round; per reader the median seconds, and the ratio ours / shipped."""
    results = {"machine": machine(), "versions": versions(), "shipped_commit": SHIPPED, "rounds": rounds, "clips": {}}
    for name, spec in clips.items():
        path = clip_path(folder, name, spec)
        runs = {"ours": [], "shipped_21afcdb": []}
        for round_ in range(rounds):
            for reader in sorted(runs, reverse=round_ % 2 == 1):
                load = os.getloadavg()[0]
                result = run_in_subprocess(reader, path, spec["num_frames"], 1)
                if isinstance(result, dict):
                    raise SystemExit(f"{name} {reader}: {result['error']}")
                runs[reader].append({**result[0], "load_average_1min": load})
        row = {"spec": {**spec, "size": list(spec["size"])}, "file": path.name, "bytes": path.stat().st_size}
        for reader, reader_runs in runs.items():
            seconds = [run["seconds"] for run in reader_runs]
            row[reader] = {
                "seconds": statistics.median(seconds),
                "seconds_all": seconds,
                "cpu_seconds": statistics.median(run["cpu_seconds"] for run in reader_runs),
                "peak_rss_mb": max(run["peak_rss_mb"] for run in reader_runs),
                "load_average_1min": [run["load_average_1min"] for run in reader_runs],
                "indices": reader_runs[0]["indices"][:4] + ["..."] + reader_runs[0]["indices"][-2:],
            }
        ours, shipped = runs["ours"], runs["shipped_21afcdb"]
        row["same_frames"] = all(a["hashes"] == b["hashes"] for a, b in zip(ours, shipped))
        row["ours_over_shipped"] = row["ours"]["seconds"] / row["shipped_21afcdb"]["seconds"]
        results["clips"][name] = row
        print(
            f"  {name}: ours {row['ours']['seconds']:.3f} s, shipped {row['shipped_21afcdb']['seconds']:.3f} s "
            f"(medians of {rounds}): ours / shipped = {row['ours_over_shipped']:.2f}; same frames {row['same_frames']}",
            file=sys.stderr,
        )
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips-dir", type=Path, default=None, help="where clips are generated/reused (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny clips, in-process: seconds (CI)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="reads per (reader, clip), in one process; 1 after a read over 20 s"
    )
    parser.add_argument(
        "--readers",
        default=",".join(name for name in READERS + INDEX_READERS if name != "shipped_21afcdb"),
        help=f"comma-separated reader names (default: all but shipped_21afcdb): {', '.join(READER_FUNCTIONS)}",
    )
    parser.add_argument(
        "--compare-shipped", type=int, metavar="N", help="N rounds of ours against shipped_21afcdb (see above)"
    )
    parser.add_argument("--clips", default=None, help="comma-separated clip names (default: all)")
    parser.add_argument("--worker", nargs=4, metavar=("READER", "PATH", "NUM_FRAMES", "REPEAT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        reader, path, num_frames, repeat = args.worker
        print(json.dumps(run_repeated(reader, Path(path), int(num_frames), int(repeat))))
        return 0

    clips = SMOKE_CLIPS if args.smoke else FULL_CLIPS
    if args.clips:
        unknown = [name for name in args.clips.split(",") if name not in clips]
        if unknown:
            parser.error(f"--clips {args.clips}: no clip named {unknown[0]}; allowed: {', '.join(clips)}")
        clips = {name: clips[name] for name in args.clips.split(",")}
    readers = args.readers.split(",")
    unknown = [name for name in readers if name not in READER_FUNCTIONS]
    if unknown:
        parser.error(f"--readers {args.readers}: no reader named {unknown[0]}; allowed: {', '.join(READER_FUNCTIONS)}")
    repeat = 1 if args.smoke else args.repeat
    folder = args.clips_dir or Path(tempfile.mkdtemp(prefix="bench_decode_"))
    folder.mkdir(parents=True, exist_ok=True)
    if "shipped_21afcdb" in readers or args.compare_shipped:
        extract_shipped()
    if args.compare_shipped:
        results = compare_shipped(clips, folder, args.compare_shipped)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1) + "\n")
        return 0
    results = {
        "machine": machine(),
        "versions": versions(),
        "smoke": args.smoke,
        "clips": {},
        "errors": [],
    }
    skipped = {reader: why for reader in readers if (why := available(reader))}
    results["skipped_readers"] = skipped
    for name, spec in clips.items():
        path = clip_path(folder, name, spec)
        row = {"spec": {**spec, "size": list(spec["size"])}, "file": path.name, "bytes": path.stat().st_size}
        row["forward_decode"] = forward_decode_cost(path, 250 if args.smoke else 3000)
        row["readers"] = {}
        for reader in readers:
            if reader in skipped:
                continue
            load_before = os.getloadavg()[0]  # other processes on a shared machine take cores from the threads
            if args.smoke:
                runs = run_repeated(reader, path, spec["num_frames"], repeat)
            else:
                runs = run_in_subprocess(reader, path, spec["num_frames"], repeat)
            load_average = [load_before, os.getloadavg()[0]]
            if isinstance(runs, dict):  # the worker failed
                results["errors"].append(f"{name} {reader}: {runs['error']}")
                if reader in ("decord", "torchcodec"):  # it does not work here: not tried on other clips
                    skipped[reader] = runs["error"]
                continue
            if not runs:
                continue
            entry = dict(runs[0])
            entry["seconds_all"] = [r["seconds"] for r in runs]
            entry["seconds"] = statistics.median(entry["seconds_all"])
            entry["cpu_seconds"] = statistics.median(r["cpu_seconds"] for r in runs)
            entry["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
            entry["load_average_1min"] = load_average  # before and after the reads
            row["readers"][reader] = entry
            print(
                f"  {name:22s} {reader:20s} {entry['seconds']:8.2f} s  cpu {entry['cpu_seconds']:8.2f} s  "
                f"peak RSS {entry['peak_rss_mb']:7.0f} MB  load {load_average[0]:.2f} -> {load_average[1]:.2f}",
                file=sys.stderr,
            )
        truth = row["readers"].get("old_forward_only")
        for reader, entry in row["readers"].items():
            if truth is None or reader == "old_forward_only" or reader in INDEX_READERS:
                continue
            entry["same_indices_as_old"] = entry["indices"] == truth["indices"]
            entry["bit_identical_to_sequential_decode"] = entry["hashes"] == truth["hashes"]
            if not entry["bit_identical_to_sequential_decode"] and entry["same_indices_as_old"]:
                total = row["readers"]["probe"]["indices"] if "probe" in row["readers"] else None
                if total:
                    entry["frame_identity"] = neighbours_exactness(path, entry["indices"], entry["hashes"], total)
        for entry in row["readers"].values():
            entry.pop("hashes", None)
            if isinstance(entry.get("indices"), list) and len(entry["indices"]) > 8:
                entry["indices"] = entry["indices"][:4] + ["..."] + entry["indices"][-2:]
        results["clips"][name] = row
    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def print_table(results: dict) -> None:
    readers = [r for r in READERS + INDEX_READERS if any(r in row["readers"] for row in results["clips"].values())]
    print("| clip | frames | " + " | ".join(readers) + " |")
    print("|---|---:|" + "---:|" * len(readers))
    for name, row in results["clips"].items():
        cells = []
        for reader in readers:
            entry = row["readers"].get(reader)
            if entry is None:
                cells.append("n/a")
                continue
            exact = entry.get("bit_identical_to_sequential_decode")
            mark = "" if exact in (None, True) else " (not exact)"
            cells.append(
                f"{entry['seconds']:.2f} s ({entry['cpu_seconds']:.2f} cpu), {entry['peak_rss_mb']:.0f} MB{mark}"
            )
        print(f"| {name} | {row['spec']['num_frames']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
