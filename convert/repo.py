"""Write an ST-GridPool model repo from a checked source checkpoint.

The repo is built in a temporary directory next to DST and renamed into place at the end, so a failure leaves
nothing half-written. Weights are hard-linked or copied byte for byte, never loaded.
"""

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from configuration_stgridpool import GEOMETRY_FIELDS, STGRIDPOOL_FIELDS

from .errors import ConversionError
from .source import PICKLE_SUFFIXES, SourceCheckpoint

MODEL_TYPE = "stgridpool_llava_onevision"
ARCHITECTURE = "STGridPoolLlavaOnevisionForConditionalGeneration"
CODE_MODULES = ("configuration_stgridpool", "modeling_stgridpool_llava", "processing_stgridpool", "stgridpool_triton")
PROCESSOR_CLASS = "STGridPoolProcessor"
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_stgridpool.STGridPoolProcessor"}
# What the Auto classes and pipelines ("image-text-to-text": AutoModelForImageTextToText, "any-to-any":
# AutoModelForMultimodalLM) resolve through remote code.
MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_stgridpool.STGridPoolConfig",
    "AutoModel": "modeling_stgridpool_llava.STGridPoolLlavaOnevisionModel",
    "AutoModelForImageTextToText": f"modeling_stgridpool_llava.{ARCHITECTURE}",
    "AutoModelForMultimodalLM": f"modeling_stgridpool_llava.{ARCHITECTURE}",
    **PROCESSOR_AUTO_MAP,
}
# Files of SRC that the repo gets from elsewhere, or never: rewritten, replaced, or not safe to carry.
REWRITTEN_FILES = ("config.json", "README.md")
SKIPPED_SUFFIXES = PICKLE_SUFFIXES + (".safetensors", ".msgpack", ".h5", ".onnx", ".py", ".pyc")
# Files that may name the processor class; they are pointed at ours so AutoProcessor finds it whichever it reads.
PROCESSOR_NAMING_FILES = ("tokenizer_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_config(source_config: dict, overrides: dict) -> dict:
    """config.json of the repo: every field of the source config, the ST-GridPool fields, type and auto_map.

    `overrides` holds the ST-GridPool fields the user chose; the others take STGridPoolConfig's defaults (the
    paper's settings). Validated by building the STGridPoolConfig, whose errors name the field, value and what
    is allowed.
    """
    from configuration_stgridpool import STGridPoolConfig

    merged = {**source_config, **overrides, "model_type": MODEL_TYPE}
    try:
        config = STGridPoolConfig.from_dict(merged)
    except (ValueError, TypeError) as error:
        raise ConversionError(str(error).splitlines()[0]) from None
    fields = {name: getattr(config, name) for name in STGRIDPOOL_FIELDS}
    fields["pyramid_levels"] = [list(level) for level in fields["pyramid_levels"]]
    return {**source_config, **fields, "model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "auto_map": MODEL_AUTO_MAP}


def check_destination(dst: Path, source: Path, overwrite: bool) -> None:
    """Refuse a DST that is a file, a non-empty directory (unless `overwrite`), SRC itself, or contains SRC."""
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"DST={str(dst)!r} is invalid: it is a file; allowed is a new or empty directory (or --overwrite for a directory)")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ConversionError(
            f"DST={str(dst)!r} is invalid: it is a non-empty directory; allowed is a new or empty directory, "
            f"or pass --overwrite to replace it"
        )
    dst_real, src_real = dst.resolve(), source.resolve()
    if dst_real == src_real or dst_real in src_real.parents:
        raise ConversionError(f"DST={str(dst)!r} is invalid: it is or contains SRC {str(source)!r}; allowed is a directory outside SRC")


def code_file(module: str) -> Path:
    """Path of one of this project's three top-level modules, as installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ConversionError(f"module {module!r} is not installed; allowed is running the converter from an installed stgridpool-llava")
    return Path(spec.origin)


def carried_files(source: SourceCheckpoint) -> list[str]:
    """SRC's top-level files that go into the repo as they are (tokenizer, processor, generation config, ...)."""
    names = []
    for entry in sorted(source.path.iterdir()):
        name = entry.name
        if not entry.is_file() or name.startswith(".") or name in REWRITTEN_FILES or name == source.index_file:
            continue
        if name.endswith(SKIPPED_SUFFIXES):
            continue
        names.append(name)
    return names


def check_processor_files(source: SourceCheckpoint) -> None:
    """Refuse a SRC that ships no tokenizer or no image processor: the repo would not be complete."""
    path = source.path
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConversionError(
            f"SRC={str(path)!r} is invalid: it has no tokenizer files ({' or '.join(TOKENIZER_FILES)}); allowed is a "
            f"checkpoint that ships its processor, as llava-hf repos do (save it with processor.save_pretrained)"
        )
    processor = path / "processor_config.json"
    nested = processor.is_file() and "image_processor" in _read_json(processor)
    if not nested and not (path / "preprocessor_config.json").is_file():
        raise ConversionError(
            f"SRC={str(path)!r} is invalid: it has no image processor (preprocessor_config.json, or processor_config.json "
            f"with 'image_processor'); allowed is a checkpoint that ships its processor, as llava-hf repos do"
        )


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def processor_config(path: Path, config: dict) -> dict:
    """processor_config.json: the one at `path` (if any) with our class, auto_map and the model config's geometry."""
    data = _read_json(path) if path.is_file() else {}
    data.update({name: config[name] for name in GEOMETRY_FIELDS})
    data["processor_class"] = PROCESSOR_CLASS
    data["auto_map"] = {**data.get("auto_map", {}), **PROCESSOR_AUTO_MAP}
    return data


def point_processor_class(path: Path) -> None:
    """Make a carried tokenizer/image/video processor config name our processor class, if it names one."""
    if not path.is_file():
        return
    data = _read_json(path)
    if "processor_class" not in data:
        return
    data["processor_class"] = PROCESSOR_CLASS
    data["auto_map"] = {**data.get("auto_map", {}), **PROCESSOR_AUTO_MAP}
    _write_json(path, data)


def transfer_weights(source: SourceCheckpoint, target: Path, copy: bool) -> None:
    """Hard-link (or with `copy`, copy) SRC's safetensors files and index into `target`, byte for byte.

    Falls back to copying where a hard link is impossible (another filesystem). One progress bar over all bytes.
    """
    from tqdm.auto import tqdm

    files = list(source.weight_files) + ([source.index_file] if source.index_file else [])
    total = sum((source.path / name).stat().st_size for name in files)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="Weights") as progress:
        for name in files:
            src_file = (source.path / name).resolve()  # Hub caches hold symlinks to blobs: link the blob
            dst_file = target / name
            if not copy:
                try:
                    os.link(src_file, dst_file)
                    progress.update(src_file.stat().st_size)
                    continue
                except OSError:
                    pass
            _copy_with_progress(src_file, dst_file, progress)


