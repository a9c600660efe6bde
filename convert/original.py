"""Original LLaVA-NeXT checkpoints (`LlavaQwenForCausalLM`: LLaVA-Video, lmms-lab LLaVA-OneVision) -> Transformers.

Such a checkpoint has a flat Qwen2 config with `mm_*` fields and weights named `model.layers.*`, `model.mm_projector.*`,
`model.vision_tower.vision_tower[.vision_model].*`. This module builds the LLaVA-OneVision config, the processor, and
streams the weights, shard by shard, renamed to the layout Transformers saves llava-onevision checkpoints in.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ConversionError
from .source import TOKENIZER_FILES

# SigLIP towers LLaVA-NeXT uses, by `mm_vision_tower`; the layer count comes from the weights (the original drops the
# tower's last layer). Other towers: pass --vision-config.
KNOWN_VISION_TOWERS = {
    "google/siglip-so400m-patch14-384": dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
        layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
    ),  # fmt: skip
}
VISION_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "image_size", "patch_size")
SIGLIP_MEAN_STD = [0.5, 0.5, 0.5]
# Top-level fields of the original config that are Qwen2 text-model fields.
TEXT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "tie_word_embeddings",
    "rope_theta", "rope_scaling", "use_sliding_window", "sliding_window", "max_window_layers", "attention_dropout",
    "bos_token_id", "eos_token_id",
)  # fmt: skip
# Original key prefix -> Transformers (saved llava-onevision layout) prefix; first match wins.
KEY_PREFIXES = (
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.vision_tower.", "vision_tower."),
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("model.image_newline", "image_newline"),
    ("model.embed_tokens.", "language_model.model.embed_tokens."),
    ("model.layers.", "language_model.model.layers."),
    ("model.norm.", "language_model.model.norm."),
    ("lm_head.", "language_model.lm_head."),
)
# Frames the video processor samples by default: LLaVA-Video 64, LLaVA-OneVision 32.
NUM_FRAMES = {"llava_video": 64, "onevision": 32}


def flavour(config: dict) -> str:
    """`llava_video` (average pooling + grid newlines) or `onevision`."""
    return "llava_video" if config.get("mm_spatial_pool_mode") == "average" else "onevision"


def rename_key(key: str) -> str | None:
    """Transformers name of an original weight; None for weights the model does not have (a SigLIP pooling head)."""
    for old, new in KEY_PREFIXES:
        if key.startswith(old):
            rest = key[len(old) :]
            if new == "vision_tower." and rest.startswith("head."):
                return None
            return new + rest
    raise ConversionError(
        f"weight {key!r} is invalid: this converter does not know where it goes; allowed are the original LLaVA-NeXT "
        f"names ({', '.join(old + '*' for old, _ in KEY_PREFIXES)})"
    )


@dataclass
class WeightInfo:
    """Names and shapes of every tensor of a checkpoint (read from the safetensors headers only), by shard."""

    shapes: dict  # name -> shape
    shards: dict  # shard file name -> [names]


def read_weight_info(path: Path, weight_files: list[str]) -> WeightInfo:
    """Names and shapes from the safetensors headers (checked readable by `source.inspect_source`)."""
    from safetensors import safe_open

    shapes, shards = {}, {}
    for name in weight_files:
        with safe_open(path / name, "pt") as handle:
            keys = list(handle.keys())
            for key in keys:
                shapes[key] = list(handle.get_slice(key).get_shape())
        shards[name] = keys
    return WeightInfo(shapes, shards)


def vision_config(config: dict, info: WeightInfo, vision_config_file: str | None) -> dict:
    """SigLIP vision config of the tower: known by `mm_vision_tower` or given in a JSON file; layers from the weights.

    The shapes in the weights must agree with it.
    """
    tower = config.get("mm_vision_tower")
    if vision_config_file:
        try:
            base = json.loads(Path(vision_config_file).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ConversionError(
                f"--vision-config={vision_config_file!r} is invalid: {error}; allowed is a JSON file of SigLIP "
                "vision config fields"
            ) from None
        if not isinstance(base, dict):
            base = {}
        missing = [k for k in VISION_FIELDS if not (isinstance(base.get(k), int) and base[k] > 0)]
        if missing:
            raise ConversionError(
                f"--vision-config={vision_config_file!r} is invalid: no positive integer {', '.join(missing)}; "
                "allowed is "
                f"a JSON object of SigLIP vision config fields with at least {', '.join(VISION_FIELDS)}"
            )
    elif tower in KNOWN_VISION_TOWERS:
        base = dict(KNOWN_VISION_TOWERS[tower])
    else:
        raise ConversionError(
            f"mm_vision_tower={tower!r} is invalid: its architecture is not known; allowed are "
            f"{sorted(KNOWN_VISION_TOWERS)}, or pass --vision-config FILE.json with its SigLIP vision config"
        )
    prefix = "model.vision_tower.vision_tower.vision_model."
    if not any(key.startswith(prefix) for key in info.shapes):
        prefix = "model.vision_tower.vision_tower."  # checkpoints that omit `vision_model.`
    layers = {
        int(m.group(1)) for k in info.shapes if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k))
    }
    if not layers:
        raise ConversionError(
            "SRC weights are invalid: no vision tower layers (model.vision_tower.vision_tower.*); allowed is a "
            "full original LLaVA-NeXT checkpoint"
        )
    vision = {
        "model_type": "siglip_vision_model",
        **base,
        "num_hidden_layers": max(layers) + 1,
        "vision_use_head": False,
    }
    expected = {
        "embeddings.patch_embedding.weight": [vision["hidden_size"], 3, vision["patch_size"], vision["patch_size"]],
        "embeddings.position_embedding.weight": [
            (vision["image_size"] // vision["patch_size"]) ** 2,
            vision["hidden_size"],
        ],
        "encoder.layers.0.mlp.fc1.weight": [vision["intermediate_size"], vision["hidden_size"]],
    }
    for name, shape in expected.items():
        if info.shapes.get(prefix + name) != shape:
            raise ConversionError(
                f"vision config is invalid for SRC's weights: {prefix + name} has shape "
                f"{info.shapes.get(prefix + name)}, "
                f"the config ({tower!r}) gives {shape}; allowed is the tower's true config (--vision-config FILE.json)"
            )
    return vision


def parse_grid_pinpoints(value, patch: int) -> list[list[int]]:
    """`image_grid_pinpoints` as a list of [height, width]; LLaVA-NeXT's "(1x1),...,(6x6)" means every grid between."""
    if isinstance(value, str):
        found = [tuple(map(int, m)) for m in re.findall(r"\((\d+)x(\d+)\)", value)]
        if len(found) != 2:
            raise ConversionError(
                f"image_grid_pinpoints={value!r} is invalid; allowed is a list of [h, w] or '(AxB),...,(CxD)'"
            )
        (a0, b0), (a1, b1) = found
        return [[i * patch, j * patch] for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]
    if isinstance(value, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        return [list(p) for p in value]
    raise ConversionError(f"image_grid_pinpoints={value!r} is invalid; allowed is a list of [h, w] pairs")


def load_tokenizer(src: Path, tokenizer_source: str | None):
    """The tokenizer SRC ships (or `--tokenizer`), with `<image>` and `<video>` added as special tokens if absent."""
    from transformers import AutoTokenizer


    where = tokenizer_source or str(src)
    if tokenizer_source is None and not any((src / name).is_file() for name in TOKENIZER_FILES):
        raise ConversionError(
            f"SRC={str(src)!r} is invalid: it ships no tokenizer ({', '.join(TOKENIZER_FILES)}); allowed is a "
            "checkpoint "
            f"with its tokenizer files, or pass --tokenizer DIR_OR_HUB_ID (e.g. the Qwen2 model it was trained from)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except Exception as error:
        raise ConversionError(
            f"tokenizer={where!r} is invalid: cannot load it ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); allowed is a Qwen2 tokenizer directory or Hub id"
        ) from None
    missing = [t for t in ("<image>", "<video>") if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_additional_special_tokens=False)
    return tokenizer


def build_source_config(config: dict, info: WeightInfo, tokenizer, vision_config_file: str | None) -> tuple[dict, dict]:
    """(LLaVA-OneVision config dict, ST-GridPool defaults) of an original checkpoint.

    The defaults keep the source's newline position (`grid` for LLaVA-Video); the stock pooling is kept in the
    original `mm_*` fields, which go into config.json too.
    """
    from transformers import LlavaOnevisionConfig, Qwen2Config

    vision = vision_config(config, info, vision_config_file)
    text = Qwen2Config(**{k: config[k] for k in TEXT_FIELDS if k in config}).to_dict()
    image_id, video_id = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.convert_tokens_to_ids("<video>")
    embed_rows = info.shapes.get("model.embed_tokens.weight", [0])[0]
    if max(image_id, video_id) >= embed_rows:
        raise ConversionError(
            f"tokenizer is invalid for SRC: <image>/<video> get ids {image_id}/{video_id} but the embedding has "
            f"{embed_rows} rows; allowed is a tokenizer whose tokens fit the model's vocabulary"
        )
    if config.get("mm_hidden_size", vision["hidden_size"]) != vision["hidden_size"]:
        raise ConversionError(
            f"mm_hidden_size={config['mm_hidden_size']!r} is invalid: the vision tower is "
            f"{vision['hidden_size']} wide; allowed is its width"
        )
    if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConversionError(f"mm_projector_type={config['mm_projector_type']!r} is invalid: allowed is 'mlp2x_gelu'")
    pinpoints = parse_grid_pinpoints(
        config.get("image_grid_pinpoints", [[vision["image_size"]] * 2]), vision["image_size"]
    )
    converted = LlavaOnevisionConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=image_id,
        video_token_index=video_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=config.get("image_aspect_ratio", "anyres_max_9"),
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
    ).to_dict()
    if "torch_dtype" in config:
        converted["dtype"] = config["torch_dtype"]
    converted.update({k: v for k, v in config.items() if k.startswith("mm_") or k == "image_aspect_ratio"})
    from configuration_stgridpool import NEWLINE_POSITIONS

    newline = config.get("mm_newline_position", "one_token")
    defaults = {"video_newline_position": newline} if newline in NEWLINE_POSITIONS else {}
    return converted, defaults


def build_processor(config: dict, tokenizer, settings):
    """An STGridPoolProcessor for the converted model (`settings`: its VideoPoolingSettings): SigLIP-normalised
    image and video processors."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionVideoProcessor

    from processing_stgridpool import STGridPoolProcessor
    from stgridpool.chat_template import CHAT_TEMPLATE

    vision = config["vision_config"]
    size = {"height": vision["image_size"], "width": vision["image_size"]}
    common = dict(size=size, image_mean=SIGLIP_MEAN_STD, image_std=SIGLIP_MEAN_STD)
    image_processor = LlavaOnevisionImageProcessor(image_grid_pinpoints=config["image_grid_pinpoints"], **common)
    num_frames = NUM_FRAMES[flavour(config)]
    video_processor = LlavaOnevisionVideoProcessor(num_frames=num_frames, **common)
    return STGridPoolProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=(vision["image_size"] // vision["patch_size"]) ** 2,
        vision_feature_select_strategy="full",
        chat_template=tokenizer.chat_template if _handles_media(tokenizer.chat_template) else CHAT_TEMPLATE,
        vision_aspect_ratio=config["vision_aspect_ratio"],
        **settings.geometry(),
    )


def _handles_media(template) -> bool:
    """True for a chat template that renders image and video entries (a text-only Qwen template does not)."""
    return isinstance(template, str) and "<image>" in template and "<video>" in template


def stream_weights(src: Path, info: WeightInfo, target: Path) -> None:
    """Rename and re-save the weights shard by shard (one shard in memory at a time), with an index if sharded."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    shard_names = list(info.shards)
    outputs = (
        ["model.safetensors"] if len(shard_names) == 1
        else [f"model-{i + 1:05d}-of-{len(shard_names):05d}.safetensors" for i in range(len(shard_names))]
    )  # fmt: skip
    weight_map, total_size = {}, 0
    for shard, output in tqdm(list(zip(shard_names, outputs)), desc="Weight shards", unit="shard"):
        tensors = {}
        with safe_open(src / shard, "pt") as handle:
            for key in info.shards[shard]:
                new = rename_key(key)
                if new is not None:
                    tensors[new] = handle.get_tensor(key)
        save_file(tensors, target / output, metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = output
            total_size += tensor.numel() * tensor.element_size()
        del tensors
    if len(outputs) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def check_weight_names(info: WeightInfo, tied: bool) -> None:
    """Every weight has a known place; the parts a LLaVA model needs are there."""
    renamed = {rename_key(key) for key in info.shapes}
    for needed in (
        "image_newline",
        "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_2.weight",
        "language_model.model.embed_tokens.weight",
    ):
        if needed not in renamed:
            raise ConversionError(
                f"SRC weights are invalid: nothing maps to {needed!r}; allowed is a full original LLaVA-NeXT checkpoint"
            )
    if not tied and "language_model.lm_head.weight" not in renamed:
        raise ConversionError(
            "SRC weights are invalid: no lm_head.weight although tie_word_embeddings is false; allowed is a "
            "full checkpoint"
        )
