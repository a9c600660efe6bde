"""ST-GridPool for LLaVA-OneVision (ICLR 2026): Pyramid Temporal Gridding + Norm-based Spatial Pooling.

Two layers, in this order:
1. Pure functions on one video's projected features `frames` [T, H, W, D] (the paper's "Pyramid Temporal
   Gridding" and "Norm-based Spatial Pooling"; ICLR 2026, arXiv 2605.22078):
   `pyramid_temporal_grid`, `norm_spatial_pool`, `st_grid_pool`, and the stock poolings.
2. Thin Transformers glue: `STGridPoolLlavaOnevisionModel` / `...ForConditionalGeneration` subclass the stock
   classes and change only the video path; parameter names stay the stock ones, so every
   llava-onevision checkpoint loads as is.
"""

import dataclasses
import functools
import importlib.util
import inspect
import math
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    GenerationMixin,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
    conversion_mapping,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults

try:  # inside a Hub repo, loaded by Transformers' remote-code loader
    from .configuration_stgridpool import (
        NEWLINE_POSITIONS,
        STGridPoolConfig,
        VideoPoolingSettings,
        check_pooling_backend,
        geometry_of,
        pooled_size_of,
        validate_pyramid_levels,
        video_token_count,
        window_size,
    )
except ImportError:  # installed as top-level modules of this project
    from configuration_stgridpool import (
        NEWLINE_POSITIONS,
        STGridPoolConfig,
        VideoPoolingSettings,
        check_pooling_backend,
        geometry_of,
        pooled_size_of,
        validate_pyramid_levels,
        video_token_count,
        window_size,
    )

# Validated ST-GridPool settings under the config's field names: a config or a `VideoPoolingSettings`.
Settings = STGridPoolConfig | VideoPoolingSettings


# ---------------------------------------------------------------------------------------------------------------
# PTG: Pyramid Temporal Gridding (paper: "Pyramid Temporal Gridding")
# ---------------------------------------------------------------------------------------------------------------


def summary_layout(group_size: int) -> tuple[int, int]:
    """(rows, cols) of the tile grid for a summary frame of `group_size` frames: the most square
    factor pair, rows >= cols (4 -> 2x2, 6 -> 3x2, 8 -> 4x2, prime -> g x 1)."""
    cols = max(a for a in range(1, math.isqrt(group_size) + 1) if group_size % a == 0)
    return group_size // cols, cols


@functools.lru_cache(maxsize=256)
def sampled_positions(num_frames: int, stride: int) -> tuple[int, ...]:
    """Frame indices a PTG level of `stride` samples from `num_frames` frames, in time order.

    Computed exactly as the reference does (float32 linspace, round half to even) so the indices match it.
    """
    n = num_frames // stride
    if n == 0:
        return ()
    positions = torch.round(torch.linspace(0, num_frames, n + 1, dtype=torch.float32)[1:] - 1)
    return tuple(int(p) for p in positions.clamp(0, num_frames - 1).tolist())


@dataclasses.dataclass(frozen=True)
class PTGLevelPlan:
    """One PTG level as fixed index maps. A slot is one tile of one summary frame; slots whose tile falls wholly
    outside the cropped H x W frame are left out (they cannot change the result).

    frame_slots / bank_slots: (source index, summary row, tile top row, tile left column) per slot, reading
    the input frames / an earlier level's summary (row of the summary bank) respectively.
    """

    rows: int
    cols: int
    tile_h: int
    tile_w: int
    first_row: int  # this level's summaries are bank rows first_row .. first_row + num_chunks - 1
    num_chunks: int
    frame_slots: tuple[tuple[int, int, int, int], ...]
    bank_slots: tuple[tuple[int, int, int, int], ...]


@dataclasses.dataclass(frozen=True)
class PTGPlan:
    """PTG of a [T, H, W, D] video as host-side index maps; depends only on (T, H, W, pyramid), never on data.

    Summary frames live in a "bank" [num_summaries, H, W, D]. After PTG, frame t is the input frame t when t is in
    `kept_frames`, else bank row `summary_rows[i]` where `summary_positions[i] == t`.
    """

    levels: tuple[PTGLevelPlan, ...]
    num_summaries: int
    kept_frames: tuple[int, ...]
    summary_positions: tuple[int, ...]
    summary_rows: tuple[int, ...]


