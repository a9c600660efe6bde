"""`stgridpool`: ask a video question with an ST-GridPool model, or draw what ST-GridPool does to a video.

    stgridpool ask [VIDEO [QUESTION]] [--model REPO_OR_DIR] [--trust-remote-code] [--num-frames N] [--max-new-tokens N]
                   [--device D] [--dtype auto|float32|bfloat16|float16] [--device-map auto]
                   [--attn-implementation sdpa|eager|flash_attention_2|...] [--cache-dir DIR] [--debug]
    stgridpool visualize [VIDEO] -o out.png [--model REPO_OR_DIR] [--trust-remote-code] [--num-frames N] [--thumb PX]
                   [--device D] [--cache-dir DIR] [--debug]

Without VIDEO, a built-in sample clip (moving shapes, written with PyAV) is used. Without --model, an embedded
default is used: a tiny RANDOM-weight ST-GridPool checkpoint built offline on first use and cached (with the sample
clip) under --cache-dir (default: $XDG_CACHE_HOME/stgridpool, else ~/.cache/stgridpool). Its answers are noise; it
exists so the whole path runs on any machine, offline.

--model is a model folder or a Hub model id (ORG/NAME; offline, HF_HUB_OFFLINE=1, from the Hub cache). Model loading
(`stgridpool.loading`): a stock `llava_onevision` checkpoint, or an ST-GridPool repo whose code files are
byte-identical to this project's installed modules, loads with the installed classes: no code from the repo runs. A
repo with other code (a changed modeling file, another module or repo in an `auto_map` of any of its JSON files) is
refused unless `--trust-remote-code` is given; then it loads through the Auto classes and its own code. Nothing asks
on the terminal.

On a GPU the video processor (resize, normalise) runs on the model's device (`stgridpool.prompt.processor_device`).

Bad input (missing or unreadable video, bad option values, an unusable --model) prints one line
`stgridpool: error: ...` and exits 2, before the model is loaded. Anything unexpected prints one line and exits 1;
`--debug` shows its traceback.
"""

import argparse
import sys
import time
from pathlib import Path

from stgridpool.demo import DemoCacheError, default_cache_dir, ensure_demo

DEFAULT_QUESTION = "What is happening in this video?"
REAL_MODEL_HINT = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
# Transformers' (>= 5.17) names for the language model's and the vision tower's attention; the flash_attention_*
# ones need their package installed (flash-attn, or flash-attn-4 for flash_attention_4) and a GPU.
ATTN_IMPLEMENTATIONS = (
    "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention"
)  # fmt: skip


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2."""


def resolve_inputs(args) -> tuple[str, Path | None, bool]:
    """(model, video path, whether the model is the embedded random default)."""
    if args.video == "":
        raise UsageError(
            "VIDEO '' is invalid: an empty file name; allowed is a video file, or no VIDEO for the sample clip"
        )
    video = Path(args.video) if args.video else None
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    if args.model == "":
        raise UsageError("--model '' is invalid: an empty name; allowed is a Hub model id or a model folder")
    if args.model:
        model, demo = args.model, False
    else:
        model_dir, clip = ensure_demo(cache_dir)
        model, demo = str(model_dir), True
        video = video or clip
    if video is None:
        _, video = ensure_demo(cache_dir)
    return model, video, demo


def check_device(value: str) -> str:
    """argparse type of --device: auto, or a torch device this machine has (cpu, cuda, cuda:1, mps, ...)."""
    if value == "auto":
        return value
    import torch

    allowed = "allowed are auto, cpu, or a device this machine has (cuda, cuda:N, mps, ...)"
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"--device {value!r} is invalid: not a device name; {allowed}") from None
    if device.type == "cpu":
        return value
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise argparse.ArgumentTypeError(
            f"--device {value!r} is invalid: this machine has no {device.type} device; {allowed}"
        )
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise argparse.ArgumentTypeError(
            f"--device {value!r} is invalid: this machine has {count} {device.type} device(s); {allowed}"
        )
    return value


def pick_device_dtype(device: str, dtype: str):
    """'auto' device: cuda if available else cpu; 'auto' dtype: bfloat16 on GPU, float32 on CPU."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"
    return device, getattr(torch, dtype)


def model_kwargs(dtype, device_map: str | None, attn_implementation: str | None = None) -> dict:
    kwargs = {"dtype": dtype, "device_map": device_map, "attn_implementation": attn_implementation}
    return {name: value for name, value in kwargs.items() if value is not None}


def place(model, device: str, device_map: str | None):
    return model if device_map else model.to(device)


