"""One model loader, shared by the `stgridpool` CLI and the lmms-eval model: a model repo (Hub id or local folder)
-> (model, processor) with the ST-GridPool settings applied to both.

Trust rule: no code from a repo runs unless the user says so. A repo whose code files (the modules its `auto_map`s
name) are byte-identical to this project's installed modules (`stgridpool.CODE_MODULES`), or that has none (a
stock llava_onevision checkpoint), loads with the installed classes. Anything else (a changed copy, another
module, another repo's code) needs `trust_remote_code=True`, and then loads through the Auto classes and the
repo's own code.

Every problem with the repo (no config.json, a bad ST-GridPool value, no or broken safetensors weights, pickle-only
weights, code that needs trust) raises `ModelLoadError`: one line naming the repo, what is wrong and what is allowed.
`resolve_model` checks everything that can be checked without running the repo's code or fetching its weights,
reading only JSON and the code files' bytes; `load_model` first checks the weights (safetensors headers).
"""

import dataclasses
import json
from pathlib import Path

from configuration_stgridpool import VideoPoolingSettings
from stgridpool import CODE_MODULES, code_file
from stgridpool.options import parse_setting

SUPPORTED_MODEL_TYPES = ("llava_onevision", "stgridpool_llava_onevision")
# Configs whose `auto_map` names code the Auto classes would run.
AUTO_MAP_FILES = (
    "config.json", "processor_config.json", "tokenizer_config.json", "preprocessor_config.json",
    "video_preprocessor_config.json",
)  # fmt: skip
WEIGHTS_NAME, WEIGHTS_INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")


class ModelLoadError(ValueError):
    """An unusable model repo; the message is one line naming the repo, what is wrong and what is allowed."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A checked model repo: where it is, its config.json, whether it loads through its own code, the settings."""

    model_id: str
    revision: str | None
    config: dict  # config.json as read
    settings: VideoPoolingSettings  # config.json's ST-GridPool settings with the overrides applied
    remote_code: bool  # True: the repo's own code (trusted), through the Auto classes; False: the installed classes
    label: str = "--model"  # how the user named the repo, for messages


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _repo_file(model_id: str, name: str, revision: str | None) -> Path | None:
    """Local path of `name` in the repo (a folder, or a Hub repo fetched into the cache); None if it has none."""
    folder = Path(model_id)
    if folder.is_dir():
        path = folder / name
        return path if path.is_file() else None
    from transformers.utils import cached_file

    return cached_file(model_id, name, revision=revision, _raise_exceptions_for_missing_entries=False)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ModelLoadError(f"{what} is not readable JSON ({_first_line(error)}); allowed is a JSON object") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{what} holds a JSON {type(data).__name__}; allowed is a JSON object")
    return data


def code_references(model_id: str, revision: str | None, prefix: str) -> list[tuple[str, str]]:
    """(config file, code reference) for every `auto_map` entry of the repo's configs, e.g.
    ("config.json", "modeling_stgridpool_llava.STGridPoolLlavaOnevisionForConditionalGeneration")."""
    references = []
    for name in AUTO_MAP_FILES:
        path = _repo_file(model_id, name, revision)
        if path is None:
            continue
        data = _read_json(path, f"{prefix}: its {name}")
        auto_map = data.get("auto_map") or {}
        if not isinstance(auto_map, dict):
            raise ModelLoadError(f"{prefix}: its {name} has auto_map={auto_map!r}; allowed is a JSON object")
        for value in auto_map.values():
            for reference in value if isinstance(value, list) else [value]:
                if reference:
                    references.append((name, str(reference)))
    return references