@functools.lru_cache(maxsize=256)
def ptg_plan(num_frames: int, height: int, width: int, pyramid_levels: tuple[tuple[int, int], ...]) -> PTGPlan:
    """Index maps of PTG for this geometry, computed once on the host and cached."""
    # state[t] = ("frame", t) or ("bank", row): where frame t's current content lives.
    state: list[tuple[str, int]] = [("frame", t) for t in range(num_frames)]
    levels, next_row = [], 0
    for group_size, stride in pyramid_levels:
        positions = sampled_positions(num_frames, stride)
        num_chunks = len(positions) // group_size
        if num_chunks == 0:
            continue
        rows, cols = summary_layout(group_size)
        tile_h, tile_w = math.ceil(height / rows), math.ceil(width / cols)
        snapshot = [state[p] for p in positions[: num_chunks * group_size]]  # read before this level writes
        frame_slots, bank_slots = [], []
        for chunk in range(num_chunks):
            for k in range(group_size):
                top, left = (k // cols) * tile_h, (k % cols) * tile_w
                if top >= height or left >= width:
                    continue  # cropped away
                kind, index = snapshot[chunk * group_size + k]
                (frame_slots if kind == "frame" else bank_slots).append((index, next_row + chunk, top, left))
        for chunk in range(num_chunks):
            state[positions[chunk * group_size + group_size - 1]] = ("bank", next_row + chunk)
        levels.append(
            PTGLevelPlan(rows, cols, tile_h, tile_w, next_row, num_chunks, tuple(frame_slots), tuple(bank_slots))
        )
        next_row += num_chunks
    kept = tuple(t for t, (kind, _) in enumerate(state) if kind == "frame")
    changed = tuple(t for t, (kind, _) in enumerate(state) if kind == "bank")
    return PTGPlan(tuple(levels), next_row, kept, changed, tuple(state[t][1] for t in changed))


# torch.compile: the plan is a constant of the graph (it depends on shapes alone), so Dynamo calls this instead of
# tracing the host-side arithmetic (which reads a CPU tensor back with .tolist()).
@torch.compiler.assume_constant_result
def _ptg_plan_constant(num_frames: int, height: int, width: int, pyramid_levels: tuple) -> PTGPlan:
    return ptg_plan(num_frames, height, width, pyramid_levels)


def _index_tensor(values: tuple, device: torch.device, columns: int = 0) -> torch.Tensor:
    """int64 tensor of `values` on `device`: [n] (columns=0) or [n, columns] (rows of `columns` ints)."""
    tensor = torch.tensor(values, dtype=torch.long, device=device)
    return tensor.reshape(-1, columns) if columns else tensor.reshape(-1)


def _make_device_maps(plan: PTGPlan, device: torch.device) -> dict:
    """The plan's index maps as tensors on `device`: 'levels' (per level: frame/bank slot tables, int64 [n, 4]),
    'summary_positions', 'summary_rows' (int64 [n])."""
    return {
        "levels": [
            (_index_tensor(level.frame_slots, device, 4), _index_tensor(level.bank_slots, device, 4))
            for level in plan.levels
        ],
        "summary_positions": _index_tensor(plan.summary_positions, device),
        "summary_rows": _index_tensor(plan.summary_rows, device),
    }


# Host -> device copies of the maps happen once per (geometry, device), not once per call: a copy from pageable host
# memory would make every call wait for the device. Keyed by the small geometry tuple, not the plan (cheap to hash).
@functools.lru_cache(maxsize=64)
def _cached_device_maps(num_frames: int, height: int, width: int, levels: tuple, device: torch.device) -> dict:
    return _make_device_maps(ptg_plan(num_frames, height, width, levels), device)


def _plan_and_maps(frames: torch.Tensor, levels: tuple[tuple[int, int], ...]) -> tuple[PTGPlan, dict]:
    """The PTG plan of `frames`' geometry and its index maps on `frames.device` (cached; constants under compile)."""
    num_frames, height, width = frames.shape[:3]
    plan = _ptg_plan_constant(num_frames, height, width, levels)
    if torch.compiler.is_compiling():  # the maps become constants of the compiled graph
        return plan, _make_device_maps(plan, frames.device)
    return plan, _cached_device_maps(num_frames, height, width, levels, frames.device)


def _area_resize(frames: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """interpolate(mode="area") of channels-last frames [N, H, W, D] -> [N, out_h, out_w, D], same dtype (the
    kernels accumulate in float32). Works on the channels-last view: no transpose copy. Same size: identity."""
    if (out_h, out_w) == tuple(frames.shape[1:3]):
        return frames
    return F.adaptive_avg_pool2d(frames.permute(0, 3, 1, 2), (out_h, out_w)).permute(0, 2, 3, 1)


def _ptg_bank_torch(frames: torch.Tensor, plan: PTGPlan, maps: dict) -> torch.Tensor:
    """All summary frames of `plan`, pure PyTorch: frames [T, H, W, D] -> bank [S, H, W, D]."""
    num_frames, height, width, dim = frames.shape
    bank = frames.new_empty(plan.num_summaries, height, width, dim)
    for level, (frame_table, bank_table) in zip(plan.levels, maps["levels"]):
        rows, cols, tile_h, tile_w = level.rows, level.cols, level.tile_h, level.tile_w
        # Tiles land in a canvas [M, rows, cols, h, w, D]; slot id = chunk * g + tile index. Cropped-away slots stay
        # unwritten: they are cut off below.
        canvas = frames.new_empty(level.num_chunks * rows * cols, tile_h, tile_w, dim)
        for table, source in ((frame_table, frames), (bank_table, bank)):
            if table.shape[0] == 0:
                continue
            tiles = _area_resize(source.index_select(0, table[:, 0]), tile_h, tile_w)
            slot = (
                (table[:, 1] - level.first_row) * (rows * cols) + (table[:, 2] // tile_h) * cols + table[:, 3] // tile_w
            )
            canvas.index_copy_(0, slot, tiles)
        tiled = canvas.reshape(level.num_chunks, rows, cols, tile_h, tile_w, dim).permute(0, 1, 3, 2, 4, 5)
        tiled = tiled.reshape(level.num_chunks, rows * tile_h, cols * tile_w, dim)[:, :height, :width]
        bank[level.first_row : level.first_row + level.num_chunks] = tiled
    return bank


def pyramid_temporal_grid(frames: torch.Tensor, pyramid_levels: Sequence[Sequence[int]]) -> torch.Tensor:
    """Overwrite some frames with summary frames, level by level (paper: "Pyramid Temporal
    Gridding"). Does not modify `frames`.

    frames: [T, H, W, D]; pyramid_levels: [(group size, stride), ...]. Returns [T, H, W, D].
    (`st_grid_pool` does not call this: it never materialises the gridded video.)
    """
    _check_frames(frames)
    levels = validate_pyramid_levels(pyramid_levels)
    plan, maps = _plan_and_maps(frames, levels)
    out = frames.clone()
    if plan.num_summaries:
        if _resolve_backend("auto", frames) == "triton":
            bank = _triton_kernels().ptg_bank(frames, plan, levels)
        else:
            bank = _ptg_bank_torch(frames, plan, maps)
        out.index_copy_(0, maps["summary_positions"], bank.index_select(0, maps["summary_rows"]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# NSP: Norm-based Spatial Pooling (paper: "Norm-based Spatial Pooling")
# ---------------------------------------------------------------------------------------------------------------


def _check_frames(frames: torch.Tensor) -> None:
    if frames.dim() != 4:
        raise ValueError(
            f"frames of shape {tuple(frames.shape)} is invalid: allowed is one video [T, H, W, D]; pool a batch "
            f"[B, T, H, W, D] video by video (frames of different videos must never mix)"
        )


def _checked_settings(frames: torch.Tensor, **fields) -> VideoPoolingSettings:
    """The public functions' arguments, checked where they enter, in the config's words: `frames` one video
    [T, H, W, D], the settings (`fields`, under the config's names) valid, the NSP window fitting the padded frame.
    Plain Python on the arguments: under torch.compile it runs once, while tracing."""
    _check_frames(frames)
    settings = VideoPoolingSettings(**fields)
    settings.check_frame_size(min(frames.shape[1:3]))
    return settings


def _nsp_geometry(height: int, width: int, settings: Settings) -> tuple[int, int, int]:
    """(k, Ho, Wo) of NSP on `height x width` frames under validated `settings` (no checks)."""
    return window_size(settings.nsp_keep_ratio), *pooled_size_of(settings, height, width)


def _whole_windows(frames: torch.Tensor, k: int, out_h: int, out_w: int, padding: int) -> torch.Tensor:
    """frames [N, H, W, D] zero-padded by `padding` on every side, then grown (partial windows) or cropped (dropped
    border) to exactly Ho*k x Wo*k tokens: [N, Ho*k, Wo*k, D]; a view when nothing needs padding."""
    x = F.pad(frames, (0, 0, padding, padding, padding, padding)) if padding else frames
    grow_h, grow_w = max(0, out_h * k - x.shape[1]), max(0, out_w * k - x.shape[2])
    if grow_h or grow_w:
        x = F.pad(x, (0, 0, 0, grow_w, 0, grow_h))
    return x[:, : out_h * k, : out_w * k]


def _token_scores(x: torch.Tensor, norm_p: float, dtype: torch.dtype) -> torch.Tensor:
    """||x||_p / D^(1/p) of each token of x [..., D], the power mean of |x|: [...] in float64, computed in `dtype`.

    Differentiable everywhere: at a zero token (padding) the gradient is the norm's subgradient 0, not 0 * inf."""
    dim = x.shape[-1]
    if norm_p == 2:  # the paper's L2: one fused reduction (its gradient at a zero token is 0)
        return (torch.linalg.vector_norm(x, dim=-1, dtype=dtype) / math.sqrt(dim)).double()
    magnitude = x.abs().to(dtype)
    if math.isinf(norm_p):
        return magnitude.amax(-1).double()
    # In log space, (log mean |x|^p) / p: |x|^p itself overflows for a large p and underflows for a tiny one. A zero's
    # log is -inf, taken from a 1 put in its place, so its gradient is 0 rather than 0 * inf = NaN.
    nonzero = magnitude > 0
    log_magnitude = torch.where(nonzero, magnitude.where(nonzero, 1.0).log(), -math.inf)
    log_mean = torch.logsumexp(norm_p * log_magnitude, dim=-1) - math.log(dim)
    return (log_mean.double() / norm_p).exp()


def _window_weights(
    x: torch.Tensor, k: int, padded_h: int, padded_w: int, temperature: float, norm_p: float, dtype: torch.dtype
) -> torch.Tensor:
    """Softmax weights of the tokens of each window of x [N, Ho*k, Wo*k, D] (from `_whole_windows`):
    [N, Ho, Wo, k*k] in `dtype`, row-major within the window. Zero padding tokens score 0 and take part; tokens past
    the padded frame (`padded_h x padded_w`; only with partial windows) are not there: weight 0.

    The score of a token is tau * ||x||_p / D^(1/p) (paper: "Norm-based Spatial Pooling"). The softmax runs on
    -tau * (window's largest score - score), in float64: the difference is taken before tau multiplies it, so a huge
    tau gives -inf (weight 0), never inf - inf = NaN, and equal scores stay exactly equal."""
    num_frames, rows, cols, _ = x.shape
    scores = _token_scores(x, norm_p, dtype)  # [N, rows, cols]

    def per_window(t: torch.Tensor) -> torch.Tensor:  # [N, rows, cols] -> [N, Ho, Wo, k*k]
        t = t.reshape(num_frames, rows // k, k, cols // k, k).permute(0, 1, 3, 2, 4)
        return t.reshape(num_frames, rows // k, cols // k, k * k)

    scores = per_window(scores)
    shifted = -temperature * (scores.amax(-1, keepdim=True) - scores)  # scores >= 0: absent zeros never win the max
    if rows > padded_h or cols > padded_w:
        present = torch.ones(num_frames, rows, cols, dtype=torch.bool, device=x.device)
        present[:, padded_h:] = False
        present[:, :, padded_w:] = False
        shifted = shifted.masked_fill(~per_window(present), -math.inf)
    return shifted.softmax(-1).to(dtype)


def nsp_window_weights(
    frames: torch.Tensor,
    keep_ratio: float,
    temperature: float = 1.0,
    norm_p: float = 2.0,
    padding: int = 0,
    partial_windows: bool = False,
) -> torch.Tensor:
    """NSP's softmax weight of every token of every window: frames [T, H, W, D] -> [T, Ho, Wo, k, k] (float32, or
    float64 for float64 input), in the padded frame's coordinates: token (i, j) of window (r, c) is padded-frame
    token (r*k + i, c*k + j). For inspecting what NSP does (`stgridpool visualize`)."""
    settings = _checked_settings(
        frames, nsp_keep_ratio=keep_ratio, nsp_temperature=temperature, nsp_norm_p=norm_p, nsp_padding=padding,
        nsp_partial_windows=partial_windows,
    )  # fmt: skip
    num_frames, height, width, _ = frames.shape
    k, out_h, out_w = _nsp_geometry(height, width, settings)
    x = _whole_windows(frames, k, out_h, out_w, padding)
    dtype = torch.promote_types(frames.dtype, torch.float32)
    weights = _window_weights(x, k, height + 2 * padding, width + 2 * padding, temperature, norm_p, dtype)
    return weights.reshape(num_frames, out_h, out_w, k, k)


def _nsp_torch(
    frames: torch.Tensor, k: int, out_h: int, out_w: int, temperature: float, norm_p: float, padding: int
) -> torch.Tensor:
    """NSP in plain PyTorch, float32 arithmetic: frames [N, H, W, D] -> [N, Ho, Wo, D] in frames.dtype."""
    height, width = frames.shape[1:3]
    x = _whole_windows(frames, k, out_h, out_w, padding)
    compute = torch.promote_types(frames.dtype, torch.float32)  # float32, or float64 for float64 input
    weights = _window_weights(x, k, height + 2 * padding, width + 2 * padding, temperature, norm_p, compute)
    # One strided pass per window offset: reads x once, with no [.., k*k, D] intermediate.
    pooled = None
    for dy in range(k):
        for dx in range(k):
            term = x[:, dy::k, dx::k].to(compute) * weights[..., dy * k + dx, None]
            pooled = term if pooled is None else pooled.add_(term)
    return pooled.to(frames.dtype)


def norm_spatial_pool(
    frames: torch.Tensor,
    keep_ratio: float,
    temperature: float = 1.0,
    norm_p: float = 2.0,
    padding: int = 0,
    partial_windows: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Pool each frame in non-overlapping k x k windows (k = 1/sqrt(keep_ratio)), each window's output being the
    softmax(tau * ||x||_p / D^(1/p))-weighted sum of its tokens. Does not modify `frames`.

    frames: [T, H, W, D] -> [T, Ho, Wo, D] (see `configuration_stgridpool.pooled_frame_size`), in frames.dtype;
    the arithmetic runs in float32. backend: "auto" (see `nsp_backend`), "torch" or "triton".
    """
    return st_grid_pool(
        frames, pyramid_levels=(), keep_ratio=keep_ratio, temperature=temperature, norm_p=norm_p, padding=padding,
        partial_windows=partial_windows, backend=backend,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Backend choice: Triton kernels on CUDA where they apply, plain PyTorch everywhere else
# ---------------------------------------------------------------------------------------------------------------

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, Triton's own switch; for tests)."""
    import triton

    knobs = getattr(triton, "knobs", None)
    return bool(knobs is not None and knobs.runtime.interpret)


def _triton_kernels():
    """The Triton kernels' module, imported on first use of the Triton path (CPU installs never import it)."""
    try:  # inside a Hub repo, loaded by Transformers' remote-code loader (which copies the module along)
        from .stgridpool_triton import st_grid_pool
    except ImportError:  # installed as top-level modules of this project
        from stgridpool_triton import st_grid_pool
    return sys.modules[st_grid_pool.__module__]


# The kernels score tokens in float32 directly (no log space): beyond these, a score could overflow, so "auto" takes
# the PyTorch path, which is finite for every accepted setting.
_TRITON_NORM_P = (1.0, 8.0)
_TRITON_MAX_TEMPERATURE = 1e4


def _needs_grad(frames: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and frames.requires_grad


def _kernels_run_on(frames: torch.Tensor) -> bool:
    """CUDA tensors; CPU tensors too while Triton runs kernels in its interpreter."""
    return frames.is_cuda or _triton_interpreting()


def nsp_backend(frames: torch.Tensor, norm_p: float = 2.0, temperature: float = 1.0) -> str:
    """ "triton" where the fused kernels can run on `frames` (Triton installed, a CUDA tensor of float32/bf16/fp16,
    norm p in [1, 8] and temperature <= 1e4, not inside torch.compile, which fuses the PyTorch path itself) and no
    gradient is asked for, else "torch". The kernels have no backward: where `frames` requires grad (training), the
    PyTorch path runs, whose gradients are exact. (Under Triton's interpreter, CPU tensors count as CUDA ones.)"""
    if torch.compiler.is_compiling() or not _triton_installed():  # first: dynamo cannot trace find_spec
        return "torch"
    if _needs_grad(frames) or frames.dtype not in _TRITON_DTYPES or not math.isfinite(norm_p):
        return "torch"
    if not _TRITON_NORM_P[0] <= norm_p <= _TRITON_NORM_P[1] or temperature > _TRITON_MAX_TEMPERATURE:
        return "torch"
    return "triton" if _kernels_run_on(frames) else "torch"


def _resolve_backend(backend: str, frames: torch.Tensor, norm_p: float = 2.0, temperature: float = 1.0) -> str:
    """The backend `backend` ("auto", "torch" or "triton") means for `frames`; raises where "triton" cannot run."""
    if backend == "auto":
        return nsp_backend(frames, norm_p, temperature)
    if backend == "triton":
        if not _triton_installed():
            raise RuntimeError("backend='triton' needs the triton package, which is not installed here; use 'torch'")
        if not _kernels_run_on(frames) or frames.dtype not in _TRITON_DTYPES or not math.isfinite(norm_p):
            raise ValueError(
                f"backend='triton' is invalid for a {frames.device.type} tensor of {frames.dtype} with "
                f"norm_p={norm_p!r}: the kernels need a CUDA tensor of float32, bfloat16 or float16 and a finite "
                f"norm_p; use 'auto' or 'torch'"
            )
        if _needs_grad(frames):
            raise ValueError(
                "backend='triton' is invalid for frames that require grad: the Triton kernels have no backward; use "
                "'auto' (the PyTorch path wherever a gradient is needed) or 'torch'"
            )
    return backend


def st_grid_pool(
    frames: torch.Tensor,
    *,
    pyramid_levels: Sequence[Sequence[int]],
    keep_ratio: float,
    temperature: float = 1.0,
    norm_p: float = 2.0,
    padding: int = 0,
    partial_windows: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """ST-GridPool of one video: PTG across its frames, then NSP per frame. frames: [T, H, W, D] -> [T, Ho, Wo, D].

    Does not modify `frames` and never copies it whole: only the summary frames are computed (into a small bank);
    NSP reads unchanged frames straight from `frames` and the changed ones from the bank. No host-device sync:
    the index maps depend on shapes alone and are cached on the device. Gradients flow through the PyTorch path
    (see `nsp_backend`).
    """
    settings = _checked_settings(
        frames, pyramid_levels=pyramid_levels, nsp_keep_ratio=keep_ratio, nsp_temperature=temperature,
        nsp_norm_p=norm_p, nsp_padding=padding, nsp_partial_windows=partial_windows,
    )  # fmt: skip
    check_pooling_backend(backend, name="backend")
    return _st_grid_pool(frames, settings, backend)


def _st_grid_pool(frames: torch.Tensor, settings: Settings, backend: str) -> torch.Tensor:
    """`st_grid_pool` under validated `settings` (an `STGridPoolConfig` or a `VideoPoolingSettings`) and backend
    name, checking nothing again: the path of the public functions and of the model."""
    levels = tuple(tuple(level) for level in settings.pyramid_levels)  # a config holds lists; plans key on tuples
    height, width = frames.shape[1:3]
    k, out_h, out_w = _nsp_geometry(height, width, settings)
    temperature, norm_p, padding = settings.nsp_temperature, settings.nsp_norm_p, settings.nsp_padding
    plan, maps = _plan_and_maps(frames, levels)
    if _resolve_backend(backend, frames, norm_p, temperature) == "triton":
        return _triton_kernels().st_grid_pool(frames, plan, levels, k, out_h, out_w, temperature, norm_p, padding)
    bank = _ptg_bank_torch(frames, plan, maps) if plan.num_summaries else None
    # PyTorch: NSP of every input frame (the few that PTG replaces are wasted work, cheaper than gathering the
    # rest), then the summaries' NSP written over them.
    out = _nsp_torch(frames, k, out_h, out_w, temperature, norm_p, padding)
    if bank is not None:
        summaries = _nsp_torch(
            bank.index_select(0, maps["summary_rows"]), k, out_h, out_w, temperature, norm_p, padding
        )
        out = out.index_copy(0, maps["summary_positions"], summaries)
    return out


def bilinear_pool(frames: torch.Tensor) -> torch.Tensor:
    """Stock LLaVA-OneVision: bilinear resize of each frame to ceil(H/2) x ceil(W/2). [T, H, W, D] -> [T, Ho, Wo, D].

    Same op and dtype as stock `apply_pooling`, so the result is identical; the permuted (channels-last) view
    avoids its transpose copy.
    """
    height, width = frames.shape[1:3]
    size = (math.ceil(height / 2), math.ceil(width / 2))
    return F.interpolate(frames.permute(0, 3, 1, 2), size=size, mode="bilinear").permute(0, 2, 3, 1)


def average_pool(frames: torch.Tensor) -> torch.Tensor:
    """Stock LLaVA-Video: 2x2 average pooling, stride 2, trailing row/column dropped.
    [T, H, W, D] -> [T, H//2, W//2, D]."""
    return F.avg_pool2d(frames.permute(0, 3, 1, 2), kernel_size=2, stride=2).permute(0, 2, 3, 1)


def add_video_newlines(pooled: torch.Tensor, newline: torch.Tensor, position: str) -> torch.Tensor:
    """Lay out one video's pooled frames as the language model sees them (LLaVA-OneVision's
    newline after the video, LLaVA-Video's after each row, or this project's per frame / none).

    pooled: [T, Ho, Wo, D]; newline: [D] -> [N, D] with N = `video_token_count(T, Ho, Wo, position)`.
    """
    num_frames, out_h, out_w, dim = pooled.shape
    newline = newline.to(pooled.dtype)
    if position == "one_token":
        return torch.cat([pooled.reshape(-1, dim), newline[None]])
    if position == "grid":
        return torch.cat([pooled, newline.expand(num_frames, out_h, 1, dim)], dim=2).reshape(-1, dim)
    if position == "frame":
        return torch.cat([pooled.reshape(num_frames, -1, dim), newline.expand(num_frames, 1, dim)], dim=1).reshape(
            -1, dim
        )
    if position == "none":
        return pooled.reshape(-1, dim)
    raise ValueError(f"video_newline_position={position!r} is invalid: allowed values are {NEWLINE_POSITIONS}")


def pool_video(frames: torch.Tensor, settings: Settings, backend: str = "auto") -> torch.Tensor:
    """Pool one video's projected frames [T, H, W, D] as `settings.video_pooling_mode` says -> [T, Ho, Wo, D].

    settings: the ST-GridPool settings, validated where they entered: an `STGridPoolConfig` or a
    `VideoPoolingSettings`; backend: a valid `pooling_backend`. Nothing is checked again here."""
    if settings.video_pooling_mode == "bilinear":
        return bilinear_pool(frames)
    if settings.video_pooling_mode == "average":
        return average_pool(frames)
    return _st_grid_pool(frames, settings, backend)


# ---------------------------------------------------------------------------------------------------------------
# Transformers glue
# ---------------------------------------------------------------------------------------------------------------

# Transformers 5.17 keeps every vision layer, names the video argument `pixel_values`, appends the newline in the
# stock forward and reports the features as `video_hidden_states`; newer Transformers (5.24) take
# `mm_encoder_outputs`, select the vision layers they use and report `video_outputs`.
# DELETE this flag and every branch on it when 5.17 support ends.
_TRANSFORMERS_5_17 = "mm_encoder_outputs" not in inspect.signature(LlavaOnevisionModel.forward).parameters


def placeholder_mismatch_message(config: STGridPoolConfig, num_placeholders: int, video_features: torch.Tensor) -> str:
    """What differs when the prompt's <video> placeholders are not the model's video features [num_videos,
    tokens_per_video, D]: the counts expected and got, for how many frames, under which of the model's settings."""
    num_videos, tokens_per_video = video_features.shape[:2]
    rows, cols = config.pooled_frame_size
    # The count is linear in the number of frames: invert it rather than writing the count formula again.
    base = video_token_count(0, rows, cols, config.video_newline_position)
    num_frames = (tokens_per_video - base) // (video_token_count(1, rows, cols, config.video_newline_position) - base)
    per_video = f" ({num_placeholders / num_videos:g} a video)" if num_videos > 1 else ""
    return (
        f"The prompt has {num_placeholders} <video> placeholder tokens{per_video}, but the model expected "
        f"{num_videos * tokens_per_video}: {num_videos} video(s) of {num_frames} frames of {config.frame_size}x"
        f"{config.frame_size} tokens, {tokens_per_video} tokens a video under the model's settings "
        f"{geometry_of(config)}. The processor that wrote the prompt counts with other settings: load both from "
        f"the same repo, or pass the same ST-GridPool settings to each."
    )


class STGridPoolLlavaOnevisionModel(LlavaOnevisionModel):
    """LLaVA-OneVision whose video features are pooled by ST-GridPool (or a stock mode), per video."""

    config_class = STGridPoolConfig

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        _use_stock_checkpoint_layout()
        return super().from_pretrained(*args, **kwargs)

    def _encode_video_frames(
        self, pixel_values_videos: torch.Tensor, vision_feature_layer, vision_feature_select_strategy, **kwargs
    ) -> tuple:
        """(vision tower outputs, projected frames [B, T, h, w, D]) of pixel_values_videos [B, T, C, H, W]."""
        if _TRANSFORMERS_5_17:
            kwargs["output_hidden_states"] = True  # its tower cannot select layers: all of them, as stock 5.17
        elif not kwargs.get("output_hidden_states"):
            kwargs["output_hidden_states"] = vision_feature_layer  # only the layer(s) used are kept, as stock
        batch_size, num_frames = pixel_values_videos.shape[:2]
        vision_outputs = self.vision_tower(pixel_values_videos.flatten(0, 1), return_dict=True, **kwargs)
        if isinstance(vision_feature_layer, int):
            selected = vision_outputs.hidden_states[vision_feature_layer]
        else:
            selected = torch.cat([vision_outputs.hidden_states[i] for i in vision_feature_layer], dim=-1)
        if vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        projected = self.multi_modal_projector(selected)  # [B*T, h*w, D]
        side = self.config.frame_size
        return vision_outputs, projected.reshape(batch_size, num_frames, side, side, -1)

    def project_video_frames(
        self,
        pixel_values_videos: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
    ) -> torch.Tensor:
        """The videos' frames through the vision tower and the projector, not yet pooled:
        pixel_values_videos [B, T, C, H, W] -> [B, T, h, w, D] (h = w = `config.frame_size`). The layer and the
        selection strategy default to the config's, as in `get_video_features`."""
        if vision_feature_layer is None:
            vision_feature_layer = self.config.vision_feature_layer
        if vision_feature_select_strategy is None:
            vision_feature_select_strategy = self.config.vision_feature_select_strategy
        return self._encode_video_frames(pixel_values_videos, vision_feature_layer, vision_feature_select_strategy)[1]

    @merge_with_config_defaults
    @can_return_tuple
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        """pixel_values_videos: [B, T, C, H, W] -> the vision tower's outputs with `pooler_output` [B, N, D], the
        projected frames pooled by `pool_video_frames` (each video on its own). A tuple with `return_dict=False`, as
        stock."""
        if _TRANSFORMERS_5_17 and pixel_values_videos is None:
            pixel_values_videos = kwargs.pop("pixel_values")  # the name 5.17's stock callers use
        vision_outputs, frames = self._encode_video_frames(
            pixel_values_videos, vision_feature_layer, vision_feature_select_strategy, **kwargs
        )
        vision_outputs.pooler_output = self.pool_video_frames(frames)
        return vision_outputs

    def pool_video_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """The videos' projected frames (`project_video_frames`) as the language model reads them: frames
        [B, T, h, w, D] -> [B, N, D], each video pooled on its own (PTG across its own frames only) and laid out with
        `config.video_newline_position`'s newlines (N = `config.video_pooling.num_tokens(T, h, w)`)."""
        config = self.config  # validated where its values were set: pooled as they are
        return torch.stack(
            [
                add_video_newlines(
                    pool_video(video, config, config.pooling_backend), self.image_newline, config.video_newline_position
                )
                for video in frames
            ]
        )

    def _check_video_placeholders(self, input_ids, inputs_embeds, video_features: torch.Tensor) -> torch.Tensor:
        """The <video> placeholder mask [B, L]; raises ValueError saying what differs when its count is not the
        number of video features [num_videos, tokens_per_video, D]."""
        if input_ids is not None:
            video_mask = input_ids == self.config.video_token_id
        else:
            video_token = self.get_input_embeddings()(
                torch.tensor(self.config.video_token_id, device=inputs_embeds.device)
            )
            video_mask = (inputs_embeds == video_token).all(-1)
        num_placeholders = int(video_mask.sum())
        if num_placeholders != video_features.shape[0] * video_features.shape[1]:
            raise ValueError(placeholder_mismatch_message(self.config, num_placeholders, video_features))
        return video_mask

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ):
        # Only the video path changes; the stock forward runs the rest. The video features are computed here so a
        # placeholder mismatch is explained in terms of the settings.
        common = dict(
            vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=vision_feature_select_strategy
        )
        if _TRANSFORMERS_5_17:
            return self._forward_5_17(
                input_ids, pixel_values, image_sizes, pixel_values_videos, inputs_embeds, common, kwargs
            )
        encoder_outputs = dict(kwargs.pop("mm_encoder_outputs", None) or {})
        if pixel_values_videos is not None and encoder_outputs.get("video") is None:
            encoder_outputs["video"] = self.get_video_features(pixel_values_videos, return_dict=True, **common)
        if encoder_outputs.get("video") is not None:
            if (input_ids is None) == (inputs_embeds is None):
                raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
            self._check_video_placeholders(input_ids, inputs_embeds, encoder_outputs["video"].pooler_output)
            if pixel_values is not None and encoder_outputs.get("image") is None:
                # The stock forward takes pixel values or encoder outputs, not both: encode the images as it would.
                encoder_outputs["image"] = self.get_image_features(
                    pixel_values, image_sizes, batch_num_images=kwargs.pop("batch_num_images", None), return_dict=True,
                    **common,
                )  # fmt: skip
            pixel_values = None
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            inputs_embeds=inputs_embeds,
            mm_encoder_outputs=encoder_outputs or None,
            **common,
            **kwargs,
        )

    def _forward_5_17(self, input_ids, pixel_values, image_sizes, pixel_values_videos, inputs_embeds, common, kwargs):
        """Transformers 5.17: its stock forward lays out video tokens its own way, so the video features are placed
        into the embeddings here and the stock forward runs the rest. DELETE when 5.17 support ends."""
        features = None
        if pixel_values_videos is not None:
            if (input_ids is None) == (inputs_embeds is None):
                raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
            features = self.get_video_features(pixel_values_videos, return_dict=True, **common).pooler_output
            video_mask = self._check_video_placeholders(input_ids, inputs_embeds, features)
            if inputs_embeds is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
            features = features.flatten(0, 1).to(inputs_embeds.device, inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(video_mask.unsqueeze(-1).to(inputs_embeds.device), features)
            input_ids = None  # the stock forward takes exactly one of the two; it finds image placeholders in either
        outputs = super().forward(
            input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes, inputs_embeds=inputs_embeds,
            **common, **kwargs,
        )  # fmt: skip
        if features is not None:
            outputs.video_hidden_states = features  # what stock 5.17 reports there: [num_tokens, D]
        return outputs


class STGridPoolLlavaOnevisionForConditionalGeneration(LlavaOnevisionForConditionalGeneration, GenerationMixin):
    """`LlavaOnevisionForConditionalGeneration` with ST-GridPool video pooling; loads any llava-onevision checkpoint."""

    config_class = STGridPoolConfig

    def __init__(self, config: STGridPoolConfig):
        # Skip the stock __init__ so the inner model is built once, as ours.
        super(LlavaOnevisionForConditionalGeneration, self).__init__(config)
        self.model = STGridPoolLlavaOnevisionModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        _use_stock_checkpoint_layout()
        return super().from_pretrained(*args, **kwargs)


def _use_stock_checkpoint_layout() -> None:
    """Let our classes load (and save) the stock llava-onevision key layout: Transformers renames checkpoint keys by
    class name or model type, and skips custom classes unless their renamings are registered. Done when a model is
    loaded, not at import, and only under our own class names."""
    for ours, stock in (
        ("STGridPoolLlavaOnevisionForConditionalGeneration", "llava_onevision"),
        ("STGridPoolLlavaOnevisionModel", "LlavaOnevisionModel"),
    ):
        renamings = conversion_mapping.get_checkpoint_conversion_mapping(stock)
        if renamings is not None and ours not in conversion_mapping.USER_REGISTERED_MAPPINGS:
            conversion_mapping.register_checkpoint_conversion_mapping(ours, renamings, overwrite=True)


__all__ = [
    "STGridPoolLlavaOnevisionModel",
    "STGridPoolLlavaOnevisionForConditionalGeneration",
    "pyramid_temporal_grid",
    "norm_spatial_pool",
    "st_grid_pool",
    "nsp_window_weights",
    "nsp_backend",
]
