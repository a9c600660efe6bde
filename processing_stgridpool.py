"""ST-GridPool processor: LLaVA-OneVision's processor, emitting as many <video> placeholders as the model makes.

Only the video token count and video decoding change; images, text and chat templates stay stock. The count comes
from `configuration_stgridpool` (the same functions the model's config uses), so the two agree for the same settings.

Video files: stock Transformers (5.17 .. 5.24) decodes video paths in `BaseVideoProcessor.fetch_videos`, with
torchcodec only (it needs system FFmpeg libraries and fails on a plain pip install). `STGridPoolVideoProcessor`
overrides that one method, in both versions, to decode with PyAV (its wheels bundle FFmpeg): `read_video_pyav` below,
a pure function that samples frames uniformly over the video's *duration* by presentation timestamps (exactly the
stock `arange(n) * total // n` indices for constant frame rate; evenly spaced in time for variable frame rate) and
applies the rotation metadata. It indexes the file without decoding (an mp4/mov from its sample tables, checked
against its first GOPs and FFmpeg's own index; other files by demuxing every packet), then seeks to the keyframe
before a sampled frame when that skips work, so sampling a long video costs about one GOP of decoding per sampled
frame, not the whole video, and those decoding runs are shared among threads (one container each) on a machine with
several cores; the frames are those a full sequential decode shows, bit for bit. torchcodec is used only when asked for
(`video_decoder="torchcodec"`). PyAV is imported when a file is decoded, so a repo's remote code loads without it.
"""

import bisect
import dataclasses
import errno
import functools
import importlib
import itertools
import math
import operator
import os
import stat
import struct
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import numpy as np
from transformers import LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor
from transformers.video_utils import VideoMetadata

try:  # inside a Hub repo, loaded by Transformers' remote-code loader
    from .configuration_stgridpool import GEOMETRY_FIELDS, VideoPoolingSettings
except ImportError:  # installed as top-level modules of this project
    from configuration_stgridpool import GEOMETRY_FIELDS, VideoPoolingSettings


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
    _check_num_frames_and_fps(num_frames, None, "sample_frame_indices")
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
    _check_num_frames_and_fps(num_frames, fps, "sample_frame_times")
    if fps is not None:
        num_frames = max(1, int((end_time - frame_times[0]) * Fraction(fps)))
    if num_frames is None or num_frames >= total:
        return sample_frame_indices(total, num_frames)
    start, span = frame_times[0], end_time - frame_times[0]
    instants = (start + span * Fraction(j, num_frames) for j in range(num_frames))
    return [max(bisect.bisect_right(frame_times, instant) - 1, 0) for instant in instants]


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


@dataclasses.dataclass
class _StreamIndex:
    """What one demux-only pass (no decoding) tells about a video stream; frame i is the i-th a full decode shows.
    An mp4's sample tables give the same (`_index_stream`)."""

    pts: list[int]  # presentation timestamps of the frames, in the stream's time base, ascending
    times: _FrameTimes  # the same in seconds, exact
    end_time: Fraction  # when the last frame stops being shown, seconds
    keyframes: list[int]  # indices of the frames whose packets are keyframes (decoding can start there), ascending
    keyframe_dts: dict[int, int | None]  # keyframe index -> its packet's decoding timestamp
    matchable: bool  # every frame has its own timestamp: after a seek, decoded frames are matched by timestamp

    def frame_at(self, pts: int) -> int | None:
        """The index of the frame with presentation timestamp `pts`, or None where no frame has it."""
        at = bisect.bisect_left(self.pts, pts)
        return at if at < len(self.pts) and self.pts[at] == pts else None


def _probe_stream(container, stream) -> _StreamIndex:
    """Index the video stream by demuxing it (packets only, nothing decoded).

    Packets the decoder drops (the discard flag, e.g. outside an mp4 edit list) are not frames. Packets without a
    timestamp are counted at the previous one's time (and disable seeking: frames could not be told apart)."""
    raw, keys = [], []  # keys: (pts, dts) of keyframe packets
    last_pts, last_duration = None, 0  # the frame shown last, and for how long
    matchable = True
    # One pass over up to ~100,000 packets (an hour at 25 fps): integers only, nothing per packet it can do without.
    for packet in container.demux(stream):
        if not packet.size or getattr(packet, "is_discard", False):  # the flush packet at the end; frames dropped
            continue
        pts = packet.pts
        if pts is None:
            pts = packet.dts
            if pts is None:
                matchable = False
                pts = raw[-1] if raw else 0
        raw.append(pts)
        if last_pts is None or pts >= last_pts:
            last_pts, last_duration = pts, packet.duration
        if packet.is_keyframe:
            keys.append((pts, packet.dts))
    return _index_from_packets(stream, raw, last_duration, keys, matchable)


