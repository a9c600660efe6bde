"""Write an ST-GridPool model repo from a checked source checkpoint.

The repo is built in a temporary directory next to DST and renamed into place at the end, so a failure leaves
nothing half-written. Weights are hard-linked or copied byte for byte, never loaded.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

from configuration_stgridpool import STGRIDPOOL_FIELDS, VideoPoolingSettings
from stgridpool import CODE_MODULES, code_file

from .errors import ConversionError
from .source import TOKENIZER_FILES, SourceCheckpoint, read_json

MODEL_TYPE = "stgridpool_llava_onevision"
ARCHITECTURE = "STGridPoolLlavaOnevisionForConditionalGeneration"
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
# SRC's files that go into the repo as they are: what a LLaVA-OneVision model repo holds besides its config, card,
# weights and code. An allow-list: anything else (code, binaries, pickles, notebooks) stays behind.
CARRIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "video_preprocessor_config.json", "processor_config.json", "generation_config.json",
    "LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "NOTICE.txt",
)  # fmt: skip
# Carried configs that may name a processor class or carry an auto_map: pointed at our processor, other code dropped.
PROCESSOR_NAMING_FILES = ("tokenizer_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
# Class-name fields of carried configs, which must name Transformers classes once foreign auto_map entries are gone.
CLASS_FIELDS = ("tokenizer_class", "image_processor_type", "video_processor_type", "feature_extractor_type")


def build_config(source_config: dict, overrides: dict) -> dict:
    """config.json of the repo: every field of the source config, the ST-GridPool fields, type and auto_map.

    `overrides` holds the ST-GridPool fields the user chose; the others take the source's values or the defaults
    (the paper's settings). Validated by `VideoPoolingSettings` and by building the STGridPoolConfig, whose errors
    name the field, value and what is allowed.
    """
    from configuration_stgridpool import STGridPoolConfig

    try:
        settings = VideoPoolingSettings.from_config({**source_config, **overrides})
    except ValueError as error:
        raise ConversionError(str(error).splitlines()[0]) from None
    fields = settings.to_kwargs()
    try:
        STGridPoolConfig.from_dict({**source_config, **fields, "model_type": MODEL_TYPE})
    except Exception as error:  # a bad SRC config.json: strict-dataclass, type and value errors
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if not message.startswith(STGRIDPOOL_FIELDS):
            message = (
                f"SRC config.json is invalid: {type(error).__name__}: {message}; allowed is a LLaVA-OneVision config "
                f"as Transformers saves it"
            )
        raise ConversionError(message) from None
    return {
        **source_config,
        **fields,
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "auto_map": MODEL_AUTO_MAP,
    }


def check_destination(dst: Path, source: Path, overwrite: bool) -> None:
    """Refuse a DST that is a file, a non-empty directory (unless `overwrite`), SRC itself, inside SRC or containing
    SRC, or a dangling symbolic link. `dst` is absolute; a link to a directory is checked as its target."""
    if dst.is_symlink() and not dst.exists():
        raise ConversionError(
            f"DST={str(dst)!r} is invalid: it is a symbolic link to {os.readlink(dst)!r}, which does not exist; "
            "allowed "
            f"is a new or empty directory, or a link to one"
        )
    if dst.exists() and not dst.is_dir():
        raise ConversionError(
            f"DST={str(dst)!r} is invalid: it is a file; allowed is a new or empty directory (or --overwrite "
            "for a directory)"
        )
    dst_real, src_real = dst.resolve(), source.resolve()
    if dst_real == src_real or dst_real in src_real.parents or src_real in dst_real.parents:
        raise ConversionError(
            f"DST={str(dst)!r} is invalid: it is, contains or is inside SRC {str(source)!r}; the converter "
            "never writes "
            f"into its source; allowed is a directory outside SRC"
        )
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ConversionError(
            f"DST={str(dst)!r} is invalid: it is a non-empty directory; allowed is a new or empty directory, "
            f"or pass --overwrite to replace it"
        )


def carried_files(source: SourceCheckpoint) -> list[str]:
    """SRC's top-level files that go into the repo as they are (`CARRIED_FILES`: tokenizer, processor, generation
    config, chat template, license)."""
    return [name for name in CARRIED_FILES if (source.path / name).is_file()]


def check_processor_files(source: SourceCheckpoint) -> None:
    """Refuse a SRC whose carried configs are not JSON objects, that ships no tokenizer or no image processor (the
    repo would not be complete), or whose tokenizer/processor needs code other than this project's."""
    path = source.path
    configs = {name: read_json(path / name, "SRC file") for name in carried_files(source) if name.endswith(".json")}
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConversionError(
            f"SRC={str(path)!r} is invalid: it has no tokenizer files ({' or '.join(TOKENIZER_FILES)}); allowed is a "
            f"checkpoint that ships its processor, as llava-hf repos do (save it with processor.save_pretrained)"
        )
    nested = "image_processor" in configs.get("processor_config.json", {})
    if not nested and "preprocessor_config.json" not in configs:
        raise ConversionError(
            f"SRC={str(path)!r} is invalid: it has no image processor (preprocessor_config.json, or "
            "processor_config.json "
            f"with 'image_processor'); allowed is a checkpoint that ships its processor, as llava-hf repos do"
        )
    import transformers

    for name, data in configs.items():
        sections = [data] + [value for value in data.values() if isinstance(value, dict)]  # processor_config nests
        for section in sections:
            for field in CLASS_FIELDS:
                value = section.get(field)
                if isinstance(value, str) and not hasattr(transformers, value):
                    raise ConversionError(
                        f"SRC file={str(path / name)!r} is invalid: {field}={value!r} is not a Transformers class (it "
                        "needs code the repo would not carry); allowed are tokenizers and processors "
                        "Transformers ships"
                    )


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def own_auto_map(data: dict) -> dict:
    """`data` (a carried config) with its auto_map replaced by ours: our processor if it names a processor class,
    else none. Another repo's or module's code (`tokenization_x.X`, `org/repo--x.X`) is never referenced."""
    data = {key: value for key, value in data.items() if key != "auto_map"}
    if "processor_class" in data:
        data["processor_class"] = PROCESSOR_CLASS
        data["auto_map"] = dict(PROCESSOR_AUTO_MAP)
    return data


