"""Find and check the checkpoint a conversion starts from, without loading any weights.

Everything here only reads SRC: its `config.json`, its safetensors index, and the names of its files.
"""

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConversionError

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Weights in these formats are pickles or other formats this converter never reads, copies or unpickles.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SUPPORTED_MODEL_TYPES = ("llava_onevision",)
# A checkpoint ships its tokenizer if it has one of these.
ORIGINAL_ARCHITECTURES = ("LlavaQwenForCausalLM",)  # original LLaVA-NeXT checkpoints
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass
class SourceCheckpoint:
    """A checked source checkpoint: where it is, its config as a plain dict, and its safetensors files."""

    path: Path
    config: dict
    weight_files: list[str]  # file names relative to `path`, in index order
    index_file: str | None = None  # "model.safetensors.index.json" for sharded checkpoints
    hub_id: str | None = None  # the Hub model id SRC was given as, if it was one
    layout: str = "transformers"  # or "original": LLaVA-NeXT's LlavaQwenForCausalLM (convert.original)
    card_metadata: dict = field(default_factory=dict)  # the YAML front matter of SRC's README.md


def looks_like_hub_id(src: str) -> bool:
    """True for `name` or `org/name` strings (Hub model ids) that are not an existing local path."""
    parts = src.split("/")
    return (
        not os.path.exists(src)
        and 1 <= len(parts) <= 2
        and all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", part) for part in parts)
    )


def resolve_source(src: str, revision: str | None = None) -> tuple[Path, str | None]:
    """Local directory for SRC, downloading a Hub model id with `snapshot_download` (no pickle weights).

    Returns (directory, Hub id or None).
    """
    allowed = "allowed are a local checkpoint directory or a Hub model id (org/name)"
    if os.path.isdir(src):
        return Path(src), None
    if os.path.exists(src):
        raise ConversionError(f"SRC={src!r} is invalid: it is a file, not a directory; {allowed}")
    if not looks_like_hub_id(src):
        raise ConversionError(f"SRC={src!r} is invalid: no such directory; {allowed}")
    from huggingface_hub import snapshot_download

    ignore = [f"*{suffix}" for suffix in PICKLE_SUFFIXES] + ["*.msgpack", "*.h5", "*.onnx"]
    try:
        path = snapshot_download(src, revision=revision, ignore_patterns=ignore)
    except Exception as error:  # offline, no such repo, no access: one clear line
        reason = str(error).splitlines()[0] if str(error) else ""
        raise ConversionError(
            f"SRC={src!r} is invalid: no such directory, and downloading it as a Hub model id failed "
            f"({type(error).__name__}: {reason}); {allowed}"
        ) from None
    return Path(path), src


def read_json(path: Path, what: str) -> dict:
    """Parse a JSON file; a ConversionError naming the file if it is not a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(
            f"{what}={str(path)!r} is invalid: cannot read it as JSON ({error}); allowed is a JSON object"
        ) from None
    if not isinstance(data, dict):
        raise ConversionError(
            f"{what}={str(path)!r} is invalid: it holds a {type(data).__name__}; allowed is a JSON object"
        )
    return data


def read_card_metadata(readme: Path) -> dict:
    """The YAML front matter of a model card (`---` ... `---` at the top), or {} when there is none or it is broken."""
    if not readme.is_file():
        return {}
    import yaml

    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def find_weight_files(path: Path) -> tuple[list[str], str | None]:
    """The safetensors files of the checkpoint at `path` and its index file name (None when unsharded).

    Refuses pickle-only checkpoints and indexes that list a missing shard.
    """
    index = path / WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = read_json(index, "weights index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(
                f"weights index={str(index)!r} is invalid: it has no 'weight_map'; allowed is a Transformers "
                "safetensors index"
            )
        shards = list(dict.fromkeys(weight_map.values()))
        for shard in shards:
            if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
                raise ConversionError(
                    f"weights index={str(index)!r} is invalid: it lists shard {shard!r}; allowed are "
                    ".safetensors file names in SRC"
                )
        missing = [shard for shard in shards if not (path / shard).is_file()]
        if missing:
            raise ConversionError(
                f"SRC={str(path)!r} is invalid: its weights index lists {len(missing)} missing shard(s) "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); allowed is a complete checkpoint "
                f"with every shard its index names"
            )
        return shards, WEIGHTS_INDEX_NAME
    if (path / WEIGHTS_NAME).is_file():
        return [WEIGHTS_NAME], None
    pickles = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ConversionError(
            f"SRC={str(path)!r} is invalid: its weights are only pickle files ({', '.join(pickles[:3])}), which this "
            f"converter never loads; allowed are safetensors weights ({WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} + "
            "shards): "
            f"convert them first, e.g. with Transformers' save_pretrained(safe_serialization=True)"
        )
    raise ConversionError(
        f"SRC={str(path)!r} is invalid: it has no weights; allowed are safetensors weights ({WEIGHTS_NAME} or "
        f"{WEIGHTS_INDEX_NAME} + shards)"
    )


def check_weight_headers(path: Path, weight_files: list[str]) -> None:
    """Refuse safetensors files whose header cannot be read (garbage, or cut short); no tensor is read."""
    from safetensors import safe_open

    for name in weight_files:
        try:
            with safe_open(path / name, "pt"):
                pass
        except Exception as error:  # SafetensorError, OSError
            reason = str(error).splitlines()[0] if str(error) else ""
            raise ConversionError(
                f"SRC weights={str(path / name)!r} are invalid: not a readable safetensors file "
                f"({type(error).__name__}: "
                f"{reason}); allowed are complete safetensors files"
            ) from None


def is_original_layout(config: dict) -> bool:
    """True for an original LLaVA-NeXT (LlavaQwenForCausalLM) config.json."""
    architectures = config.get("architectures") or []
    return config.get("model_type") == "llava" and (
        any(a in ORIGINAL_ARCHITECTURES for a in architectures) or "mm_vision_tower" in config
    )


def inspect_source(src: str, revision: str | None = None) -> SourceCheckpoint:
    """Resolve and check SRC: a Transformers-format LLaVA-OneVision checkpoint with safetensors weights."""
    path, hub_id = resolve_source(src, revision)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConversionError(
            f"SRC={src!r} is invalid: it has no config.json; allowed is a Transformers-format checkpoint directory "
            f"or Hub model id with model_type in {SUPPORTED_MODEL_TYPES}"
        )
    config = read_json(config_path, "SRC config")
    model_type = config.get("model_type")
    if model_type in SUPPORTED_MODEL_TYPES:
        layout = "transformers"
    elif is_original_layout(config):
        layout = "original"
    else:
        raise ConversionError(
            f"SRC={src!r} is invalid: its config.json has model_type={model_type!r}; allowed is a LLaVA-OneVision "
            f"checkpoint in Transformers format (model_type in {SUPPORTED_MODEL_TYPES}) or an original LLaVA-NeXT "
            f"one (model_type 'llava', LlavaQwenForCausalLM: LLaVA-Video, lmms-lab LLaVA-OneVision)"
        )
    weight_files, index_file = find_weight_files(path)
    check_weight_headers(path, weight_files)
    return SourceCheckpoint(
        path=path,
        config=config,
        weight_files=weight_files,
        index_file=index_file,
        hub_id=hub_id,
        layout=layout,
        card_metadata=read_card_metadata(path / "README.md"),
    )