def _index_from_packets(stream, raw: list[int], last_duration: int | None, keys: list, matchable: bool) -> _StreamIndex:
    """The index made from the frames' packets, in demuxing order: `raw` their pts; `last_duration` the duration of
    the last packet with the greatest pts (0 or None: unknown); `keys` (pts, dts) of the keyframe packets;
    `matchable` False where some packet had no timestamp."""
    time_base = stream.time_base or Fraction(1, 1)
    if not raw:
        return _StreamIndex([], _FrameTimes([], time_base), Fraction(0), [], {}, False)
    pts = sorted(raw)
    last = last_duration or 0
    if last <= 0:  # no packet duration: the median gap, or the average rate
        gaps = sorted(b - a for a, b in itertools.pairwise(pts) if b > a)
        rate = stream.average_rate or stream.guessed_rate
        last = gaps[len(gaps) // 2] if gaps else 1 / ((Fraction(rate) if rate else 30) * time_base)
    matchable = matchable and all(map(operator.lt, pts, itertools.islice(pts, 1, None)))  # distinct
    keyframe_dts = {bisect.bisect_left(pts, p): dts for p, dts in keys}
    end_time = (pts[-1] + last) * time_base
    return _StreamIndex(pts, _FrameTimes(pts, time_base), end_time, sorted(keyframe_dts), keyframe_dts, matchable)


# ---------------------------------------------------------------------------------------------------------------
# MP4/MOV: the same index from the file's sample tables, without demuxing every packet
# ---------------------------------------------------------------------------------------------------------------
# FFmpeg's mov demuxer (libavformat/mov.c) indexes a track from its sample tables when it opens the file
# (mov_build_index, mov_fix_index) and makes one packet per index entry, in order (mov_read_packet): dts = the
# sample's decoding time (its stts deltas summed) moved by the edit list, pts = dts + its ctts offset, duration = its
# stts delta, size and place in the file from stsz, stsc and stco; keyframe = listed in stss (every sample without
# stss; h264 packets get the flag from FFmpeg's h264 parser instead); discard = shown before the edit starts. With no
# edit list, or one edit (after an optional empty one, a start delay) that starts in the first GOP and lasts to the
# end, FFmpeg keeps every sample once, in order, moved by one constant. So `_mp4_packets` computes every packet from
# the tables with numpy, the constant is read off the first packet demuxed, and before the result is used the first
# GOPs are demuxed and compared with it field by field, as are about a thousand of FFmpeg's own index entries spread
# over the file where PyAV exposes them (`Stream.index_entries`, PyAV 18): `_index_stream`. Every other layout is
# refused (`_NotIndexable`) and demuxed packet by packet.
MOV_DEMUXER = "mov,mp4,m4a,3gp,3g2,mj2"
AVINDEX_KEYFRAME, AVINDEX_DISCARD_FRAME = 1, 2  # AVIndexEntry flags (libavformat/avformat.h)
MP4_CHECKED_PACKETS = (300, 3000)  # the first packets demuxed and compared: at least and at most this many
MP4_CHECKED_ENTRIES = 1024  # FFmpeg's index entries compared, evenly spread (about 0.3 ms)


class _NotIndexable(Exception):
    """An mp4 whose sample tables are not known to give exactly what demuxing it gives; the message says why."""


@dataclasses.dataclass(frozen=True)
class _SampleTables:
    """A video track's sample tables (ISO/IEC 14496-12 boxes) as FFmpeg reads them; samples in decoding order."""

    timescale: int  # mdhd: ticks per second (the stream's time base is 1 / timescale)
    sizes: np.ndarray  # int64 [n], stsz: bytes of each sample
    positions: np.ndarray  # int64 [n], stco/co64 and stsc: where each sample's bytes start in the file
    durations: np.ndarray  # int64 [n], stts: ticks each sample lasts
    decode_times: np.ndarray  # int64 [n], the durations summed: when each sample is decoded, from 0
    offsets: np.ndarray  # int64 [n], ctts: pts - dts of each sample, ticks (zeros without ctts)
    sync: np.ndarray  # bool [n], stss: sync samples, where decoding can start (all without stss)
    edit_start: int  # ticks: the media time the edit list starts showing at (0 without one)


@dataclasses.dataclass(frozen=True)
class _Packets:
    """What demuxing a stream gives, packet by packet in demuxing order (timestamps in the stream's time base)."""

    pts: np.ndarray  # int64 [n]
    dts: np.ndarray  # int64 [n]
    durations: np.ndarray  # int64 [n]
    sizes: np.ndarray  # int64 [n], bytes
    positions: np.ndarray  # int64 [n], byte in the file
    keyframe: np.ndarray  # bool [n]
    discard: np.ndarray  # bool [n]: dropped by the decoder (shown before the edit list starts)


def _boxes(data: bytes, start: int = 0, end: int | None = None) -> dict[bytes, list[tuple[int, int]]]:
    """The boxes laid end to end in data[start:end] -> {type: [(payload start, payload end), ...]}, in file order."""
    end = len(data) if end is None else end
    boxes: dict[bytes, list[tuple[int, int]]] = {}
    while start < end:
        kind, header, size = _box_header(data[start : start + 16], end - start)
        boxes.setdefault(kind, []).append((start + header, start + size))
        start += size
    return boxes


def _box_header(header: bytes, room: int) -> tuple[bytes, int, int]:
    """(type, header bytes, box bytes) of the box whose first 8 to 16 bytes are `header`, with `room` bytes for it
    in its parent (or the file). A size of 0 means the box runs to the end; 1, that a 64-bit size follows."""
    size, kind = _unpack(header, (0, len(header)), 0, ">I4s")
    length = 8
    if size == 1:
        (size,), length = _unpack(header, (0, len(header)), 8, ">Q"), 16
    elif size == 0:
        size = room
    if not length <= size <= room:
        raise _NotIndexable(f"a {kind!r} box of {size} bytes does not fit in the {room} bytes left for it")
    return kind, length, size


def _unpack(data: bytes, box: tuple[int, int], offset: int, fmt: str) -> tuple:
    """`struct.unpack` of big-endian `fmt` at `offset` into a box's payload, which must hold it."""
    start, end = box
    if offset + struct.calcsize(fmt) > end - start:
        raise _NotIndexable(f"a box at byte {start} is too short ({end - start} bytes)")
    return struct.unpack_from(fmt, data, start + offset)


def _only(boxes: dict, kind: bytes) -> tuple[int, int]:
    """The payload of the one box of type `kind` (FFmpeg takes the last of duplicates: refused)."""
    found = boxes.get(kind, [])
    if len(found) != 1:
        raise _NotIndexable(f"{len(found)} {kind.decode('latin-1')} boxes where one is expected")
    return found[0]


def _version(data: bytes, box: tuple[int, int]) -> int:
    """A full box's version (its first byte)."""
    return _unpack(data, box, 0, ">B")[0]


def _table(data: bytes, box: tuple[int, int], dtype: str, columns: int, skip: int = 0) -> np.ndarray:
    """A full box's table: after version, flags and `skip` bytes, an entry count, then that many rows of `columns`
    big-endian numbers of `dtype` -> int64 [rows, columns]. FFmpeg reads as many rows as the count says, past the box
    if it must: a box too short for them is refused."""
    (count,) = _unpack(data, box, 4 + skip, ">I")
    if 8 + skip + np.dtype(dtype).itemsize * columns * count > box[1] - box[0]:
        raise _NotIndexable(f"a table box at byte {box[0]} is shorter than its entry count ({count}) says")
    return np.frombuffer(data, dtype, columns * count, box[0] + 8 + skip).reshape(count, columns).astype(np.int64)


def _sample_positions(chunk_offsets: np.ndarray, stsc: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Where each sample's bytes start: samples fill chunks (at `chunk_offsets`) back to back, as many per chunk as
    the stsc row (first chunk counted from 1, samples per chunk, description) that covers the chunk says."""
    first_chunks = stsc[:, 0] - 1
    chunks_per_row = np.diff(np.append(first_chunks, len(chunk_offsets)))
    if not len(stsc) or first_chunks[0] != 0 or (chunks_per_row <= 0).any() or (stsc[:, 1] <= 0).any():
        raise _NotIndexable("stsc: its rows do not cover the chunks in order")
    per_chunk = np.repeat(stsc[:, 1], chunks_per_row)
    if per_chunk.sum() != len(sizes):
        raise _NotIndexable(f"stsc puts {per_chunk.sum()} samples in chunks, stsz counts {len(sizes)}")
    chunk = np.repeat(np.arange(len(chunk_offsets)), per_chunk)
    before = np.cumsum(sizes) - sizes  # bytes of the samples before each one, over all chunks
    return chunk_offsets[chunk] + before - before[(np.cumsum(per_chunk) - per_chunk)[chunk]]


def _mp4_sample_tables(moov: bytes, track_id: int, samples: int) -> _SampleTables:
    """The sample tables of track `track_id` in `moov` (the moov box's payload), where FFmpeg makes that track's
    packets from them alone, one per sample, in order; `samples`: how many entries FFmpeg's index of it has.

    Raises _NotIndexable, naming the reason, for: a fragmented file (mvex: samples in moof boxes); a track not found
    exactly once, or not video; several sample descriptions (stsd: packets then change codec parameters); tables that
    do not count `samples` samples (checked before any per-sample array is made, so a table's count cannot ask for
    more memory than FFmpeg's index already holds); stts durations of 0 (FFmpeg guesses
    one) or over 2^31 - 1 ticks (FFmpeg rewrites those); negative composition offsets (FFmpeg then shifts dts);
    compact stz2 sizes; a first sample that is not a sync sample, an empty stss (FFmpeg then finds keyframes itself),
    or keyframes from elsewhere than stss (stps, sample groups); and edit lists other than one edit at normal rate,
    optionally after one empty edit (a start delay), that starts before the second sync sample and lasts to the end:
    otherwise FFmpeg's index may drop or repeat samples."""
    moov_boxes = _boxes(moov)
    if b"mvex" in moov_boxes:
        raise _NotIndexable("fragmented (mvex): samples live in movie fragments")
    traks = []
    for trak in moov_boxes.get(b"trak", []):
        boxes = _boxes(moov, *trak)
        tkhd = _only(boxes, b"tkhd")
        if _unpack(moov, tkhd, 20 if _version(moov, tkhd) == 1 else 12, ">I") == (track_id,):
            traks.append(boxes)
    if len(traks) != 1:
        raise _NotIndexable(f"{len(traks)} tracks with id {track_id}")
    trak = traks[0]
    mdia = _boxes(moov, *_only(trak, b"mdia"))
    if _unpack(moov, _only(mdia, b"hdlr"), 8, ">4s") != (b"vide",):
        raise _NotIndexable("not a video track")
    mdhd = _only(mdia, b"mdhd")
    (timescale,) = _unpack(moov, mdhd, 20 if _version(moov, mdhd) == 1 else 12, ">I")
    stbl = _boxes(moov, *_only(_boxes(moov, *_only(mdia, b"minf")), b"stbl"))

    if _unpack(moov, _only(stbl, b"stsd"), 4, ">I") != (1,):
        raise _NotIndexable("not exactly one sample description (stsd)")
    for kind, why in [(b"stz2", "compact sample sizes"), (b"stps", "partial sync samples"), (b"sbgp", "sample groups")]:
        if kind in stbl:
            raise _NotIndexable(f"{why} ({kind.decode()})")
    stsz = _only(stbl, b"stsz")
    constant_size, count = _unpack(moov, stsz, 4, ">II")
    if count != samples:
        raise _NotIndexable(f"stsz counts {count} samples, FFmpeg's index {samples}")
    stts = _table(moov, _only(stbl, b"stts"), ">u4", 2)  # rows: (sample count, duration)
    if stts[:, 0].sum() != count or (stts[:, 1] == 0).any() or (stts[:, 1] > 2**31 - 1).any():
        raise _NotIndexable("stts: its sample count is not stsz's, or a duration of 0 or over 2^31 - 1")
    sizes = np.full(count, constant_size, np.int64) if constant_size else _table(moov, stsz, ">u4", 1, skip=4)[:, 0]
    offsets = np.zeros(count, np.int64)
    ctts = _table(moov, _only(stbl, b"ctts"), ">i4", 2) if b"ctts" in stbl else None  # FFmpeg reads both signed
    if ctts is not None and len(ctts):  # an empty ctts is no ctts to FFmpeg
        if ctts[:, 0].sum() != count or (ctts < 0).any():
            raise _NotIndexable("ctts: its sample count is not stsz's, or negative entries")
        offsets = np.repeat(ctts[:, 1], ctts[:, 0])
    sync = np.ones(count, bool)
    if b"stss" in stbl:
        listed = _table(moov, _only(stbl, b"stss"), ">u4", 1)[:, 0] - 1  # sample numbers count from 1
        if not len(listed) or (listed < 0).any() or (listed >= count).any():
            raise _NotIndexable("stss: empty, or a sample number out of range")
        sync[:] = False
        sync[listed] = True
    if not count or not sync[0]:
        raise _NotIndexable("no samples, or the first is not a sync sample")
    if b"co64" in stbl:
        chunk_offsets = _table(moov, _only(stbl, b"co64"), ">u8", 1)[:, 0]
    else:
        chunk_offsets = _table(moov, _only(stbl, b"stco"), ">u4", 1)[:, 0]
    positions = _sample_positions(chunk_offsets, _table(moov, _only(stbl, b"stsc"), ">u4", 3), sizes)
    durations = np.repeat(stts[:, 1], stts[:, 0])
    decode_times = np.cumsum(durations) - durations

    edits = []
    if b"edts" in trak:
        elst = _only(_boxes(moov, *_only(trak, b"edts")), b"elst")
        fmt = ">QqI" if _version(moov, elst) == 1 else ">IiI"  # segment duration, media time, rate
        (entries,) = _unpack(moov, elst, 4, ">I")
        if 8 + entries * struct.calcsize(fmt) != elst[1] - elst[0]:
            raise _NotIndexable("elst: its size does not match its entry count")  # FFmpeg recounts
        edits = [_unpack(moov, elst, 8 + i * struct.calcsize(fmt), fmt) for i in range(entries)]
    if edits and edits[0][1] == -1:  # an empty edit first: the track starts that much later
        edits = edits[1:]
    if len(edits) > 1 or any(time < 0 or rate != 1 << 16 for _, time, rate in edits):  # rate: 16.16 fixed point
        raise _NotIndexable(f"an edit list other than one edit at normal rate (after any empty one): {edits[:4]}")
    edit_start = edits[0][1] if edits else 0
    if edits:  # what FFmpeg's mov_fix_index keeps of the samples, for one edit: all of them, or refused
        mvhd = _only(moov_boxes, b"mvhd")
        (movie_timescale,) = _unpack(moov, mvhd, 20 if _version(moov, mvhd) == 1 else 12, ">I")
        length = (edits[0][0] * timescale + movie_timescale // 2) // max(movie_timescale, 1)  # av_rescale rounds
        shown = decode_times + offsets
        # It starts at the last sync sample decoded and shown by the edit's start: the first sample, or some dropped.
        starts = np.flatnonzero(sync & (decode_times <= edit_start) & (shown <= edit_start))
        if not len(starts) or starts[-1] != 0:
            raise _NotIndexable(f"the edit starts past the first GOP (at {edit_start} ticks)")
        # It marks frames shown after the edit's end discarded, and stops after the first sync sample shown up to
        # its end (the second, with composition offsets: B-frames may follow it); the last sample "lasts" the edit.
        lasting = np.append(durations[:-1], length)
        ends = np.flatnonzero(sync & (shown + lasting >= edit_start + length))
        stop = ends[1 if ctts is not None and len(ctts) else 0 :][:1]
        if (shown >= edit_start + length).any() or (len(stop) and stop[0] != count - 1):
            raise _NotIndexable(f"the edit ends before the last frame (at {edit_start + length} ticks)")
    return _SampleTables(timescale, sizes, positions, durations, decode_times, offsets, sync, edit_start)


def _read_moov(path: str, max_boxes: int = 1000) -> bytes:
    """The payload of the file's moov box, reading only the top-level box headers and that box (at the start of the
    file or after the media data). A fragmented file (moof boxes), none or several moov boxes, a box that runs past
    the end of the file (truncated) or more than `max_boxes` top-level boxes: _NotIndexable."""
    with open(path, "rb") as file:
        file_size, start, moov = os.fstat(file.fileno()).st_size, 0, []
        for _ in range(max_boxes):
            if start >= file_size:
                break
            file.seek(start)
            kind, length, size = _box_header(file.read(16), file_size - start)
            if kind == b"moof":
                raise _NotIndexable("fragmented (moof)")
            if kind == b"moov":
                moov.append((start + length, start + size))
            start += size
        else:
            raise _NotIndexable(f"more than {max_boxes} top-level boxes")
        if len(moov) != 1:
            raise _NotIndexable(f"{len(moov)} moov boxes")
        file.seek(moov[0][0])
        return file.read(moov[0][1] - moov[0][0])


def _mp4_tables(path: str, container, stream) -> _SampleTables | None:
    """The stream's sample tables where its packets can be computed from them (FFmpeg's mov demuxer, h264 or hevc
    video, nothing `_mp4_sample_tables` refuses, every sample's bytes in the file: a truncated file stops demuxing
    where its data does); else None.

    Only h264 and hevc: the generic demuxing layer passes their mp4 packets on unchanged (libavformat/demux.c,
    compute_pkt_fields: it leaves pts and dts alone when dts never decreases, and durations when they are positive),
    except that h264 keyframe flags come from FFmpeg's h264 parser, which reads each packet's data: they are checked
    to be the sync samples' in the first packets and taken to be so beyond. Where they are not, only where decoding
    starts can differ, never which frames come back: FFmpeg's mp4 seeks land on sync samples only, and the reader
    checks each landing packet's own flag."""
    context = stream.codec_context
    codec = context.name if context is not None else None  # None: FFmpeg has no decoder for it
    if container.format.name != MOV_DEMUXER or codec not in ("h264", "hevc"):
        return None
    if not hasattr(stream, "index_entries"):  # PyAV < 18: an older FFmpeg (PyAV 15's gives VFR packets other durations)
        return None
    try:
        tables = _mp4_sample_tables(_read_moov(path), stream.id, len(stream.index_entries))
    except (_NotIndexable, OSError):
        return None
    if stream.time_base != Fraction(1, tables.timescale or 1):
        return None
    if (tables.sizes <= 0).any() or (tables.positions < 0).any():
        return None
    if (tables.positions + tables.sizes).max() > os.path.getsize(path):
        return None
    return tables


def _mp4_packets(tables: _SampleTables, first_dts: int) -> _Packets:
    """The packets FFmpeg demuxes from a track with these tables, the first with decoding time `first_dts` (how far
    the edit list moves every timestamp: read off the first packet)."""
    dts = tables.decode_times + first_dts
    discard = tables.decode_times + tables.offsets < tables.edit_start  # shown before the edit starts
    return _Packets(dts + tables.offsets, dts, tables.durations, tables.sizes, tables.positions, tables.sync, discard)


def _first_packets_agree(demuxed: list[tuple], packets: _Packets) -> bool:
    """Whether the packets demuxed first, as (pts, dts, duration, size, keyframe, discard), are the first `packets`."""
    count = len(demuxed)
    columns = (packets.pts, packets.dts, packets.durations, packets.sizes, packets.keyframe, packets.discard)
    return count > 0 and demuxed == list(zip(*(column[:count].tolist() for column in columns)))


def _ffmpeg_index_agrees(stream, packets: _Packets) -> bool:
    """Whether FFmpeg's own index of the stream (`Stream.index_entries`, as many entries as `packets`: checked with
    the tables) has the same decoding time, size, place and flags at MP4_CHECKED_ENTRIES evenly spread entries (all
    of them would cost more than demuxing: PyAV makes an object per entry)."""
    entries, count = stream.index_entries, len(packets.dts)
    for i in np.unique(np.linspace(0, count - 1, MP4_CHECKED_ENTRIES).astype(np.int64)).tolist():
        entry = entries[i]
        flags = (packets.keyframe[i] * AVINDEX_KEYFRAME) | (packets.discard[i] * AVINDEX_DISCARD_FRAME)
        mine = (packets.dts[i], packets.sizes[i], packets.positions[i], flags)
        if (entry.timestamp, entry.size, entry.pos, entry.flags & (AVINDEX_KEYFRAME | AVINDEX_DISCARD_FRAME)) != mine:
            return False
    return True


def _index_from_mp4_packets(stream, packets: _Packets) -> _StreamIndex:
    """`_probe_stream`'s index, made from `packets` instead of a demux pass."""
    kept = ~packets.discard
    pts, dts, keyframe = packets.pts[kept], packets.dts[kept], packets.keyframe[kept]
    last = np.flatnonzero(pts == pts.max())[-1] if len(pts) else None  # the last packet with the greatest pts
    keys = list(zip(pts[keyframe].tolist(), dts[keyframe].tolist()))
    last_duration = int(packets.durations[kept][last]) if last is not None else 0
    return _index_from_packets(stream, pts.tolist(), last_duration, keys, True)


def _index_stream(av, path: str, container, stream) -> _StreamIndex:
    """The stream's index: from an mp4's sample tables where their packets (`_mp4_packets`) are those the first GOPs
    demux and FFmpeg's own index has, else by one demux-only pass over every packet (`_probe_stream`)."""
    tables = _mp4_tables(path, container, stream)
    if tables is None:
        return _probe_stream(container, stream)
    keyframes = np.flatnonzero(tables.sync)
    least, most = MP4_CHECKED_PACKETS
    count = min(len(tables.sizes), most, max(least, keyframes[2] + 16 if len(keyframes) > 2 else 0))
    demuxed = [
        (packet.pts, packet.dts, packet.duration, packet.size, packet.is_keyframe, packet.is_discard)
        for packet in itertools.islice(container.demux(stream), count)
    ]
    if demuxed and demuxed[0][1] is not None:
        packets = _mp4_packets(tables, demuxed[0][1])
        if _first_packets_agree(demuxed, packets) and _ffmpeg_index_agrees(stream, packets):
            return _index_from_mp4_packets(stream, packets)
    with _open(av, path) as fresh:  # the check demuxed the first packets: the pass starts from a fresh container
        return _probe_stream(fresh, fresh.streams.video[0])


def _rotate(image: np.ndarray, degrees_ccw: int) -> np.ndarray:
    """Apply a display rotation (counterclockwise degrees, multiple of 90) to an [H, W, 3] image."""
    return np.ascontiguousarray(np.rot90(image, k=round(degrees_ccw / 90) % 4)) if degrees_ccw else image


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


def _open(av, path: str):
    """Open `path` as a local file: `file:` and an absolute path, so FFmpeg never reads a name such as
    `concat:a.mp4|b.mp4` or `http:x` as a protocol URL."""
    return av.open("file:" + os.path.abspath(path))


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
    `frame_times` and `end_time`, exact seconds). progress: optional callable
    `progress(frames_passed_so_far, frames_to_pass)` (frames between the keyframes decoding starts from and the
    sampled frames; called from the decoding threads, one call at a time, the count never decreasing).
    Returns (frames uint8 [T, H, W, 3] RGB, as a player shows them (rotation metadata applied), and
    `VideoMetadata` with `frames_indices`).

    Only what the sampled frames need is decoded: the frames and keyframes are indexed without decoding (an mp4/mov
    from its sample tables, as FFmpeg read them, where they give exactly what demuxing gives; other files by one
    demux-only pass: `_index_stream`), then for each sampled frame the decoder either goes on forward or, when the
    keyframe at or before the frame lies ahead of where it stands, seeks to that keyframe. The frames returned are
    those a full sequential decode shows at the same indices, bit for bit (frames are matched by timestamp after a
    seek; where a container cannot seek, or a seek lands anywhere unexpected, it decodes forward from the start).
    When seeking, the decoding runs are split into contiguous groups of about equal cost, decoded in parallel threads,
    each with its own container on the file (one per CPU this process may use, plus a spare where it may use several, at
    most 8; PyAV lets go of the GIL while decoding), and each decoder uses FFmpeg's slice threads where the codec has
    them; a forward pass uses FFmpeg's frame and slice threads. Only the sampled frames are converted to RGB.
    Raises `VideoDecodeError` (one line naming the file) for anything that is not a decodable video.
    """
    try:  # PyAV: an install requirement of this project, but not of a Hub repo's users who pass decoded frames
        av = importlib.import_module("av")
    except ImportError:
        raise ImportError(f"decoding the video file {os.fspath(path)} needs PyAV: pip install av") from None

    path = os.fspath(path)
    _check_regular_file(path)
    try:
        with _open(av, path) as container:
            if not container.streams:
                size = os.path.getsize(path)
                raise VideoDecodeError(
                    f"{path}: damaged or truncated, or not a video file: FFmpeg finds no streams in its {size} bytes"
                )
            kinds = sorted({s.type for s in container.streams})
            if not container.streams.video:
                if not {"audio", "subtitle"} & set(kinds):  # e.g. an mp4 whose header was cut off
                    raise VideoDecodeError(
                        f"{path}: damaged or truncated, or not a video file: FFmpeg finds no video stream in its "
                        f"{os.path.getsize(path)} bytes (only: {', '.join(kinds)})"
                    )
                raise VideoDecodeError(f"{path}: has no video stream (it has: {', '.join(kinds)})")
            stream = container.streams.video[0]
            index = _index_stream(av, path, container, stream)
            if not index.pts:
                raise VideoDecodeError(
                    f"{path}: damaged or truncated: it declares a video stream but holds no video frames "
                    f"({os.path.getsize(path)} bytes)"
                )
            _check_complete(path, index, _declared_duration(container, stream))
            times, end_time = index.times, index.end_time
            duration = end_time - times[0]
            metadata = VideoMetadata(
                total_num_frames=len(times),
                fps=float(len(times) / duration) if duration > 0 else None,
                duration=float(duration),
                video_backend="pyav",
            )
            metadata.frame_times, metadata.end_time = times, end_time  # exact (Fractions), for sampling by time
            if sample_indices_fn is not None:
                indices = _checked_indices(sample_indices_fn(metadata=metadata), len(times))
            else:
                indices = sample_frame_times(times, end_time, num_frames, fps)
            video = None
            if index.matchable and index.keyframes:
                video = _decode_seeking(av, path, container, stream, index, indices, progress)
    except (av.error.FFmpegError, UnicodeDecodeError, EOFError) as error:  # not a container FFmpeg can read
        raise VideoDecodeError(f"{path}: not a readable video file ({_reason(error)})") from None
    except OSError as error:  # permissions and the like, before FFmpeg sees the file
        raise VideoDecodeError(f"{path}: cannot be opened ({error.strerror or error})") from None
    if video is None:  # no seeking possible or trusted: one forward pass from the start, counting frames
        video = _decode_forward(av, path, indices, len(times), progress)
    metadata.frames_indices = np.array(indices)
    metadata.height, metadata.width = video.shape[1:3]
    return video, metadata


def _reason(error) -> str:
    return str(getattr(error, "strerror", None) or error).split(":")[0].strip() or type(error).__name__


def _declared_duration(container, stream) -> float | None:
    """Seconds the header says the video lasts. The container's duration counts other streams too (audio may
    outlast video), so only the video stream's, or a lone stream's."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration and len(container.streams) == 1:
        return container.duration / 1_000_000  # AV_TIME_BASE units
    return None


def _check_complete(path: str, index: _StreamIndex, declared: float | None) -> None:
    """A truncated file often still opens; its header's duration then outlasts its frames. Refuse a file whose frames
    stop before 90% of the duration it declares less 1 s; warn when they stop short by more than 3 frames and 0.5%
    of it (a cut of a few frames at the end is how muxers round, not damage)."""
    if not declared:
        return
    duration = float(index.end_time - index.times[0])
    if duration < declared * 0.9 - 1:
        raise VideoDecodeError(
            f"{path}: damaged or truncated: its frames stop at {duration:.1f} s of the {declared:.1f} s it declares"
        )
    if declared - duration > max(3 * duration / len(index.times), 0.005 * declared):
        warnings.warn(
            f"{path}: its frames stop at {duration:.2f} s of the {declared:.2f} s it declares (damaged or truncated?); "
            f"the frames it has are used",
            stacklevel=3,
        )


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


class _FrameSink:
    """The output array, filled as the sampled frames are decoded: the only RGB copies ever held. Decoding threads
    may share it: it is allocated once (a lock), and each frame index goes to its own rows."""

    def __init__(self, indices: list[int], path: str):
        self.positions: dict[int, list[int]] = {}
        for position, index in enumerate(indices):
            self.positions.setdefault(index, []).append(position)
        self.count, self.path, self.video, self.lock = len(indices), path, None, threading.Lock()

    def put(self, index: int, frame) -> None:
        image = _rotate(frame.to_ndarray(format="rgb24"), frame.rotation)
        with self.lock:
            if self.video is None:
                self.video = np.empty((self.count, *image.shape), np.uint8)
        if image.shape != self.video.shape[1:]:
            raise VideoDecodeError(
                f"{self.path}: frame {index} is {image.shape[1]}x{image.shape[0]} where another sampled frame is "
                f"{self.video.shape[2]}x{self.video.shape[1]}: videos whose frame size changes are not supported"
            )
        for position in self.positions[index]:
            self.video[position] = image


def _threaded(stream, seeking: bool = False) -> None:
    """Let FFmpeg decode with threads where the codec offers them (set before the decoder opens): frame and slice
    threads for a forward pass; slice threads only when seeking, as each seek flushes the frame-thread pipeline and
    it must fill again (with frame threads, sampling 64 frames took 1.2 to 1.7 times as long, at 128x72 and at 1080p,
    on a 2-core CPU: benchmarks/RESULTS.md)."""
    stream.thread_type = "SLICE" if seeking else "AUTO"


def _decode_forward(av, path: str, indices: list[int], total: int, progress=None) -> np.ndarray:
    """One decoding pass from the start, counting frames in the order the decoder shows them."""
    sink = _FrameSink(indices, path)
    last = max(indices)
    decoded = 0
    try:
        with _open(av, path) as container:
            stream = container.streams.video[0]
            _threaded(stream)
            for frame in container.decode(stream):
                if decoded in sink.positions:
                    sink.put(decoded, frame)
                decoded += 1
                if progress is not None:
                    progress(decoded, last + 1)
                if decoded > last:
                    break
    except av.error.FFmpegError as error:
        if decoded == 0:
            raise VideoDecodeError(f"{path}: no decodable video frames ({_reason(error)})") from None
        raise VideoDecodeError(
            f"{path}: damaged or truncated: decoding stopped after frame {decoded - 1} ({_reason(error)})"
        ) from None
    if decoded == 0:
        raise VideoDecodeError(f"{path}: no decodable video frames")
    if decoded <= last:
        raise VideoDecodeError(
            f"{path}: damaged or truncated: the container lists {total} frames but only {decoded} decode"
        )
    return sink.video


def _plan_runs(targets: list[int], keyframes: list[int]) -> list[tuple[int | None, list[int]]]:
    """Group the sampled frames (ascending, distinct) into decoding runs: (keyframe to seek to, frames to keep).

    A run goes on forward to the next sampled frame unless the keyframe at or before that frame lies past where the
    run stands: decoding from there costs fewer frames than going on. Keyframe None: the frame precedes every
    keyframe (start)."""
    runs: list[tuple[int | None, list[int]]] = []
    for target in targets:
        at = bisect.bisect_right(keyframes, target) - 1
        key = keyframes[at] if at >= 0 else None
        if runs and (key is None or key <= runs[-1][1][-1]):
            runs[-1][1].append(target)
        else:
            runs.append((key, [target]))
    return runs


# A cap on decoding threads: each one's decoder holds its own reference frames (h264: up to 16, about 200 MB at 4K)
# and its container its own index of the file, so memory grows with every thread (64 frames at 4K are 1.6 GB already).
MAX_DECODE_THREADS = 8


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one: containers and `taskset` narrow it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _decoding_threads() -> int:
    """How many threads to decode with: one per usable CPU, and a spare where there are several. PyAV takes the GIL
    back between FFmpeg calls, and a thread waiting for it leaves its CPU idle; the spare fills it (2 CPUs, 64 frames
    from 20 minutes of 128x72: 0.24 s with 2 threads, 0.23 s with 3; the same at 1080p: benchmarks/RESULTS.md)."""
    cpus = _usable_cpus()
    return cpus + 1 if cpus > 1 else 1


def _split_runs(runs: list, costs: list[int], parts: int) -> list[list]:
    """`runs` cut into at most `parts` contiguous groups of about equal total cost: a run goes to the group in whose
    share of the total cost its middle falls."""
    total = sum(costs)
    groups: list[list] = [[] for _ in range(parts)]
    before = 0
    for run, cost in zip(runs, costs):
        groups[(2 * before + cost) * parts // (2 * total)].append(run)
        before += cost
    return [group for group in groups if group]


class _ProgressSum:
    """`progress(frames_passed, frames_to_pass)` for several decoding threads: each reports its own count (never
    decreasing), the callback gets their sum, one call at a time, so it never decreases either."""

    def __init__(self, progress, total: int, parts: int):
        self.progress, self.total, self.counts, self.lock = progress, total, [0] * parts, threading.Lock()

    def report(self, part: int, count: int) -> None:
        with self.lock:
            self.counts[part] = count
            self.progress(sum(self.counts), self.total)


def _decode_seeking(
    av, path: str, container, stream, index: _StreamIndex, indices: list[int], progress=None
) -> np.ndarray | None:
    """The sampled frames, decoding only the runs they need (`_plan_runs`); None where seeking cannot be trusted
    here (the caller then decodes forward from the start).

    The runs are cut into contiguous groups of about equal cost (frames from keyframe to last sampled frame), one per
    thread, up to `_decoding_threads()` and MAX_DECODE_THREADS: PyAV lets go of the GIL while FFmpeg demuxes and
    decodes, so the groups decode in parallel, each in its own container on the file (the first in `container`, already
    open). One group, e.g. a short clip: no threads at all. A group that cannot trust its seeks, or meets an FFmpeg
    error, stops the others and the answer is None; any other exception propagates."""
    sink = _FrameSink(indices, path)
    runs = _plan_runs(sorted(sink.positions), index.keyframes)
    costs = [run[-1] - (key or 0) + 1 for key, run in runs]
    groups = _split_runs(runs, costs, min(_decoding_threads(), len(runs), MAX_DECODE_THREADS))
    counter = _ProgressSum(progress, sum(costs), len(groups))
    stop = threading.Event()  # set by a group that fails: the others give up at their next packet

    def decode_group(part: int) -> bool:
        report = functools.partial(counter.report, part) if progress is not None else None
        done = False
        try:
            if part == 0:
                done = _decode_runs(container, stream, index, groups[0], sink, report, stop)
            else:
                with _open(av, path) as own:
                    done = _decode_runs(own, own.streams.video[0], index, groups[part], sink, report, stop)
        except av.error.FFmpegError:
            pass  # the forward pass decides whether the file is damaged and says where
        finally:
            if not done:
                stop.set()
        return done

    if len(groups) == 1:
        return sink.video if decode_group(0) else None
    with ThreadPoolExecutor(len(groups)) as pool:
        try:
            done = list(pool.map(decode_group, range(len(groups))))  # raises a group's exception, if any
        finally:
            stop.set()  # also on Ctrl-C while waiting: the threads stop instead of decoding on
    return sink.video if all(done) else None


def _decode_runs(container, stream, index: _StreamIndex, runs: list, sink: _FrameSink, report, stop) -> bool:
    """Decode `runs` one after the other in `container`, putting their sampled frames into `sink` and the frames
    passed so far into `report(count)` (unless None); False where a seek cannot be trusted, or when `stop` is set.

    Within a run, frames no other frame references (non-reference B-frames) are skipped unless sampled: the decoder
    is told per packet (`skip_frame`), which changes no other frame."""
    _threaded(stream, seeking=True)
    codec = stream.codec_context
    skipping = False  # what codec.skip_frame was last set to, read here without a property call per packet
    done = 0
    try:
        for key, run in runs:
            landed = _seek_to_keyframe(container, stream, index, key, run[0])
            if landed is None:
                return False
            start_pts, first_packet = landed
            wanted, last = set(run), run[-1]
            wanted_pts = {index.pts[i] for i in run}
            passed, finished = 0, False
            for packet in itertools.chain([first_packet], container.demux(stream)):
                if stop.is_set():
                    return False
                skip = packet.pts is not None and packet.pts not in wanted_pts
                if skip != skipping:
                    codec.skip_frame, skipping = "NONREF" if skip else "DEFAULT", skip
                for frame in packet.decode():
                    if frame.pts is None:
                        return False
                    if frame.pts < start_pts:  # before the keyframe it started from: may lack its references
                        continue
                    at = index.frame_at(frame.pts)
                    if at is None:
                        return False
                    if at in wanted:
                        sink.put(at, frame)
                        wanted.discard(at)
                    if at >= last:
                        finished = True
                        break
                if finished:
                    break
                passed += 1
                if report is not None:
                    report(done + min(passed, last - (key or 0)))
            if wanted:  # a sampled frame never came out of this run
                return False
            done += last - (key or 0) + 1
            if report is not None:
                report(done)
    finally:
        codec.skip_frame = "DEFAULT"
    return True


def _seek_to_keyframe(container, stream, index: _StreamIndex, key: int | None, target: int):
    """Seek to keyframe `key` (None: the start) -> (pts the decoding starts from, first packet), or None when no
    seek lands on a keyframe at or before frame `target`.

    Demuxers index keyframes by presentation time (mkv, webm) or decoding time (mp4): try the keyframe's pts, then
    its dts, then the start of the file. Frames at or after the landing keyframe's pts decode exactly as in a full
    decode; earlier ones (an open GOP's leading frames) may lack references and are skipped."""
    attempts = [] if key is None else [index.pts[key], index.keyframe_dts.get(key)]
    for timestamp in dict.fromkeys(t for t in attempts if t is not None):
        container.seek(timestamp, stream=stream, backward=True)
        packet = _first_packet(container, stream)
        if packet is not None and packet.is_keyframe and packet.pts is not None and packet.pts <= index.pts[target]:
            return packet.pts, packet
    container.seek(0)  # the start: what a full decode sees, every frame exact
    packet = _first_packet(container, stream)
    if packet is None:
        return None
    return -math.inf, packet


def _first_packet(container, stream):
    for packet in container.demux(stream):
        if packet.size:
            return packet
    return None


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
    `video_pooling` gives them as a `VideoPoolingSettings`, which validates them (the window-fits check included,
    against the frame size `num_image_tokens` implies) and counts the tokens.
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
        """The ST-GridPool geometry settings (the other fields at their defaults: they do not change token counts)."""
        return VideoPoolingSettings.from_config({name: getattr(self, name) for name in GEOMETRY_FIELDS})

    def num_video_tokens(self, num_frames: int) -> int:
        """<video> placeholders for one video of `num_frames` frames under this processor's settings."""
        settings, side = self.video_pooling, _frame_side(self.num_image_tokens)
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


__all__ = [
    "STGridPoolProcessor",
    "STGridPoolVideoProcessor",
    "read_video_pyav",
    "sample_frame_indices",
    "sample_frame_times",
]
