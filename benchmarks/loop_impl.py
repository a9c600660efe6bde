"""A loop rewrite of this project's ST-GridPool (the paper's PTG and NSP), one chunk at a time:
`F.interpolate(mode="area")` per frame into a canvas, and NSP per frame through `F.unfold` windows and a softmax per
window. It is ours, not the authors' code: a second, independent reading for the CPU tests and a loop-style baseline
in the benchmark. Never shipped.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _layout(g: int) -> tuple[int, int]:
    best = min((a for a in range(1, math.isqrt(g) + 1) if g % a == 0), key=lambda a: abs(a - g / a))
    return max(best, g // best), min(best, g // best)


def loop_ptg(frames: torch.Tensor, pyramid_levels: Sequence[Sequence[int]]) -> torch.Tensor:
    """frames [T, H, W, D] -> [T, H, W, D], PTG level by level, chunk by chunk, frame by frame."""
    frames = frames.clone()
    num_frames, height, width, dim = frames.shape
    for g, s in pyramid_levels:
        n = num_frames // s
        if n == 0:
            continue
        pos = (
            torch.round(torch.linspace(0, num_frames, n + 1, dtype=torch.float32)[1:] - 1)
            .clamp(0, num_frames - 1)
            .long()
        )
        snapshot = frames[pos].clone()  # [n, H, W, D]
        rows, cols = _layout(g)
        th, tw = math.ceil(height / rows), math.ceil(width / cols)
        for c in range(n // g):
            canvas = torch.zeros(dim, rows * th, cols * tw, dtype=frames.dtype, device=frames.device)
            for k in range(g):
                frame = snapshot[c * g + k].permute(2, 0, 1)[None]  # [1, D, H, W]
                if th < height or tw < width:
                    tile = F.interpolate(frame, size=(th, tw), mode="area")
                else:
                    tile = F.interpolate(frame, size=(th, tw), mode="bilinear", align_corners=False)
                r, q = k // cols, k % cols
                canvas[:, r * th : (r + 1) * th, q * tw : (q + 1) * tw] = tile[0]
            frames[pos[(c + 1) * g - 1]] = canvas[:, :height, :width].permute(1, 2, 0)
    return frames


def loop_nsp(
    frames: torch.Tensor,
    keep_ratio: float,
    temperature: float = 1.0,
    norm_p: float = 2.0,
    padding: int = 0,
    partial_windows: bool = False,
) -> torch.Tensor:
    """frames [T, H, W, D] -> [T, Ho, Wo, D]: per frame, unfold k x k windows, softmax of the scaled norms,
    weighted sum."""
    k = round(1 / math.sqrt(keep_ratio))
    num_frames, height, width, dim = frames.shape
    outs = []
    for t in range(num_frames):
        x = frames[t].permute(2, 0, 1).to(torch.promote_types(frames.dtype, torch.float32))  # [D, H, W]
        x = F.pad(x, (padding, padding, padding, padding))
        hp, wp = x.shape[1:]
        valid = torch.ones(1, 1, hp, wp, dtype=x.dtype)
        if partial_windows:
            eh, ew = (-hp) % k, (-wp) % k
            x = F.pad(x, (0, ew, 0, eh))
            valid = F.pad(valid, (0, ew, 0, eh))
        ho, wo = (x.shape[1] - k) // k + 1, (x.shape[2] - k) // k + 1
        cols = F.unfold(x[None], kernel_size=k, stride=k)[0].reshape(dim, k * k, ho * wo)  # [D, kk, L]
        mask = F.unfold(valid.to(x.device), kernel_size=k, stride=k)[0] > 0  # [kk, L]
        scores = temperature * torch.linalg.vector_norm(cols, ord=norm_p, dim=0) / dim ** (1 / norm_p)
        weights = scores.masked_fill(~mask, -math.inf).softmax(0)  # [kk, L]
        pooled = (cols * weights[None]).sum(1)  # [D, L]
        outs.append(pooled.T.reshape(ho, wo, dim))
    return torch.stack(outs).to(frames.dtype)


def loop_st_grid_pool(
    frames, *, pyramid_levels, keep_ratio, temperature=1.0, norm_p=2.0, padding=0, partial_windows=False
) -> torch.Tensor:
    """PTG then NSP, the reference way. [T, H, W, D] -> [T, Ho, Wo, D]."""
    return loop_nsp(loop_ptg(frames, pyramid_levels), keep_ratio, temperature, norm_p, padding, partial_windows)