def untrusted_code(model_id: str, revision: str | None, prefix: str) -> list[str]:
    """Why loading this repo through its `auto_map`s would run code that is not this project's installed code: one
    reason per offending file (empty: every referenced module is a byte-identical copy, or there is none)."""
    reasons = {}
    for config_name, reference in code_references(model_id, revision, prefix):
        module = reference.rsplit(".", 1)[0]
        if "--" in module:
            reasons[reference] = f"{config_name} names another repo's code {reference!r}"
        elif module not in CODE_MODULES:
            reasons[module] = f"{config_name} names code {module}.py, which is not this project's"
    for module in CODE_MODULES:  # every copy the repo holds, named or not: a code file that differs is suspect
        path = _repo_file(model_id, f"{module}.py", revision)
        if path is not None and path.read_bytes() != code_file(module).read_bytes():
            reasons[module] = (
                f"its {module}.py differs from the installed stgridpool-llava's (changed, or another version)"
            )
    return list(reasons.values())


def check_weights(model_id: str, revision: str | None, prefix: str) -> None:
    """Refuse a repo without safetensors weights, with pickle-only weights, or with an unreadable or truncated
    safetensors file (headers are read; no tensor is)."""
    from safetensors import safe_open

    allowed = f"allowed are safetensors weights ({WEIGHTS_NAME}, or {WEIGHTS_INDEX_NAME} and its shards)"
    index = _repo_file(model_id, WEIGHTS_INDEX_NAME, revision)
    if index is not None:
        weight_map = _read_json(index, f"{prefix}: its {WEIGHTS_INDEX_NAME}").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{prefix}: its {WEIGHTS_INDEX_NAME} has no weight_map; {allowed}")
        shards = sorted(set(map(str, weight_map.values())))
    elif _repo_file(model_id, WEIGHTS_NAME, revision) is not None:
        shards = [WEIGHTS_NAME]
    else:
        local = Path(model_id).is_dir()  # on the Hub, probing would download the pickle files: only say what is missing
        pickles = [name for name in PICKLE_WEIGHTS if local and _repo_file(model_id, name, revision) is not None]
        if pickles:
            raise ModelLoadError(
                f"{prefix}: its weights are only pickle files ({', '.join(pickles)}), which are never loaded; {allowed}"
            )
        raise ModelLoadError(f"{prefix}: it has no weights; {allowed}")
    for shard in shards:
        path = _repo_file(model_id, shard, revision) if Path(shard).name == shard else None
        if path is None:
            raise ModelLoadError(
                f"{prefix}: weight file {shard!r} (from its {WEIGHTS_INDEX_NAME}) is missing; {allowed}"
            )
        try:
            with safe_open(path, "pt"):
                pass
        except Exception as error:  # SafetensorError: truncated, garbage header
            raise ModelLoadError(
                f"{prefix}: its weight file {shard} is damaged ({_first_line(error)}); {allowed}"
            ) from None


def resolve_model(
    model_id: str,
    overrides: dict | None = None,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    label: str = "--model",
    trust_hint: str = "--trust-remote-code",
) -> ModelSource:
    """Check a model repo without running any of its code; raise ModelLoadError on the first problem.

    overrides: ST-GridPool settings to apply ({field: value}; text values such as "1/9" or "4:2,4:4" are parsed by
    `stgridpool.options.parse_setting`). label / trust_hint: how the caller's user names the repo and the trust
    switch, in messages (the CLI: `--model`, `--trust-remote-code`; lmms-eval: `pretrained`, `trust_remote_code=true`).
    """
    prefix = f"{label} {model_id}"
    try:
        config_path = _repo_file(model_id, "config.json", revision)
    except Exception as error:  # not a folder, and not a Hub id that can be fetched (offline, no such repo, ...)
        raise ModelLoadError(
            f"{prefix}: no such folder, and fetching it as a Hub model id failed ({_first_line(error)}); allowed are a "
            f"model folder or a Hub model id"
        ) from None
    if config_path is None and not Path(model_id).is_dir():
        raise ModelLoadError(
            f"{prefix}: no such folder, and no config.json could be fetched for it as a Hub model id (offline, no such "
            f"repo, or no access); allowed are a model folder or a Hub model id"
        )
    if config_path is None:
        raise ModelLoadError(f"{prefix}: it has no config.json; allowed is a Transformers model folder or Hub model id")
    config = _read_json(config_path, f"{prefix}: its config.json")
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{prefix}: model_type={config.get('model_type')!r} is not supported; allowed are {SUPPORTED_MODEL_TYPES} "
            f"(LLaVA-OneVision checkpoints and ST-GridPool repos)"
        )
    try:
        overrides = {name: parse_setting(name, value) for name, value in (overrides or {}).items()}
        settings = VideoPoolingSettings.from_config({**config, **overrides})
    except ValueError as error:
        raise ModelLoadError(f"{prefix}: {str(error).splitlines()[0]}") from None
    reasons = untrusted_code(model_id, revision, prefix)
    if reasons and not trust_remote_code:
        raise ModelLoadError(
            f"{prefix}: {'; '.join(reasons)}: loading it would run that code; pass {trust_hint} if you trust it"
        )
    source = ModelSource(model_id, revision, config, settings, remote_code=bool(reasons), label=label)
    if not source.remote_code:
        build_config(source)  # every field of config.json checked now, not when the model loads
    return source


