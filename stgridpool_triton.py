"""Triton kernels of ST-GridPool's fast CUDA path, and the launch tables they read (cached per geometry and device).

Imported only where the Triton path runs (`modeling_stgridpool_llava` chooses it for CUDA tensors); CPU installs
and `pooling_backend="torch"` never import it. Same results as the PyTorch path (the paper's PTG and NSP),
computed in float32: one launch per PTG level, one NSP launch for all frames. Forward only, no backward: where a
gradient is needed, `modeling_stgridpool_llava` runs the PyTorch path instead (backend "auto") or refuses ("triton").
"""

import functools

import torch

try:  # optional; inside a try so Transformers' remote-code import check does not demand it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None


# The smallest normal float32 (2**-126), the floor under log2 in the p != 2 norms. A literal below it (1e-38) is
# typed float64 by Triton, which makes the one-pass kernel compute in float64 and the two-pass loop fail to compile.
FLOAT32_TINY = tl.constexpr(1.1754943508222875e-38) if triton is not None else None


def _area_window(i: int, size_in: int, size_out: int) -> tuple[int, int]:
    """[start, end) of the input rows that output row i averages in adaptive average pooling ("area")."""
    return (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)



def _index_tensor(rows: tuple, device: torch.device, columns: int) -> torch.Tensor:
    """int64 tensor [n, columns] of `rows` on `device`."""
    return torch.tensor(rows, dtype=torch.long, device=device).reshape(-1, columns)


def _make_launch_tables(plan, device: torch.device) -> dict:
    """The kernels' tables for a PTG plan (see `modeling_stgridpool_llava.PTGPlan`): 'level_slots' (per level, int64
    [n, 5]: source kind 0 frames / 1 bank, source index, bank row, top, left) and 'nsp_entries' (int64 [n, 3]:
    source kind, source frame, output frame)."""
    return {
        # One launch per level / one NSP launch over both sources; column 0 says which (0 frames, 1 bank).
        "level_slots": [
            _index_tensor(
                tuple((0, *r) for r in level.frame_slots) + tuple((1, *r) for r in level.bank_slots), device, 5
            )
            for level in plan.levels
        ],
        "nsp_entries": _index_tensor(
            tuple((0, t, t) for t in plan.kept_frames)
            + tuple((1, r, t) for r, t in zip(plan.summary_rows, plan.summary_positions)),
            device,
            3,
        ),
    }


# Host -> device copies happen once per (geometry, device), not once per call: a copy from pageable host memory
# would make every call wait for the device. Keyed by the small geometry tuple, not the plan (cheap to hash).
_TABLES: dict = {}


def launch_tables(frames: torch.Tensor, levels: tuple, plan) -> dict:
    """`_make_launch_tables(plan)` on frames.device, cached by (T, H, W, levels, device)."""
    key = (*frames.shape[:3], levels, frames.device)
    tables = _TABLES.get(key)
    if tables is None:
        if len(_TABLES) >= 64:
            _TABLES.clear()
        tables = _TABLES[key] = _make_launch_tables(plan, frames.device)
    return tables