def _copy_with_progress(src: Path, dst: Path, progress, chunk_size: int = 64 << 20) -> None:
    with open(src, "rb") as reader, open(dst, "wb") as writer:
        while chunk := reader.read(chunk_size):
            writer.write(chunk)
            progress.update(len(chunk))
    shutil.copymode(src, dst)


def _new_temp_dir(dst: Path) -> Path:
    """An empty directory next to DST (same filesystem, so the final rename is atomic), with normal permissions."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp, 0o777 & ~umask)
    return temp


def _move_into_place(temp: Path, dst: Path) -> None:
    """Rename the finished `temp` to DST, replacing an existing (empty, or --overwrite) DST."""
    if dst.exists():
        old = temp.with_suffix(".old")
        os.rename(dst, old)
        os.rename(temp, dst)
        shutil.rmtree(old)
    else:
        os.rename(temp, dst)


def copy_stock_files(source: SourceCheckpoint, target: Path, copy: bool) -> None:
    """Fill `target` from a Transformers-format SRC: its processor/tokenizer/generation files and its weights."""
    for name in carried_files(source):
        shutil.copyfile(source.path / name, target / name)
    transfer_weights(source, target, copy)


def write_repo(source_path: Path, config: dict, card: str, dst: Path, fill, *, overwrite: bool = False) -> Path:
    """Write the complete repo to DST (see module docstring).

    `config` from `build_config`, `card` the README text, `fill(temp)` writes the source-specific files (processor,
    tokenizer, generation config, weights) into the temporary directory; the rest is common.
    """
    check_destination(dst, source_path, overwrite)
    code = [code_file(module) for module in CODE_MODULES]
    temp = _new_temp_dir(dst)
    try:
        fill(temp)
        for name in PROCESSOR_NAMING_FILES:
            point_processor_class(temp / name)
        _write_json(temp / "processor_config.json", processor_config(temp / "processor_config.json", config))
        _write_json(temp / "config.json", config)
        for path in code:
            shutil.copyfile(path, temp / path.name)
        (temp / "README.md").write_text(card, encoding="utf-8")
        _move_into_place(temp, dst)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return dst