def decode(video: Path, num_frames: int | None, processor):
    """Decode and sample the video with a progress bar -> (frames uint8 [T, H, W, 3], metadata, seconds)."""
    from tqdm import tqdm

    from video_stgridpool import DEFAULT_NUM_FRAMES, read_video_pyav

    if num_frames is None:
        num_frames = getattr(processor.video_processor, "num_frames", None) or DEFAULT_NUM_FRAMES
    start = time.perf_counter()
    with tqdm(desc=f"decoding {video.name}", unit="frame", leave=False, disable=None) as bar:

        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)

        frames, metadata = read_video_pyav(video, num_frames=num_frames, progress=progress)
    return frames, metadata, time.perf_counter() - start


def token_summary(model, num_frames: int) -> tuple[int, int]:
    """(visual tokens this model feeds the LM for one video, tokens the stock pooling would: LLaVA-OneVision's
    bilinear 2x, or LLaVA-Video's 2x2 average with a newline per row when the config lays out newlines per row)."""
    from configuration_stgridpool import VideoPoolingSettings

    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    settings = VideoPoolingSettings.from_config(config)
    stock_mode = "average" if settings.video_newline_position == "grid" else "bilinear"
    stock = settings.replace(video_pooling_mode=stock_mode)
    return settings.num_tokens(num_frames, side, side), stock.num_tokens(num_frames, side, side)


def positive_int(flag: str):
    """argparse type: an integer >= 1, the error naming `flag`."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number <= 0:
            raise argparse.ArgumentTypeError(f"{flag} {value!r} is invalid: allowed values are integers >= 1")
        return number

    parse.__name__ = flag
    return parse


check_num_frames = positive_int("--num-frames")


def check_max_new_tokens(value: int, source) -> None:
    """--max-new-tokens, once the model is known: no more than its language model's context."""
    from stgridpool.loading import context_length

    limit = context_length(source)
    if value > limit:
        raise UsageError(
            f"--max-new-tokens {value} is invalid: allowed are integers 1 to {limit} (the context of {source.name}, "
            "its text config's max_position_embeddings)"
        )


def check_output(output: Path) -> None:
    """-o: a new or existing image file Pillow can write, in an existing folder."""
    from PIL import Image

    Image.init()
    formats = Image.registered_extensions()
    allowed = "allowed is an image file name such as out.png (.png, .jpg, .webp, ...) in an existing folder"
    if output.is_dir():
        raise UsageError(f"-o {output}: it is a folder; {allowed}")
    if formats.get(output.suffix.lower()) not in Image.SAVE:
        raise UsageError(
            f"-o {output}: {output.suffix or 'no extension'} is not an image format Pillow writes; {allowed}"
        )
    if not output.parent.is_dir():
        raise UsageError(f"-o {output}: folder {output.parent} does not exist; {allowed}")


def time_vision_path(model):
    """Forward pre-hooks on the vision tower and the language model: the seconds from the tower's first call to the
    language model's first call in each forward (tower + projector + pooling + placing the video tokens).
    Returns (seconds list, a function that removes the hooks)."""
    import torch

    inner = getattr(model, "model", model)
    seconds, start = [], []

    def sync():
        if torch.cuda.is_available() and next(model.parameters()).is_cuda:
            torch.cuda.synchronize()

    def tower_called(module, args):
        if not start:
            sync()
            start.append(time.perf_counter())

    def language_model_called(module, args):
        if start:
            sync()
            seconds.append(time.perf_counter() - start.pop())

    handles = [
        inner.vision_tower.register_forward_pre_hook(tower_called),
        inner.language_model.register_forward_pre_hook(language_model_called),
    ]
    return seconds, lambda: [handle.remove() for handle in handles]


def cmd_ask(args) -> int:
    import torch
    from transformers import TextStreamer

    from stgridpool.loading import load_model, load_processor, resolve_model
    from stgridpool.prompt import processor_device, video_question_inputs

    model_id, video, demo = resolve_inputs(args)
    device, dtype = pick_device_dtype(args.device, args.dtype)
    if demo:
        print(
            "[stgridpool] Using the embedded default: a tiny model with RANDOM weights, so the answer is noise. "
            f'For real answers: stgridpool ask VIDEO "QUESTION" --model {REAL_MODEL_HINT} (or an ST-GridPool repo).',
            file=sys.stderr,
        )
    source = resolve_model(model_id, trust_remote_code=args.trust_remote_code)
    check_max_new_tokens(args.max_new_tokens, source)
    processor = load_processor(source)
    frames, frames_meta, decode_s = decode(video, args.num_frames, processor)  # the whole sample, before the model
    loading = model_kwargs(dtype, args.device_map, args.attn_implementation)
    model = place(load_model(source, **loading), device, args.device_map)
    question = args.question or DEFAULT_QUESTION
    inputs = video_question_inputs(processor, frames, question, do_sample_frames=False, device=processor_device(model))
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
        f"[stgridpool] visual tokens: {fed} with {source.settings.video_pooling_mode} "
        f"(stock pooling: {stock}; {100 * (fed - stock) / stock:+.1f}%)",
        file=sys.stderr,
    )
    if fed != ours:
        print(
            f"[stgridpool] warning: the config's geometry says {ours} tokens, the processor made {fed}", file=sys.stderr
        )
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    vision_s, remove_hooks = time_vision_path(model)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)
    finally:
        remove_hooks()
    generate_s = time.perf_counter() - start
    print(
        f"[stgridpool] time: decode {decode_s:.2f} s | vision (tower + projector + pooling) {sum(vision_s):.2f} s | "
        f"generate {generate_s:.2f} s (includes vision)",
        file=sys.stderr,
    )
    return 0