def processor_config(path: Path, settings: VideoPoolingSettings) -> dict:
    """processor_config.json: the one at `path` (if any) with our class, auto_map and the model's geometry."""
    data = _read_json(path) if path.is_file() else {}
    data.update(settings.geometry())
    data["processor_class"] = PROCESSOR_CLASS
    return own_auto_map(data)


def point_processor_class(path: Path) -> None:
    """Make a carried tokenizer/image/video processor config name our processor class and no other code."""
    if not path.is_file():
        return
    data = _read_json(path)
    cleaned = own_auto_map(data)
    if cleaned != data:
        _write_json(path, cleaned)


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


def _stale(entry: Path, dst: Path) -> bool:
    """True for a work folder of DST (`.NAME.PID.*.partial` / `.old`) whose process is gone (killed mid-write)."""
    pid = entry.name[len(dst.name) + 2 :].split(".")[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _remove_stale_work_dirs(dst: Path) -> None:
    """Remove what an earlier conversion to DST left when it was killed (kill -9 runs no cleanup)."""
    if not dst.parent.is_dir():
        return
    for entry in dst.parent.glob(f".{dst.name}.*"):
        if (
            entry.name.endswith((".partial", ".old"))
            and entry.is_dir()
            and not entry.is_symlink()
            and _stale(entry, dst)
        ):
            shutil.rmtree(entry, ignore_errors=True)


def _new_temp_dir(dst: Path) -> tuple[Path, Path | None]:
    """An empty directory next to DST (same filesystem, so the final rename is atomic), with normal permissions,
    named after this process (so a later run can tell it is stale). Returns (it, the first parent folder this
    created, or None)."""
    created = None
    for parent in reversed(dst.parents):
        if not parent.exists():
            created = parent
            break
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_work_dirs(dst)
    temp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.{os.getpid()}.", suffix=".partial", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp, 0o777 & ~umask)
    return temp, created


def _move_into_place(temp: Path, dst: Path) -> None:
    """Rename the finished `temp` to DST, replacing an existing (empty, or --overwrite) DST directory; if that
    fails half-way, DST is put back."""
    if dst.exists():
        old = temp.with_suffix(".old")
        os.rename(dst, old)
        try:
            os.rename(temp, dst)
        except BaseException:
            os.rename(old, dst)
            raise
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
    tokenizer, generation config, weights) into the temporary directory; the rest is common. DST is absolute; a
    symbolic link to a directory is written through (the link stays, its target gets the repo).
    """
    check_destination(dst, source_path, overwrite)
    dst = dst.resolve()
    code = [code_file(module) for module in CODE_MODULES]
    settings = VideoPoolingSettings.from_config(config)
    temp, created = _new_temp_dir(dst)
    try:
        fill(temp)
        for name in PROCESSOR_NAMING_FILES:
            point_processor_class(temp / name)
        _write_json(temp / "processor_config.json", processor_config(temp / "processor_config.json", settings))
        _write_json(temp / "config.json", config)
        for path in code:
            shutil.copyfile(path, temp / path.name)
        (temp / "README.md").write_text(card, encoding="utf-8")
        _move_into_place(temp, dst)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        if created is not None:  # the parent folders this run made, if still empty
            for folder in [dst.parent, *dst.parent.parents]:
                try:
                    folder.rmdir()
                except OSError:
                    break
                if folder == created:
                    break
        raise
    return dst
