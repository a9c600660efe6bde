"""ST-GridPool for LLaVA-OneVision (ICLR 2026): Pyramid Temporal Gridding + Norm-based Spatial Pooling.

Two layers, in this order:
1. Pure functions on one video's projected features `frames` [T, H, W, D] (SPEC.md 1-2):
   `pyramid_temporal_grid`, `norm_spatial_pool`, `st_grid_pool`, and the stock poolings.
2. Thin Transformers glue: `STGridPoolLlavaOnevisionModel` / `...ForConditionalGeneration` subclass the stock
   classes and change only the video path (SPEC.md 3); parameter names stay the stock ones, so every
   llava-onevision checkpoint loads as is.
"""

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel, conversion_mapping
from transformers.modeling_outputs import BaseModelOutputWithPooling

try:  # inside a Hub repo, loaded by Transformers' remote-code loader
    from .configuration_stgridpool import (
        STGridPoolConfig,
        pooled_frame_size,
        validate_pyramid_levels,
        video_token_count,
        window_size,
    )
except ImportError:  # installed as top-level modules of this project
    from configuration_stgridpool import (
        STGridPoolConfig,
        pooled_frame_size,
        validate_pyramid_levels,
        video_token_count,
        window_size,
    )


# ---------------------------------------------------------------------------------------------------------------
# PTG: Pyramid Temporal Gridding (SPEC.md 1)
# ---------------------------------------------------------------------------------------------------------------


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
    """Stock LLaVA-Video: 2x2 average pooling, stride 2, trailing row/column dropped. [T, H, W, D] -> [T, H//2, W//2, D]."""
    return F.avg_pool2d(frames.permute(0, 3, 1, 2), kernel_size=2, stride=2).permute(0, 2, 3, 1)


def add_video_newlines(pooled: torch.Tensor, newline: torch.Tensor, position: str) -> torch.Tensor:
    """Lay out one video's pooled frames as the language model sees them (SPEC.md 3).

    pooled: [T, Ho, Wo, D]; newline: [D] -> [N, D] with N = `video_token_count(T, Ho, Wo, position)`.
    """
    num_frames, out_h, out_w, dim = pooled.shape
    newline = newline.to(pooled.dtype)
    if position == "one_token":
        return torch.cat([pooled.reshape(-1, dim), newline[None]])
    if position == "grid":
        return torch.cat([pooled, newline.expand(num_frames, out_h, 1, dim)], dim=2).reshape(-1, dim)
    if position == "frame":
        return torch.cat([pooled.reshape(num_frames, -1, dim), newline.expand(num_frames, 1, dim)], dim=1).reshape(-1, dim)
    if position == "none":
        return pooled.reshape(-1, dim)
    raise ValueError(f"video_newline_position={position!r} is invalid: allowed values are one_token, grid, frame, none")


def pool_video(frames: torch.Tensor, config: STGridPoolConfig) -> torch.Tensor:
    """Pool one video's projected frames [T, H, W, D] as `config.video_pooling_mode` says -> [T, Ho, Wo, D]."""
    if config.video_pooling_mode == "bilinear":
        return bilinear_pool(frames)
    if config.video_pooling_mode == "average":
        return average_pool(frames)
    return st_grid_pool(
        frames,
        pyramid_levels=config.pyramid_levels,
        keep_ratio=config.nsp_keep_ratio,
        temperature=config.nsp_temperature,
        norm_p=config.nsp_norm_p,
        padding=config.nsp_padding,
        partial_windows=config.nsp_partial_windows,
    )


# ---------------------------------------------------------------------------------------------------------------
# Transformers glue
# ---------------------------------------------------------------------------------------------------------------

_GEOMETRY_FIELDS = ("video_pooling_mode", "nsp_keep_ratio", "nsp_padding", "nsp_partial_windows", "video_newline_position")


def _settings_giving(num_tokens: int, num_frames: int, frame_size: int) -> list[dict]:
    """Common geometry settings under which a video of `num_frames` frames takes `num_tokens` tokens."""
    found = []
    for mode in ("stgridpool", "bilinear", "average"):
        for keep_ratio in (0.25, 1.0, 1 / 9, 1 / 16) if mode == "stgridpool" else (0.25,):
            for padding in (0, 1, 2) if mode == "stgridpool" else (0,):
                for partial in (False, True) if mode == "stgridpool" else (False,):
                    if window_size(keep_ratio) > frame_size + 2 * padding:
                        continue
                    rows, cols = pooled_frame_size(
                        frame_size, frame_size, video_pooling_mode=mode, nsp_keep_ratio=keep_ratio,
                        nsp_padding=padding, nsp_partial_windows=partial,
                    )  # fmt: skip
                    for newline in ("one_token", "grid", "frame", "none"):
                        if video_token_count(num_frames, rows, cols, newline) == num_tokens:
                            found.append(dict(zip(_GEOMETRY_FIELDS, (mode, keep_ratio, padding, partial, newline))))
    return found