def cmd_visualize(args) -> int:
    from stgridpool.loading import load_model, load_processor, resolve_model
    from stgridpool.visualize import visualize_video

    output = Path(args.output)
    check_output(output)
    model_id, video, demo = resolve_inputs(args)
    device, dtype = pick_device_dtype(args.device, "float32")
    source = resolve_model(model_id, trust_remote_code=args.trust_remote_code)
    processor = load_processor(source)
    frames, metadata, _ = decode(video, args.num_frames, processor)
    model = place(load_model(source, dtype=dtype), device, None)
    if not hasattr(model.model, "project_video_frames"):
        raise UsageError(
            f"--model {model_id}: its modeling code has no project_video_frames (made by an older stgridpool-llava); "
            "allowed is a repo converted by this version"
        )
    settings = source.settings
    title = (
        f"ST-GridPool on {video.name}: {frames.shape[0]} of {metadata.total_num_frames} frames, "
        f"pyramid {list(settings.pyramid_levels)}, NSP keep {settings.nsp_keep_ratio:g}"
        + ("  [random demo weights]" if demo else "")
    )
    image, _ = visualize_video(model, processor, frames, metadata.frames_indices, title=title, thumb=args.thumb)
    image.save(output, optimize=True)
    print(f"[stgridpool] wrote {output} ({image.size[0]}x{image.size[1]})", file=sys.stderr)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), exit code 2; subcommands inherit it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stgridpool", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub):
        sub.add_argument("video", nargs="?", help="video file (default: the built-in sample clip)")
        sub.add_argument("--model", help="Hub repo id or local dir (default: the embedded tiny random checkpoint)")
        sub.add_argument(
            "--trust-remote-code", action="store_true",
            help="allow a --model whose code differs from this project's installed code to run that code",
        )  # fmt: skip
        sub.add_argument("--num-frames", type=check_num_frames, help="frames to sample (default: the processor's, 32)")
        sub.add_argument(
            "--device", default="auto", type=check_device, help="auto (cuda if available), cpu, cuda, cuda:1, ..."
        )
        sub.add_argument("--cache-dir", help=f"where the embedded default lives (default: {default_cache_dir()})")
        sub.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")

    ask = commands.add_parser("ask", help="answer a question about a video")
    common(ask)
    ask.add_argument("question", nargs="?", help=f"default: {DEFAULT_QUESTION!r}")
    ask.add_argument("--max-new-tokens", type=positive_int("--max-new-tokens"), default=128)
    ask.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ask.add_argument("--device-map", choices=["auto"], help="spread the model over all GPUs (accelerate)")
    ask.add_argument(
        "--attn-implementation", choices=ATTN_IMPLEMENTATIONS, metavar="NAME",
        help=f"attention kernels (default: Transformers' own, sdpa); one of {', '.join(ATTN_IMPLEMENTATIONS)}",
    )  # fmt: skip
    ask.set_defaults(func=cmd_ask)
    vis = commands.add_parser("visualize", help="draw the sampled frames, PTG summary frames and NSP weights")
    common(vis)
    vis.add_argument("-o", "--output", required=True, help="image file to write (.png, .jpg, ...)")
    vis.add_argument("--thumb", type=positive_int("--thumb"), default=112, help="thumbnail side in pixels")
    vis.set_defaults(func=cmd_visualize)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # bad options: one line, exit 2
    from stgridpool.loading import ModelLoadError
    from video_stgridpool import VideoDecodeError

    try:
        return args.func(args)
    except (UsageError, DemoCacheError, VideoDecodeError, ModelLoadError) as error:
        print(f"stgridpool: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stgridpool: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(
            f"stgridpool: error: unexpected {type(error).__name__}: {reason} (run again with --debug for the "
            "traceback)",
            file=sys.stderr,
        )
        return 1
