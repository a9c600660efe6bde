"""`stgridpool`: ask a video question with an ST-GridPool model, or draw what ST-GridPool does to a video.

    stgridpool ask [VIDEO [QUESTION]] [--model REPO_OR_DIR] [--num-frames N] [--max-new-tokens N] [--device D]
                   [--dtype auto|float32|bfloat16|float16] [--device-map auto] [--cache-dir DIR]
    stgridpool visualize [VIDEO] -o out.png [--model REPO_OR_DIR] [--num-frames N] [--cache-dir DIR]

Without VIDEO, a built-in sample clip (moving shapes, written with PyAV) is used. Without --model, an embedded
default is used: a tiny RANDOM-weight ST-GridPool checkpoint built offline on first use and cached (with the sample
clip) under --cache-dir (default: $XDG_CACHE_HOME/stgridpool, else ~/.cache/stgridpool). Its answers are noise; it
exists so the whole path runs on any machine, offline.

Model loading: a checkpoint whose config.json has an `auto_map` (an ST-GridPool Hub repo made by the converter) loads
with `AutoModelForImageTextToText` / `AutoProcessor` and `trust_remote_code=True`; any other (a stock
`llava_onevision` checkpoint, or an ST-GridPool one without remote code) loads with this project's classes
`STGridPoolLlavaOnevisionForConditionalGeneration` / `STGridPoolProcessor` (default ST-GridPool settings for a
stock checkpoint).

Bad input (missing or unreadable video, bad option values) prints one line `stgridpool: error: ...` and exits 2.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_QUESTION = "What is happening in this video?"
REAL_MODEL_HINT = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
DEMO_VERSION = "demo-v1"


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2."""


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/stgridpool, else ~/.cache/stgridpool."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stgridpool"


def ensure_demo(cache_dir: Path) -> tuple[Path, Path]:
    """Build (once) the embedded default: a tiny random ST-GridPool checkpoint and a sample clip. Returns (model
    dir, clip path), both under `cache_dir/demo-v1`. Built in a temporary folder and renamed, so a crash leaves
    nothing half-written."""
    root = Path(cache_dir) / DEMO_VERSION
    model_dir, clip = root / "model", root / "sample.mp4"
    if (model_dir / "config.json").is_file() and clip.is_file():
        return model_dir, clip
    root.parent.mkdir(parents=True, exist_ok=True)
    print(f"[stgridpool] building the embedded default (tiny random weights, offline) in {root} ...", file=sys.stderr)
    from configuration_stgridpool import STGridPoolConfig
    from modeling_stgridpool_llava import STGridPoolLlavaOnevisionForConditionalGeneration
    from processing_stgridpool import STGridPoolProcessor
    from stgridpool.clips import write_sample_clip
    from stgridpool.tiny import save_tiny_stock_checkpoint

    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        stock = save_tiny_stock_checkpoint(Path(tmp) / "stock")
        config = STGridPoolConfig.from_pretrained(stock)
        model = STGridPoolLlavaOnevisionForConditionalGeneration.from_pretrained(stock, config=config)
        processor = STGridPoolProcessor.from_pretrained(stock)
        processor.video_processor.num_frames = 32
        staged = Path(tmp) / DEMO_VERSION
        model.save_pretrained(staged / "model")
        processor.save_pretrained(staged / "model")
        write_sample_clip(staged / "sample.mp4")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(staged, root)
    return model_dir, clip


def resolve_inputs(args) -> tuple[str, Path | None, bool]:
    """(model, video path or None for the sample clip, whether the model is the embedded random default)."""
    video = Path(args.video) if args.video else None
    if args.model:
        model, demo = args.model, False
    else:
        model_dir, clip = ensure_demo(Path(args.cache_dir) if args.cache_dir else default_cache_dir())
        model, demo = str(model_dir), True
        video = video or clip
    if video is None:
        _, video = ensure_demo(Path(args.cache_dir) if args.cache_dir else default_cache_dir())
    return model, video, demo


