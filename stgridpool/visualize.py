"""What ST-GridPool did to one video, as one PNG: sampled frames, PTG summary frames (with their tiles), NSP weights.

Pure helpers first (`nsp_token_weights`, `ptg_trace`, `ptg_images`), then the Pillow drawing (`render`), then
`visualize_video`, which runs the loaded model's own code on a video (its `project_video_frames`, and the PTG and
NSP functions of the module it was loaded from) and draws it.
"""

import math
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from configuration_stgridpool import VideoPoolingSettings
from modeling_stgridpool_llava import nsp_window_weights, sampled_positions, summary_layout
from stgridpool.prompt import processor_device

LEVEL_COLORS = [(230, 120, 0), (150, 60, 200), (0, 150, 90), (200, 30, 90), (30, 110, 220)]
BACKGROUND, TEXT, GRAY = (255, 255, 255), (20, 20, 20), (110, 110, 110)


def nsp_token_weights(
    frames: torch.Tensor, settings: VideoPoolingSettings, window_weights=nsp_window_weights
) -> torch.Tensor:
    """NSP's softmax weight, under `settings`, of every token within its window (`window_weights`: a modeling
    module's `nsp_window_weights`, by default the installed one), laid out over the frame.

    frames: [T, H, W, D] -> [T, H, W] float32; each full window's weights sum to 1 (uniform = 1/k^2). Tokens in no
    window (the border rows/columns NSP drops) are NaN; the zero padding tokens' weights are not returned.
    """
    num_frames, height, width, _ = frames.shape
    padding = settings.nsp_padding
    windows = window_weights(
        frames.float(), settings.nsp_keep_ratio, settings.nsp_temperature, settings.nsp_norm_p, padding,
        settings.nsp_partial_windows,
    )  # fmt: skip
    _, out_h, out_w, k, _ = windows.shape
    weights = windows.permute(0, 1, 3, 2, 4).reshape(num_frames, out_h * k, out_w * k)
    padded_h, padded_w = height + 2 * padding, width + 2 * padding
    full = torch.full((num_frames, padded_h, padded_w), math.nan)
    rows, cols = min(padded_h, out_h * k), min(padded_w, out_w * k)
    full[:, :rows, :cols] = weights[:, :rows, :cols]
    return full[:, padding : padding + height, padding : padding + width]


