"""Tiny random-weight LLaVA-OneVision checkpoints, built offline: for tests and the CLI's embedded default.

They have the real geometry where it matters (SigLIP-384/14's 27 x 27 token frames by default, a Qwen2-style
chat template, `<image>`/`<video>` special tokens) and a few thousand parameters elsewhere.
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from stgridpool.chat_template import CHAT_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
WORDS = (
    "what is happening in this video image the a person dog cat car ball red blue green yes no one two three "
    "describe answer question frame scene left right up down moving color how many where who"
).split()


def build_tiny_tokenizer():
    """A word-level tokenizer with Qwen2's special tokens; any unknown word maps to <|endoftext|>."""
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