def placeholder_mismatch_message(config: STGridPoolConfig, num_placeholders: int, num_videos: int, tokens_per_video: int) -> str:
    """Explain a <video> placeholder / feature count mismatch in terms of the settings that differ."""
    ours = {name: getattr(config, name) for name in _GEOMETRY_FIELDS}
    rows, cols = config.pooled_frame_size
    per_frame = {"one_token": rows * cols, "grid": rows * (cols + 1), "frame": rows * cols + 1, "none": rows * cols}
    num_frames = (tokens_per_video - (config.video_newline_position == "one_token")) // per_frame[config.video_newline_position]
    message = (
        f"The prompt has {num_placeholders} <video> placeholder tokens but the model made {num_videos} x "
        f"{tokens_per_video} video features ({num_videos} video(s) of {num_frames} frames) with {ours}: the processor "
        f"and the model are configured differently."
    )
    if num_placeholders % num_videos == 0:
        candidates = _settings_giving(num_placeholders // num_videos, num_frames, config.frame_size)
        diffs = ["; ".join(f"{k}={v!r} (model: {ours[k]!r})" for k, v in c.items() if v != ours[k]) for c in candidates[:4]]
        if diffs:
            message += " Processor settings that give that many placeholders: " + " | ".join(diffs) + "."
    return message + " Load both from the same repo, or pass the same ST-GridPool settings to each."


class STGridPoolLlavaOnevisionModel(LlavaOnevisionModel):
    """LLaVA-OneVision whose video features are pooled by ST-GridPool (or a stock mode), per video."""

    config_class = STGridPoolConfig

    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """pixel_values_videos: [B, T, C, H, W] -> `pooler_output` [B, N, D], each video's tokens in the newline
        layout of `config.video_newline_position` (N from `configuration_stgridpool.video_token_count`)."""
        config = self.config
        if vision_feature_layer is None:
            vision_feature_layer = config.vision_feature_layer
        if vision_feature_select_strategy is None:
            vision_feature_select_strategy = config.vision_feature_select_strategy
        kwargs.pop("return_dict", None)  # always an output object; hidden states are always needed
        kwargs.pop("output_hidden_states", None)
        batch_size, num_frames = pixel_values_videos.shape[:2]
        vision_outputs = self.vision_tower(
            pixel_values_videos.flatten(0, 1), output_hidden_states=True, return_dict=True, **kwargs
        )
        if isinstance(vision_feature_layer, int):
            selected = vision_outputs.hidden_states[vision_feature_layer]
        else:
            selected = torch.cat([vision_outputs.hidden_states[i] for i in vision_feature_layer], dim=-1)
        if vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        projected = self.multi_modal_projector(selected)  # [B*T, H*W, D]
        side = config.frame_size
        videos = projected.reshape(batch_size, num_frames, side, side, -1)
        # Frames of different videos are never mixed: PTG runs across the frames of one video.
        vision_outputs.pooler_output = torch.stack(
            [
                add_video_newlines(pool_video(video, config), self.image_newline, config.video_newline_position)
                for video in videos
            ]
        )
        return vision_outputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ):
        # The stock forward lays out video tokens itself (differently across Transformers versions), so the video
        # features are placed here and the stock forward runs the rest (images, text) unchanged. `generate` in
        # newer Transformers computes them ahead, through get_video_features, into mm_encoder_outputs["video"].
        encoder_outputs = kwargs.get("mm_encoder_outputs") or {}
        features = None
        if pixel_values_videos is not None:
            features = self.get_video_features(
                pixel_values_videos,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
            ).pooler_output
        elif encoder_outputs.get("video") is not None:
            features = encoder_outputs["video"].pooler_output
            kwargs["mm_encoder_outputs"] = {k: v for k, v in encoder_outputs.items() if k != "video"}
        if features is not None:
            if (input_ids is None) == (inputs_embeds is None):
                raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
            if inputs_embeds is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
                video_mask = input_ids == self.config.video_token_id
            else:
                video_token = self.get_input_embeddings()(
                    torch.tensor(self.config.video_token_id, device=inputs_embeds.device)
                )
                video_mask = (inputs_embeds == video_token).all(-1)
            num_videos, tokens_per_video = features.shape[:2]
            features = features.flatten(0, 1).to(inputs_embeds.device, inputs_embeds.dtype)
            num_placeholders = int(video_mask.sum())
            if num_placeholders != features.shape[0]:
                raise ValueError(placeholder_mismatch_message(self.config, num_placeholders, num_videos, tokens_per_video))
            inputs_embeds = inputs_embeds.masked_scatter(video_mask.unsqueeze(-1).to(inputs_embeds.device), features)
            # The stock forward takes exactly one of the two; it finds image placeholders in the embeddings too.
            input_ids = None
        return super().forward(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            **kwargs,
        )


class STGridPoolLlavaOnevisionForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """`LlavaOnevisionForConditionalGeneration` with ST-GridPool video pooling; loads any llava-onevision checkpoint."""

    config_class = STGridPoolConfig

    def __init__(self, config: STGridPoolConfig):
        # Skip the stock __init__ so the inner model is built once, as ours.
        super(LlavaOnevisionForConditionalGeneration, self).__init__(config)
        self.model = STGridPoolLlavaOnevisionModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_video_features(self, pixel_values_videos: torch.Tensor, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs):
        return self.model.get_video_features(
            pixel_values_videos,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            **kwargs,
        )


# Checkpoints keep the stock key layout, which Transformers renames on load by model type and class name; ours take
# the stock renamings, or a llava-onevision checkpoint would load with missing keys.
for _ours, _stock in (
    ("STGridPoolLlavaOnevisionForConditionalGeneration", "llava_onevision"),
    ("STGridPoolLlavaOnevisionModel", "LlavaOnevisionModel"),
):
    _mapping = conversion_mapping.get_checkpoint_conversion_mapping(_stock)
    if _mapping is not None:
        conversion_mapping.register_checkpoint_conversion_mapping(_ours, _mapping, overwrite=True)


__all__ = [
    "STGridPoolLlavaOnevisionModel",
    "STGridPoolLlavaOnevisionForConditionalGeneration",
    "pyramid_temporal_grid",
    "norm_spatial_pool",
    "st_grid_pool",
]