def pick_device_dtype(device: str, dtype: str):
    """'auto' device: cuda if available else cpu; 'auto' dtype: bfloat16 on GPU, float32 on CPU."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"
    return device, getattr(torch, dtype)


def load(model_id: str, device: str, dtype, device_map: str | None):
    """Load (model, processor). See the module docstring for which classes are used."""
    from transformers import PretrainedConfig
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # reading the raw config warns about the (empty) base model type
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(model_id)
    except Exception as error:  # noqa: BLE001 - any loading failure is a bad --model
        raise UsageError(f"--model {model_id}: cannot read its config.json ({str(error).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    kwargs = {"dtype": dtype}
    if device_map:
        kwargs["device_map"] = device_map
    if config_dict.get("auto_map"):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=True, **kwargs)
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
    else:
        if config_dict.get("model_type") not in ("llava_onevision", "stgridpool_llava_onevision"):
            raise UsageError(
                f"--model {model_id}: model_type={config_dict.get('model_type')!r} is not supported: allowed are "
                "llava_onevision checkpoints and ST-GridPool repos"
            )
        from configuration_stgridpool import STGridPoolConfig
        from modeling_stgridpool_llava import STGridPoolLlavaOnevisionForConditionalGeneration
        from processing_stgridpool import STGridPoolProcessor

        config = STGridPoolConfig.from_pretrained(model_id)
        model = STGridPoolLlavaOnevisionForConditionalGeneration.from_pretrained(model_id, config=config, **kwargs)
        processor = STGridPoolProcessor.from_pretrained(model_id)
    if not device_map:
        model = model.to(device)
    return model.eval(), processor


def decode(video: Path, num_frames: int | None, processor):
    """Decode and sample the video with a progress bar -> (frames uint8 [T, H, W, 3], metadata, seconds)."""
    from tqdm import tqdm

    from processing_stgridpool import read_video_pyav

    if num_frames is None:
        num_frames = getattr(processor.video_processor, "num_frames", None) or 32
    start = time.perf_counter()
    with tqdm(desc=f"decoding {video.name}", unit="frame", leave=False, disable=None) as bar:

        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)

        frames, metadata = read_video_pyav(video, num_frames=num_frames, progress=progress)
    return frames, metadata, time.perf_counter() - start


def check_video(video: Path) -> None:
    """Fail fast, before loading a model, on a video that cannot be decoded (raises VideoDecodeError)."""
    from processing_stgridpool import read_video_pyav

    read_video_pyav(video, num_frames=1)


def token_summary(model, num_frames: int) -> tuple[int, int]:
    """(visual tokens this model feeds the LM for one video, tokens the stock pooling would: LLaVA-OneVision's
    bilinear 2x, or LLaVA-Video's 2x2 average with a newline per row when the config lays out newlines per row)."""
    from configuration_stgridpool import pooled_frame_size, video_token_count

    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    newline = getattr(config, "video_newline_position", "one_token")
    ours = video_token_count(num_frames, *config.pooled_frame_size, newline)
    stock_mode = "average" if newline == "grid" else "bilinear"
    stock = video_token_count(num_frames, *pooled_frame_size(side, side, video_pooling_mode=stock_mode), newline)
    return ours, stock


def check_num_frames(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number <= 0:
        raise argparse.ArgumentTypeError(f"--num-frames {value!r} is invalid: allowed values are integers >= 1")
    return number


def cmd_ask(args) -> int:
    import torch
    from transformers import TextStreamer

    model_id, video, demo = resolve_inputs(args)
    device, dtype = pick_device_dtype(args.device, args.dtype)
    if demo:
        print(
            "[stgridpool] Using the embedded default: a tiny model with RANDOM weights, so the answer is noise. "
            f"For real answers: stgridpool ask VIDEO \"QUESTION\" --model {REAL_MODEL_HINT} (or an ST-GridPool repo).",
            file=sys.stderr,
        )
    check_video(video)
    model, processor = load(model_id, device, dtype, args.device_map)
    frames, frames_meta, decode_s = decode(video, args.num_frames, processor)
    question = args.question or DEFAULT_QUESTION
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(text=prompt, videos=[frames], do_sample_frames=False, return_tensors="pt")
    inputs = inputs.to(model.device)
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(model.dtype)
    num_frames = frames.shape[0]
    ours, stock = token_summary(model, num_frames)
    fed = int((inputs["input_ids"] == model.config.video_token_id).sum())
    print(
        f"[stgridpool] video: {video} ({frames_meta.total_num_frames} frames, {frames_meta.duration:.1f} s); "
        f"sampled {num_frames} frames",
        file=sys.stderr,
    )
    print(
        f"[stgridpool] visual tokens: {fed} with {getattr(model.config, 'video_pooling_mode', 'stgridpool')} "
        f"(stock pooling: {stock}; {100 * (fed - stock) / stock:+.1f}%)",
        file=sys.stderr,
    )
    if fed != ours:
        print(f"[stgridpool] warning: the config's geometry says {ours} tokens, the processor made {fed}", file=sys.stderr)
    inner = getattr(model, "model", model)
    vision_s = [0.0]
    original = inner.get_video_features

    def timed_video_features(*a, **kw):
        start = time.perf_counter()
        result = original(*a, **kw)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        vision_s[0] += time.perf_counter() - start
        return result

    inner.get_video_features = timed_video_features
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)
    generate_s = time.perf_counter() - start
    del inner.get_video_features
    print(
        f"[stgridpool] time: decode {decode_s:.2f} s | vision (tower + projector + pooling) {vision_s[0]:.2f} s | "
        f"generate {generate_s:.2f} s (includes vision)",
        file=sys.stderr,
    )
    return 0


def cmd_visualize(args) -> int:
    from stgridpool.visualize import visualize_video

    model_id, video, demo = resolve_inputs(args)
    device, dtype = pick_device_dtype(args.device, "float32")
    check_video(video)
    output = Path(args.output)
    if not output.parent.is_dir():
        raise UsageError(f"-o {output}: folder {output.parent} does not exist")
    model, processor = load(model_id, device, dtype, None)
    frames, metadata, _ = decode(video, args.num_frames, processor)
    config = model.config
    title = (
        f"ST-GridPool on {video.name}: {frames.shape[0]} of {metadata.total_num_frames} frames, "
        f"pyramid {[tuple(l) for l in config.pyramid_levels]}, NSP keep {config.nsp_keep_ratio:g}"
        + ("  [random demo weights]" if demo else "")
    )
    image, _ = visualize_video(model, processor, frames, metadata.frames_indices, title=title, thumb=args.thumb)
    image.save(output, optimize=True)
    print(f"[stgridpool] wrote {output} ({image.size[0]}x{image.size[1]})", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stgridpool", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub):
        sub.add_argument("video", nargs="?", help="video file (default: the built-in sample clip)")
        sub.add_argument("--model", help="Hub repo id or local dir (default: the embedded tiny random checkpoint)")
        sub.add_argument("--num-frames", type=check_num_frames, help="frames to sample (default: the processor's, 32)")
        sub.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
        sub.add_argument("--cache-dir", help=f"where the embedded default lives (default: {default_cache_dir()})")

    ask = commands.add_parser("ask", help="answer a question about a video")
    common(ask)
    ask.add_argument("question", nargs="?", help=f"default: {DEFAULT_QUESTION!r}")
    ask.add_argument("--max-new-tokens", type=int, default=128)
    ask.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ask.add_argument("--device-map", choices=["auto"], help="spread the model over all GPUs (accelerate)")
    ask.set_defaults(func=cmd_ask)
    vis = commands.add_parser("visualize", help="draw the sampled frames, PTG summary frames and NSP weights")
    common(vis)
    vis.add_argument("-o", "--output", required=True, help="PNG file to write")
    vis.add_argument("--thumb", type=int, default=112, help="thumbnail side in pixels")
    vis.set_defaults(func=cmd_visualize)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # bad options: argparse prints one usage line + error and exits 2
    from processing_stgridpool import VideoDecodeError

    try:
        return args.func(args)
    except (UsageError, VideoDecodeError) as error:
        print(f"stgridpool: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
