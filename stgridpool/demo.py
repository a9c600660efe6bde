"""The embedded default of `stgridpool ask`/`visualize`: a tiny random-weight checkpoint and a sample clip, built
offline on first use and cached; the tests build their tiny checkpoints with the same functions.

The checkpoints have the real geometry where it matters (SigLIP-384/14's 27 x 27 token frames by default, a
Qwen2-style chat template, `<image>`/`<video>` special tokens) and a few thousand parameters elsewhere.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from stgridpool.chat_template import CHAT_TEMPLATE

DEMO_VERSION = "demo-v1"
DEMO_FILES = (
    "model/config.json",
    "model/model.safetensors",
    "model/processor_config.json",
    "model/tokenizer.json",
    "sample.mp4",
)


class DemoCacheError(ValueError):
    """The cache folder cannot hold the embedded default; one line naming the folder and what is allowed."""


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
WORDS = (
    "what is happening in this video image the a person dog cat car ball red blue green yes no one two three "
    "describe answer question frame scene left right up down moving color how many where who"
).split()


def build_tiny_tokenizer():
    """A word-level tokenizer with Qwen2's special tokens; any unknown word maps to <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS + list("0123456789.,?!:\n"))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=1_000_000,
    )
    tokenizer.padding_side = "left"
    return tokenizer


def _tiny_stack(hidden_size: int, num_attention_heads: int) -> dict:
    """The sizes of a tiny transformer stack (vision tower or language model): 2 layers, MLP twice as wide."""
    return dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
    )


def tiny_config_kwargs(tokenizer, frame_size: int = 27, tie_word_embeddings: bool = False) -> dict:
    """Keyword arguments for a `LlavaOnevisionConfig` (or `STGridPoolConfig`) of a tiny model.

    `frame_size` is the tokens per frame side (27 like SigLIP-384/14); images are 2*frame_size pixels square.
    """
    image_size = 2 * frame_size
    return dict(
        vision_config=dict(
            model_type="siglip_vision_model",
            **_tiny_stack(hidden_size=16, num_attention_heads=2),
            image_size=image_size,
            patch_size=2,
            vision_use_head=False,
        ),
        text_config=dict(
            model_type="qwen2",
            **_tiny_stack(hidden_size=32, num_attention_heads=4),
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=65536,
            tie_word_embeddings=tie_word_embeddings,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]],
        tie_word_embeddings=tie_word_embeddings,
    )


def build_tiny_processor(tokenizer, frame_size: int = 27, num_frames: int = 8, processor_class=None, **geometry):
    """A LLaVA-OneVision processor for the tiny model (stock class unless `processor_class` is given)."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    image_size = 2 * frame_size
    size = {"height": image_size, "width": image_size}
    image_processor = LlavaOnevisionImageProcessor(
        size=size,
        image_grid_pinpoints=[[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]],
    )
    video_processor = LlavaOnevisionVideoProcessor(size=size, num_frames=num_frames)
    processor_class = processor_class or LlavaOnevisionProcessor
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=frame_size * frame_size,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        **geometry,
    )


def save_tiny_stock_checkpoint(path, *, frame_size: int = 27, tie_word_embeddings: bool = False, seed: int = 0) -> Path:
    """Write a tiny random stock `LlavaOnevisionForConditionalGeneration` + processor to `path`: a local stand-in
    for a `llava-hf/llava-onevision-qwen2-*-ov-hf` repo. Returns `path`."""
    import torch
    from transformers import GenerationConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    config = LlavaOnevisionConfig(**tiny_config_kwargs(tokenizer, frame_size, tie_word_embeddings))
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=config.text_config.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_new_tokens=8
    )
    model.save_pretrained(path)
    build_tiny_processor(tokenizer, frame_size).save_pretrained(path)
    return path


def moving_shapes_frames(num_frames: int = 48, size: int = 96) -> np.ndarray:
    """A short sample scene: a red square moving right, a blue disc moving down, a green bar growing.

    uint8 [num_frames, size, size, 3]."""
    yy, xx = np.mgrid[:size, :size]
    frames = []
    for t in range(num_frames):
        phase = t / max(num_frames - 1, 1)
        image = np.full((size, size, 3), 235, np.uint8)
        x0 = int(4 + phase * (size - 32))
        image[20:44, x0 : x0 + 24] = (220, 40, 40)
        cy, cx = int(12 + phase * (size - 24)), size * 2 // 3
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= 100] = (40, 70, 220)
        image[size - 12 : size - 4, 4 : 4 + int(8 + phase * (size - 16))] = (40, 170, 60)
        frames.append(image)
    return np.stack(frames)


def write_sample_clip(path, num_frames: int = 48, size: int = 96) -> Path:
    """The sample video: `moving_shapes_frames` as a 2-second h264 mp4 (24 fps)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.height = stream.width = size
        stream.pix_fmt = "yuv420p"
        for image in moving_shapes_frames(num_frames, size):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return Path(path)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/stgridpool, else ~/.cache/stgridpool."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stgridpool"