def build_config(source: ModelSource):
    """The installed STGridPoolConfig of a repo (any llava_onevision config.json) with its settings applied."""
    from configuration_stgridpool import STGridPoolConfig

    try:
        return STGridPoolConfig.from_dict({**source.config, **source.settings.to_kwargs()})
    except Exception as error:  # strict-dataclass, type and value errors of a bad config.json
        raise ModelLoadError(
            f"{source.label} {source.model_id}: its config.json is invalid ({_first_line(error)})"
        ) from None


def load_processor(source: ModelSource):
    """The repo's processor, with the settings' geometry (so its video token counts match the model's)."""
    geometry = source.settings.geometry()
    kwargs = {"revision": source.revision} if source.revision else {}
    try:
        if source.remote_code:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(source.model_id, trust_remote_code=True, **kwargs, **geometry)
        else:
            from processing_stgridpool import STGridPoolProcessor

            processor = STGridPoolProcessor.from_pretrained(source.model_id, **kwargs, **geometry)
    except Exception as error:
        raise ModelLoadError(
            f"{source.label} {source.model_id}: cannot load its processor ({_first_line(error)})"
        ) from None
    theirs = VideoPoolingSettings.from_config({**source.settings.to_kwargs(), **vars(processor)})
    if theirs.geometry() != geometry:
        raise ModelLoadError(f"{source.label} {source.model_id}: its processor does not take the settings {geometry}")
    return processor


def load_model(source: ModelSource, **model_kwargs):
    """The model (eval mode), safetensors weights only (their headers checked first, see `check_weights`).
    `model_kwargs` go to `from_pretrained` (dtype, device_map, attn_implementation, ...)."""
    check_weights(source.model_id, source.revision, f"{source.label} {source.model_id}")
    if source.revision:
        model_kwargs["revision"] = source.revision
    try:
        if source.remote_code:
            from transformers import AutoConfig, AutoModelForImageTextToText

            revision = {"revision": source.revision} if source.revision else {}
            config = AutoConfig.from_pretrained(source.model_id, trust_remote_code=True, **revision)
            config = type(config).from_dict({**config.to_dict(), **source.settings.to_kwargs()})
            model = AutoModelForImageTextToText.from_pretrained(
                source.model_id, config=config, trust_remote_code=True, use_safetensors=True, **model_kwargs
            )
        else:
            from modeling_stgridpool_llava import STGridPoolLlavaOnevisionForConditionalGeneration

            model = STGridPoolLlavaOnevisionForConditionalGeneration.from_pretrained(
                source.model_id, config=build_config(source), use_safetensors=True, **model_kwargs
            )
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(
            f"{source.label} {source.model_id}: cannot load the model ({_first_line(error)})"
        ) from None
    return model.eval()


def load_model_and_processor(source: ModelSource, **model_kwargs):
    """(model, processor) of a repo checked by `resolve_model`, the settings applied to both; the processor first,
    so a bad one fails before the weights load. `model_kwargs` go to `load_model`."""
    processor = load_processor(source)
    return load_model(source, **model_kwargs), processor
