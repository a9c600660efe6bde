"""The plain vectorized PyTorch reading of SPEC.md 1-2, as the project first shipped it (commit 8fc499a).

Kept verbatim for the benchmark and the CPU tests: the fast path in modeling_stgridpool_llava.py must agree with it
and must not be slower on the CPU.
"""

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from configuration_stgridpool import pooled_frame_size, validate_pyramid_levels, window_size


def summary_layout(group_size: int) -> tuple[int, int]:
    """(rows, cols) of the tile grid for a summary frame of `group_size` frames: the most square
    factor pair, rows >= cols (4 -> 2x2, 6 -> 3x2, 8 -> 4x2, prime -> g x 1)."""
    cols = max(a for a in range(1, math.isqrt(group_size) + 1) if group_size % a == 0)
    return group_size // cols, cols


@functools.lru_cache(maxsize=256)
def sampled_positions(num_frames: int, stride: int) -> tuple[int, ...]:
    """Frame indices a PTG level of `stride` samples from `num_frames` frames (SPEC.md 1), in time order.

    Computed exactly as the reference does (float32 linspace, round half to even) so the indices match it.
    """
    n = num_frames // stride
    if n == 0:
        return ()
    positions = torch.round(torch.linspace(0, num_frames, n + 1, dtype=torch.float32)[1:] - 1)
    return tuple(int(p) for p in positions.clamp(0, num_frames - 1).tolist())


@functools.lru_cache(maxsize=256)
def _area_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """[size_out, size_in] float32 matrix whose row i averages input rows floor(i*in/out) .. ceil((i+1)*in/out)-1:
    PyTorch's adaptive average pooling (interpolate mode="area") along one axis."""
    matrix = torch.zeros(size_out, size_in, dtype=torch.float32)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def summary_frames(groups: torch.Tensor) -> torch.Tensor:
    """Tile each group of g frames into one frame of the same size.

    groups: [M, g, H, W, D] -> [M, H, W, D]. Each frame is area-averaged to ceil(H/rows) x ceil(W/cols)
    (kept as is for g = 1) and placed row-major in a `summary_layout(g)` grid; the top-left H x W is kept.
    """
    m, g, height, width, dim = groups.shape
    rows, cols = summary_layout(g)
    tile_h, tile_w = math.ceil(height / rows), math.ceil(width / cols)
    if (tile_h, tile_w) == (height, width):  # g = 1: the bilinear resize to the same size is the identity
        return groups[:, 0]
    area_h = _area_matrix(height, tile_h).to(groups.device)
    area_w = _area_matrix(width, tile_w).to(groups.device)
    tiles = torch.einsum("ih,mghwd,jw->mgijd", area_h, groups.float(), area_w)  # [M, g, h, w, D]
    tiled = tiles.reshape(m, rows, cols, tile_h, tile_w, dim).permute(0, 1, 3, 2, 4, 5)
    tiled = tiled.reshape(m, rows * tile_h, cols * tile_w, dim)
    return tiled[:, :height, :width].to(groups.dtype)


def pyramid_temporal_grid(frames: torch.Tensor, pyramid_levels: Sequence[Sequence[int]]) -> torch.Tensor:
    """Overwrite some frames with summary frames, level by level (SPEC.md 1). Does not modify `frames`.

    frames: [T, H, W, D]; pyramid_levels: [(group size, stride), ...]. Returns [T, H, W, D].
    """
    levels = validate_pyramid_levels(pyramid_levels)
    num_frames = frames.shape[0]
    out = frames.clone()
    for group_size, stride in levels:
        positions = sampled_positions(num_frames, stride)
        num_chunks = len(positions) // group_size
        if num_chunks == 0:
            continue
        used = torch.tensor(positions[: num_chunks * group_size], device=frames.device)
        # All chunks of a level read the frames as the previous level left them: index out before writing.
        groups = out[used].unflatten(0, (num_chunks, group_size))
        out[used[group_size - 1 :: group_size]] = summary_frames(groups)
    return out


# ---------------------------------------------------------------------------------------------------------------
# NSP: Norm-based Spatial Pooling (SPEC.md 2)
# ---------------------------------------------------------------------------------------------------------------


def norm_spatial_pool(
    frames: torch.Tensor,
    keep_ratio: float,
    temperature: float = 1.0,
    norm_p: float = 2.0,
    padding: int = 0,
    partial_windows: bool = False,
) -> torch.Tensor:
    """Pool each frame in non-overlapping k x k windows (k = 1/sqrt(keep_ratio)), each window's output being the
    softmax(tau * ||x||_p / D^(1/p))-weighted sum of its tokens. Does not modify `frames`.

    frames: [T, H, W, D] -> [T, Ho, Wo, D] (see `configuration_stgridpool.pooled_frame_size`), in frames.dtype;
    the arithmetic runs in float32.
    """
    k = window_size(keep_ratio)
    num_frames, height, width, dim = frames.shape
    out_h, out_w = pooled_frame_size(
        height, width, nsp_keep_ratio=keep_ratio, nsp_padding=padding, nsp_partial_windows=partial_windows
    )
    if out_h <= 0 or out_w <= 0:
        raise ValueError(
            f"keep_ratio={keep_ratio!r} is invalid for {height}x{width} frames with padding={padding}: its {k}x{k} "
            f"window is larger than the padded frame"
        )
    x = F.pad(frames.float(), (0, 0, padding, padding, padding, padding))  # zero tokens: score 0, still weighed
    scores = temperature * torch.linalg.vector_norm(x, ord=norm_p, dim=-1) / dim ** (1 / norm_p)
    # Grow (partial windows: with tokens that are not there, score -inf) or crop (dropped border) to whole windows.
    extra_h, extra_w = out_h * k - x.shape[1], out_w * k - x.shape[2]
    x = F.pad(x, (0, 0, 0, extra_w, 0, extra_h))
    scores = F.pad(scores, (0, extra_w, 0, extra_h), value=-math.inf)
    windows = x.reshape(num_frames, out_h, k, out_w, k, dim).transpose(2, 3)  # [T, Ho, Wo, k, k, D]
    weights = scores.reshape(num_frames, out_h, k, out_w, k).transpose(2, 3).flatten(3).softmax(-1)
    pooled = torch.einsum("thwn,thwnd->thwd", weights, windows.flatten(3, 4))
    return pooled.to(frames.dtype)


def st_grid_pool(
    frames: torch.Tensor,
    *,
    pyramid_levels: Sequence[Sequence[int]],
    keep_ratio: float,
    temperature: float = 1.0,
    norm_p: float = 2.0,
    padding: int = 0,
    partial_windows: bool = False,
) -> torch.Tensor:
    """ST-GridPool of one video: PTG across its frames, then NSP per frame. frames: [T, H, W, D] -> [T, Ho, Wo, D]."""
    gridded = pyramid_temporal_grid(frames, pyramid_levels)
    return norm_spatial_pool(gridded, keep_ratio, temperature, norm_p, padding, partial_windows)


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