DEMO_FILES = (
    "model/config.json",
    "model/model.safetensors",
    "model/processor_config.json",
    "model/tokenizer.json",
    "sample.mp4",
)


def demo_is_complete(root: Path) -> bool:
    """Every file of the embedded default is there and its weights' header reads."""
    if not all((root / name).is_file() for name in DEMO_FILES):
        return False
    from safetensors import safe_open

    try:
        with safe_open(root / "model" / "model.safetensors", "pt"):
            return True
    except Exception:  # truncated or damaged: rebuild
        return False


def _remove_stale_builds(cache_dir: Path) -> None:
    """Remove build folders (`.build-PID-*`) whose process is gone (a build killed mid-way)."""
    for entry in cache_dir.glob(".build-*"):
        pid = entry.name.split("-")[1] if entry.name.count("-") >= 2 else ""
        if not pid.isdigit() or not entry.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def ensure_demo(cache_dir: Path) -> tuple[Path, Path]:
    """Build (once) the embedded default: a tiny random ST-GridPool checkpoint and a sample clip. Returns (model
    dir, clip path), both under `cache_dir/demo-v1`. Built in a temporary folder and renamed, so a crash leaves
    nothing half-written; an incomplete or damaged one (files deleted) is rebuilt."""
    cache_dir = Path(cache_dir)
    root = cache_dir / DEMO_VERSION
    model_dir, clip = root / "model", root / "sample.mp4"
    if demo_is_complete(root):
        return model_dir, clip
    if cache_dir.exists() and not cache_dir.is_dir():
        raise DemoCacheError(f"--cache-dir {cache_dir}: it is a file; allowed is a folder (new or existing)")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(cache_dir)
        build = Path(tempfile.mkdtemp(prefix=f".build-{os.getpid()}-", dir=cache_dir))
    except OSError as error:
        raise DemoCacheError(
            f"--cache-dir {cache_dir}: cannot write there ({type(error).__name__}: {error.strerror or error}); "
            "allowed is a writable folder"
        ) from None
    print(f"[stgridpool] building the embedded default (tiny random weights, offline) in {root} ...", file=sys.stderr)
    from configuration_stgridpool import STGridPoolConfig
    from modeling_stgridpool_llava import STGridPoolLlavaOnevisionForConditionalGeneration
    from processing_stgridpool import STGridPoolProcessor
    from video_stgridpool import DEFAULT_NUM_FRAMES

    try:
        stock = save_tiny_stock_checkpoint(build / "stock")
        config = STGridPoolConfig.from_pretrained(stock)
        model = STGridPoolLlavaOnevisionForConditionalGeneration.from_pretrained(stock, config=config)
        processor = STGridPoolProcessor.from_pretrained(stock)
        processor.video_processor.num_frames = DEFAULT_NUM_FRAMES
        staged = build / DEMO_VERSION
        model.save_pretrained(staged / "model")
        processor.save_pretrained(staged / "model")
        write_sample_clip(staged / "sample.mp4")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(staged, root)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return model_dir, clip