def ptg_trace(num_frames: int, pyramid_levels) -> list[dict | None]:
    """Which frames PTG turns into summary frames (SPEC.md 1), for `num_frames` frames.

    Returns one entry per frame: None for a frame PTG leaves as it is, else the *last* level that wrote it:
    {"level": 1-based level number, "group": g, "stride": s, "sources": frame positions it tiles, in order}.
    """
    trace: list[dict | None] = [None] * num_frames
    for level, (group, stride) in enumerate(pyramid_levels, start=1):
        positions = sampled_positions(num_frames, stride)
        for c in range(len(positions) // group):
            chunk = list(positions[c * group : (c + 1) * group])
            trace[chunk[-1]] = {"level": level, "group": group, "stride": stride, "sources": chunk}
    return trace


def ptg_images(images: list[Image.Image], pyramid_levels) -> list[Image.Image]:
    """PTG replayed on pictures: summary frames become mosaics of their source frames' thumbnails (as those frames
    were at that level, so a higher level's tile may itself be a mosaic). images: T square pictures of one size."""
    out = list(images)
    size = images[0].size[0]
    for group, stride in pyramid_levels:
        positions = sampled_positions(len(out), stride)
        snapshot = [out[p] for p in positions]  # every chunk of a level reads the frames before it writes
        rows, cols = summary_layout(group)
        tile_h, tile_w = math.ceil(size / rows), math.ceil(size / cols)
        for c in range(len(positions) // group):
            mosaic = Image.new("RGB", (cols * tile_w, rows * tile_h))
            for k, frame in enumerate(snapshot[c * group : (c + 1) * group]):
                mosaic.paste(frame.resize((tile_w, tile_h), Image.BOX), ((k % cols) * tile_w, (k // cols) * tile_h))
            out[positions[c * group + group - 1]] = mosaic.crop((0, 0, size, size))
    return out


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Map weight ratios (weight * k^2; 1 = uniform) to RGB: 0 blue, 1 white, >= 2 red; NaN dark gray. [...] "
    "-> [..., 3]."""
    v = np.clip(np.nan_to_num(values, nan=1.0), 0, 2)
    low, high = np.clip(v, 0, 1), np.clip(v - 1, 0, 1)
    rgb = np.stack([low * 255, 255 - 190 * high, 255 - 190 * high], -1)  # white -> red above 1
    rgb = np.where((v < 1)[..., None], np.stack([50 + 205 * low, 90 + 165 * low, np.full_like(low, 255)], -1), rgb)
    rgb[np.isnan(values)] = (60, 60, 60)
    return rgb.astype(np.uint8)


def heatmap_image(frame: Image.Image, weights: np.ndarray, window: int) -> Image.Image:
    """The frame in gray with NSP weights [H, W] (times k^2) blended over it, one block per token."""
    size = frame.size
    heat = Image.fromarray(heat_colors(weights * window**2)).resize(size, Image.NEAREST)
    return Image.blend(frame.convert("L").convert("RGB"), heat, 0.65)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def render(
    frames: list[Image.Image],
    gridded: list[Image.Image],
    trace: list[dict | None],
    weights: np.ndarray | None,
    window: int,
    *,
    title: str,
    frame_labels: list[str],
    columns: int = 8,
) -> tuple[Image.Image, dict]:
    """Draw the figure. frames/gridded: T square thumbnails (sampled; after PTG); weights: [T, h, w] NSP weights or
    None. Returns (image, layout) with layout["panels"][t] = {"sampled", "ptg", "nsp"} boxes (left, top, right,
    bottom) in pixels, for tests and tools."""
    size, pad, line = frames[0].size[0], 10, 14
    font, small, big = _font(12), _font(10), _font(16)
    columns = min(columns, len(frames))
    cell_w, cell_h = size + pad, line + 3 * size + 2 * line + 2 * pad
    header = 96
    width = max(columns * cell_w + pad, 720)
    height = header + math.ceil(len(frames) / columns) * cell_h + pad
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((pad, 8), title, fill=TEXT, font=big)
    legend = [
        "Each column: a sampled frame (top), what PTG feeds NSP (middle: a coloured frame is a summary frame, a",
        "mosaic of the listed frames at level L(g,s)), and NSP's softmax weight per token (bottom; blue < uniform,",
        f"white = uniform 1/{window * window}, red >= 2x uniform; dark gray = dropped border tokens).",
    ]
    for i, text in enumerate(legend):
        draw.text((pad, 30 + i * line), text, fill=GRAY, font=font)
    x = pad
    for i in range(5):  # colour bar
        value = i / 2
        draw.rectangle((x, 78, x + 28, 90), fill=tuple(int(c) for c in heat_colors(np.array([value]))[0]))
        draw.text((x + 32, 78), f"{value:g}x", fill=TEXT, font=small)
        x += 64
    panels = []
    for t, (frame, after) in enumerate(zip(frames, gridded)):
        left = pad + (t % columns) * cell_w
        top = header + (t // columns) * cell_h
        draw.text((left, top), frame_labels[t], fill=TEXT, font=font)
        y = top + line
        sampled_box = (left, y, left + size, y + size)
        image.paste(frame, sampled_box[:2])
        y += size + 2
        entry = trace[t]
        if entry is None:
            draw.text((left, y), "kept as is", fill=GRAY, font=small)
        else:
            color = LEVEL_COLORS[(entry["level"] - 1) % len(LEVEL_COLORS)]
            label = f"L{entry['level']}({entry['group']},{entry['stride']}): " + ",".join(map(str, entry["sources"]))
            draw.text((left, y), label, fill=color, font=small)
        y += line
        ptg_box = (left, y, left + size, y + size)
        image.paste(after, ptg_box[:2])
        if entry is not None:
            draw.rectangle(ptg_box, outline=color, width=3)
        y += size + 2
        draw.text((left, y), "NSP weights", fill=GRAY, font=small)
        y += line
        nsp_box = (left, y, left + size, y + size)
        if weights is not None:
            image.paste(heatmap_image(after, weights[t], window), nsp_box[:2])
        else:
            draw.text((left + 4, y + size // 2), "(no NSP: stock pooling)", fill=GRAY, font=small)
        panels.append({"sampled": sampled_box, "ptg": ptg_box, "nsp": nsp_box})
    return image, {"panels": panels, "size": image.size}


def visualize_video(model, processor, frames: np.ndarray, frame_indices, *, title: str, thumb: int = 112):
    """Run `model`'s own video projection (`model.model.project_video_frames`: vision tower + projector, before
    pooling) on decoded frames (uint8 [T, H, W, 3]), then PTG and NSP's weights from the module the model's class
    was loaded from (a repo's own copy when it came through remote code), and draw the figure.

    Returns (image, layout) as `render`."""
    settings = VideoPoolingSettings.from_config(model.config)
    code = sys.modules[type(model).__module__]
    pixel_values = processor.video_processor(
        videos=[frames], do_sample_frames=False, return_tensors="pt", device=processor_device(model)
    )["pixel_values_videos"]
    parameter = next(model.parameters())
    with torch.no_grad():
        projected = model.model.project_video_frames(pixel_values.to(parameter.device, parameter.dtype))
    projected = projected[0].float().cpu()  # [T, h, w, D]
    stgridpool = settings.video_pooling_mode == "stgridpool"
    levels = [tuple(level) for level in settings.pyramid_levels] if stgridpool else []
    window = settings.window_size if stgridpool else 2
    weights = None
    if stgridpool:
        gridded_features = code.pyramid_temporal_grid(projected, levels)
        weights = nsp_token_weights(gridded_features, settings, window_weights=code.nsp_window_weights).numpy()
    # LLaVA-OneVision resizes video frames to a square without cropping; the thumbnails do the same.
    thumbs = [Image.fromarray(f).resize((thumb, thumb), Image.BILINEAR) for f in frames]
    labels = [f"#{t}  (frame {int(i)})" for t, i in enumerate(frame_indices)]
    trace = ptg_trace(len(thumbs), levels)
    return render(thumbs, ptg_images(thumbs, levels), trace, weights, window, title=title, frame_labels=labels)