if triton is not None:

    @triton.jit
    def _load_either(a_ptr, b_ptr, from_b, offsets, mask):
        """The elements at `offsets` of b (from_b) or of a, 0 where not `mask`, as float32. The source is uniform per
        program: a scalar branch picks it, one load either way (inlined into the kernels: same code as written out)."""
        if from_b:
            v = tl.load(b_ptr + offsets, mask=mask, other=0.0)
        else:
            v = tl.load(a_ptr + offsets, mask=mask, other=0.0)
        return v.to(tl.float32)

    @triton.jit
    def _area_tile_kernel(
        frames_ptr, dst_ptr, table_ptr, H, W, D, tile_h, tile_w,
        KH: tl.constexpr, KW: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """One program = one tile pixel of one slot x BLOCK_D channels: area average of its input window, written
        into its place in the summary frame (dst row of the bank at dst_ptr) unless cropped.
        table rows: (source kind: 0 input frames / 1 bank, source index, dst, top, left)."""
        slot = tl.program_id(0)
        pixel = tl.program_id(1)
        block = tl.program_id(2)
        i = pixel // tile_w
        j = pixel % tile_w
        from_bank = tl.load(table_ptr + slot * 5) != 0
        src = tl.load(table_ptr + slot * 5 + 1).to(tl.int64)
        dst = tl.load(table_ptr + slot * 5 + 2).to(tl.int64)
        y = tl.load(table_ptr + slot * 5 + 3) + i
        x = tl.load(table_ptr + slot * 5 + 4) + j
        h0 = (i * H) // tile_h
        h1 = ((i + 1) * H + tile_h - 1) // tile_h
        w0 = (j * W) // tile_w
        w1 = ((j + 1) * W + tile_w - 1) // tile_w
        offs = block * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for a in tl.static_range(KH):
            for b in tl.static_range(KW):
                inside = (h0 + a < h1) & (w0 + b < w1)
                base = ((src * H + h0 + a) * W + w0 + b) * D
                acc += _load_either(frames_ptr, dst_ptr, from_bank, base + offs, dmask & inside)
        acc = acc / ((h1 - h0) * (w1 - w0)).to(tl.float32)
        keep = dmask & (y < H) & (x < W)
        out_base = ((dst * H + y) * W + x) * D
        tl.store(dst_ptr + out_base + offs, acc.to(dst_ptr.dtype.element_ty), mask=keep)

    @triton.jit
    def _nsp_kernel(
        a_ptr, b_ptr, out_ptr, table_ptr, H, W, D, Wo, out_tokens, pad, scale, norm_p,
        K: tl.constexpr, KK: tl.constexpr, BLOCK_D: tl.constexpr, ONE_PASS: tl.constexpr, L2: tl.constexpr,
    ):  # fmt: skip
        """One program = one output token (window) of one frame: p-norms of the window's tokens, softmax of the
        scaled norms, weighted sum; float32 arithmetic, one read of the window (ONE_PASS: it stays in registers;
        else a second read, from cache). table rows: (source kind: 0 a / 1 b, source frame, output frame)."""
        entry = tl.program_id(0)
        token = tl.program_id(1)
        from_b = tl.load(table_ptr + entry * 3) != 0
        src = tl.load(table_ptr + entry * 3 + 1).to(tl.int64)
        dst = tl.load(table_ptr + entry * 3 + 2).to(tl.int64)
        oh = token // Wo
        ow = token % Wo
        kk = tl.arange(0, KK)
        py = oh * K + kk // K  # padded-frame coordinates of the window's tokens
        px = ow * K + kk % K
        in_padded = (kk < K * K) & (py < H + 2 * pad) & (px < W + 2 * pad)
        y = py - pad
        x = px - pad
        in_frame = in_padded & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        token_base = ((src * H + y) * W + x) * D  # [KK]; only read where in_frame
        out_base = (dst * out_tokens + token) * D
        offs = tl.arange(0, BLOCK_D)
        if ONE_PASS:
            dmask = offs < D
            m = in_frame[:, None] & dmask[None, :]
            v = _load_either(a_ptr, b_ptr, from_b, token_base[:, None] + offs[None, :], m)
            if L2:
                norm = tl.sqrt(tl.sum(v * v, axis=1))
            else:
                av = tl.abs(v)
                powered = tl.where(av > 0, tl.exp2(norm_p * tl.log2(tl.maximum(av, FLOAT32_TINY))), 0.0)
                total = tl.sum(powered, axis=1)
                norm = tl.where(total > 0, tl.exp2(tl.log2(tl.maximum(total, FLOAT32_TINY)) / norm_p), 0.0)
            score = tl.where(in_padded, norm * scale, -float("inf"))
            e = tl.exp(score - tl.max(score, axis=0))
            weight = e / tl.sum(e, axis=0)
            pooled = tl.sum(v * weight[:, None], axis=0)
            tl.store(out_ptr + out_base + offs, pooled.to(out_ptr.dtype.element_ty), mask=dmask)
        else:
            total = tl.zeros([KK], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dmask = (d0 + offs) < D
                m = in_frame[:, None] & dmask[None, :]
                v = _load_either(a_ptr, b_ptr, from_b, token_base[:, None] + d0 + offs[None, :], m)
                if L2:
                    total += tl.sum(v * v, axis=1)
                else:
                    av = tl.abs(v)
                    powered = tl.where(av > 0, tl.exp2(norm_p * tl.log2(tl.maximum(av, FLOAT32_TINY))), 0.0)
                    total += tl.sum(powered, axis=1)
            if L2:
                norm = tl.sqrt(total)
            else:
                norm = tl.where(total > 0, tl.exp2(tl.log2(tl.maximum(total, FLOAT32_TINY)) / norm_p), 0.0)
            score = tl.where(in_padded, norm * scale, -float("inf"))
            e = tl.exp(score - tl.max(score, axis=0))
            weight = e / tl.sum(e, axis=0)
            for d0 in range(0, D, BLOCK_D):
                dmask = (d0 + offs) < D
                m = in_frame[:, None] & dmask[None, :]
                v = _load_either(a_ptr, b_ptr, from_b, token_base[:, None] + d0 + offs[None, :], m)
                pooled = tl.sum(v * weight[:, None], axis=0)
                tl.store(out_ptr + out_base + d0 + offs, pooled.to(out_ptr.dtype.element_ty), mask=dmask)




@functools.lru_cache(maxsize=256)
def _max_area_window(size_in: int, size_out: int) -> int:
    return max(end - start for start, end in (_area_window(i, size_in, size_out) for i in range(size_out)))


def _ptg_bank_triton(frames: torch.Tensor, plan, maps: dict) -> torch.Tensor:
    """All summary frames of `plan` with the Triton area kernel, one launch per level: frames [T, H, W, D] ->
    bank [S, H, W, D]. Each slot's tile is averaged straight from its source frame into its place: no gather, no
    canvas. A level reads only rows earlier levels wrote (earlier launches), so there is no race."""
    frames = frames.contiguous()
    num_frames, height, width, dim = frames.shape
    bank = frames.new_empty(plan.num_summaries, height, width, dim)
    block_d = min(1024, triton.next_power_of_2(dim))
    for level, table in zip(plan.levels, maps["level_slots"]):
        if table.shape[0] == 0:
            continue
        kh, kw = _max_area_window(height, level.tile_h), _max_area_window(width, level.tile_w)
        grid = (table.shape[0], level.tile_h * level.tile_w, triton.cdiv(dim, block_d))
        _area_tile_kernel[grid](
            frames, bank, table, height, width, dim, level.tile_h, level.tile_w,
            KH=kh, KW=kw, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return bank


def _nsp_triton(
    a: torch.Tensor, b: torch.Tensor, entries: torch.Tensor, out: torch.Tensor, k: int, temperature: float,
    norm_p: float, padding: int, one_pass: bool | None = None,
) -> None:
    """NSP with the fused Triton kernel, one launch: for each row (kind, i, t) of entries [n, 3], frame i of `a`
    (kind 0) or of `b` (kind 1), both [*, H, W, D], pooled into out[t] (out: [T, Ho, Wo, D])."""
    if entries.shape[0] == 0:
        return
    a, b = a.contiguous(), b.contiguous()
    _, height, width, dim = a.shape
    _, out_h, out_w, _ = out.shape
    window = triton.next_power_of_2(k * k)
    full = triton.next_power_of_2(dim)
    if one_pass is None:
        one_pass = window * full <= 16384  # the whole window fits in registers
    block_d = full if one_pass else max(16, min(triton.next_power_of_2(max(1, 4096 // window)), full))
    num_warps = 8 if window * block_d >= 8192 else 4
    grid = (entries.shape[0], out_h * out_w)
    _nsp_kernel[grid](
        a, b, out, entries, height, width, dim, out_w, out_h * out_w, padding,
        float(temperature / dim ** (1 / norm_p)), float(norm_p),
        K=k, KK=window, BLOCK_D=block_d, ONE_PASS=one_pass, L2=norm_p == 2, num_warps=num_warps,
    )  # fmt: skip


def ptg_bank(frames: torch.Tensor, plan, levels: tuple) -> torch.Tensor:
    """All summary frames of `plan`: frames [T, H, W, D] -> bank [S, H, W, D]."""
    return _ptg_bank_triton(frames, plan, launch_tables(frames, levels, plan))


def st_grid_pool(
    frames: torch.Tensor, plan, levels: tuple, k: int, out_h: int, out_w: int, temperature: float, norm_p: float,
    padding: int,
) -> torch.Tensor:
    """PTG (summaries into a bank) then NSP of every frame from `frames` or the bank: [T, H, W, D] -> [T, Ho, Wo, D]."""
    tables = launch_tables(frames, levels, plan)
    bank = _ptg_bank_triton(frames, plan, tables) if plan.num_summaries else frames
    out = frames.new_empty(frames.shape[0], out_h, out_w, frames.shape[3])
    _nsp_triton(frames, bank, tables["nsp_entries"], out, k, temperature, norm_p, padding)
    return out
