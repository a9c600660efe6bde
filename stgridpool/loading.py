"""One model loader, shared by the `stgridpool` CLI and the lmms-eval model: a model repo (Hub id or local folder)
-> (model, processor) with the ST-GridPool settings applied to both.

Trust rule: no code from a repo runs unless the user says so. Transformers runs the modules that `auto_map`s name,
and an `auto_map` can sit anywhere in any of a repo's JSON files (`processor_config.json`'s `video_processor` entry
holds one), so every JSON file the repo ships is read and every `auto_map` in it, at any depth, counts. A repo whose
named modules are all this project's installed modules (`stgridpool.CODE_MODULES`) byte for byte, or that names none
(a stock llava_onevision checkpoint), loads with the installed classes. Anything else (a changed copy, another
module, another repo's code, a JSON file that cannot be read and so cannot be checked) needs
`trust_remote_code=True`, and then loads through the Auto classes and the repo's own code. Every Transformers
`from_pretrained` called here gets `trust_remote_code` explicitly (True only in that case), so Transformers never
asks on a terminal, and refuses any code this check would have missed.

A Hub id is checked on its snapshot in the Hub cache (its JSON and code files, downloaded first unless offline) and
loaded at that snapshot's commit: what loads is what was checked.

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

SUPPORTED_MODEL_TYPES = ("llava_onevision", "stgridpool_llava_onevision")
CHECKED_FILES = ("*.json", "*.py")  # what the trust check reads (fnmatch patterns: in any folder of the repo)
WEIGHTS_NAME, WEIGHTS_INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")


class ModelLoadError(ValueError):
    """An unusable model repo; the message is one line naming the repo, what is wrong and what is allowed."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A checked model repo: where it is, its config.json, whether it loads through its own code, the settings."""

    model_id: str  # as the user named it: a folder or a Hub id
    folder: Path  # the files that were checked: the model folder, or the Hub cache snapshot of `revision`
    revision: str | None  # a Hub id's checked commit (every load is pinned to it); None for a folder
    config: dict  # config.json as read
    settings: VideoPoolingSettings  # config.json's ST-GridPool settings with the overrides applied
    remote_code: bool  # True: the repo's own code (trusted), through the Auto classes; False: the installed classes
    label: str = "--model"  # how the user named the repo, for messages

    @property
    def name(self) -> str:
        """The repo as messages name it, e.g. `--model org/name`."""
        return f"{self.label} {self.model_id}"

    def pretrained_kwargs(self) -> dict:
        """What every Transformers `from_pretrained` of this repo gets: the checked commit, and trust only for the
        code that needed it (an explicit False, so Transformers never prompts and never runs code unasked)."""
        return {"trust_remote_code": self.remote_code, **({"revision": self.revision} if self.revision else {})}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def local_files(model_id: str, revision: str | None, prefix: str) -> tuple[Path, str | None]:
    """(folder holding the repo's files, Hub commit or None): a model folder as it is, or for a Hub id the cache
    snapshot of `revision` (default main) with its JSON and code files (`CHECKED_FILES`), fetched unless offline."""
    if Path(model_id).is_dir():
        return Path(model_id), None
    from huggingface_hub import is_offline_mode, snapshot_download

    try:  # offline, only the cache (huggingface_hub 1.x would still list a commit's files online)
        folder = snapshot_download(
            model_id, revision=revision, allow_patterns=list(CHECKED_FILES), local_files_only=is_offline_mode()
        )
    except Exception as error:  # not a Hub id, offline and not cached, no such repo or revision, no access
        raise ModelLoadError(
            f"{prefix}: no such folder, and fetching it as a Hub model id failed ({_first_line(error)}); allowed are a "
            f"model folder or a Hub model id"
        ) from None
    return Path(folder), Path(folder).name  # the cache names a snapshot by its commit


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ModelLoadError(f"{what} is not readable JSON ({_first_line(error)}); allowed is a JSON object") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{what} holds a JSON {type(data).__name__}; allowed is a JSON object")
    return data


def auto_map_references(data) -> list[str]:
    """Every code reference under an `auto_map` key anywhere in a JSON tree (at any depth; an `auto_map` value's
    leaves, e.g. "modeling_x.XModel" or "org/repo--modeling_x.XModel")."""
    references, stack = [], [(data, False)]
    while stack:  # no recursion: a deeply nested file must not overflow the stack
        node, inside = stack.pop()
        if isinstance(node, dict):
            stack.extend((value, inside or key == "auto_map") for key, value in node.items())
        elif isinstance(node, list):
            stack.extend((item, inside) for item in node)
        elif inside and node not in (None, ""):
            references.append(str(node))
    return references


def untrusted_code(folder: Path) -> list[str]:
    """Why loading this repo through its `auto_map`s would run code that is not this project's installed code: one
    reason per offending module or file (empty: every referenced module is a byte-identical copy, or there is none).
    Reads every JSON file under `folder` and the bytes of its copies of this project's modules."""
    reasons = {}
    for path in sorted(folder.rglob("*.json")):
        name = path.relative_to(folder).as_posix()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
            reasons[name] = f"its {name} cannot be checked for code references ({_first_line(error)})"
            continue
        for reference in auto_map_references(data):
            module = reference.rsplit(".", 1)[0]
            if "--" in module:
                reasons[reference] = f"{name} names another repo's code {reference!r}"
            elif module not in CODE_MODULES:
                reasons[module] = f"{name} names code {module}.py, which is not this project's"
    for module in CODE_MODULES:  # every copy the repo holds, named or not: a code file that differs is suspect
        path = folder / f"{module}.py"
        if path.is_file() and path.read_bytes() != code_file(module).read_bytes():
            reasons[module] = (
                f"its {module}.py differs from the installed stgridpool-llava's (changed, or another version)"
            )
    return list(reasons.values())


def weights_file(source: ModelSource, name: str) -> Path | None:
    """Local path of one weights file of the repo (a Hub repo's is fetched into the cache at the checked commit,
    unless offline); None if the repo has none."""
    path = source.folder / name
    if path.is_file() or source.revision is None:
        return path if path.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(
            source.model_id, name, revision=source.revision, _raise_exceptions_for_missing_entries=False
        )
    except Exception as error:  # offline without it, no access
        raise ModelLoadError(f"{source.name}: fetching its {name} failed ({_first_line(error)})") from None
    return Path(found) if found else None


def check_weights(source: ModelSource) -> None:
    """Refuse a repo without safetensors weights, with pickle-only weights, or with an unreadable or truncated
    safetensors file (headers are read; no tensor is)."""
    from safetensors import safe_open

    allowed = f"allowed are safetensors weights ({WEIGHTS_NAME}, or {WEIGHTS_INDEX_NAME} and its shards)"
    index = weights_file(source, WEIGHTS_INDEX_NAME)
    if index is not None:
        weight_map = _read_json(index, f"{source.name}: its {WEIGHTS_INDEX_NAME}").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{source.name}: its {WEIGHTS_INDEX_NAME} has no weight_map; {allowed}")
        shards = sorted(set(map(str, weight_map.values())))
    elif weights_file(source, WEIGHTS_NAME) is not None:
        shards = [WEIGHTS_NAME]
    else:
        # A Hub repo's pickle files are not fetched to say so: only a folder's are named.
        pickles = [name for name in PICKLE_WEIGHTS if source.revision is None and (source.folder / name).is_file()]
        if pickles:
            raise ModelLoadError(
                f"{source.name}: its weights are only pickle files ({', '.join(pickles)}), which are never loaded; "
                f"{allowed}"
            )
        raise ModelLoadError(f"{source.name}: it has no weights; {allowed}")
    for shard in shards:
        path = weights_file(source, shard) if Path(shard).name == shard else None
        if path is None:
            raise ModelLoadError(
                f"{source.name}: weight file {shard!r} (from its {WEIGHTS_INDEX_NAME}) is missing; {allowed}"
            )
        try:
            with safe_open(path, "pt"):
                pass
        except Exception as error:  # SafetensorError: truncated, garbage header
            raise ModelLoadError(
                f"{source.name}: its weight file {shard} is damaged ({_first_line(error)}); {allowed}"
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

    overrides: ST-GridPool settings to apply ({field: value}, values already parsed where they were given, e.g. by
    `stgridpool.options.parse_setting`). revision: a Hub id's branch, tag or commit (default main; a folder has
    none). label / trust_hint: how the caller's user names the repo and the trust switch, in messages (the CLI:
    `--model`, `--trust-remote-code`; lmms-eval: `pretrained`, `trust_remote_code=true`).
    """
    prefix = f"{label} {model_id}"
    folder, commit = local_files(model_id, revision, prefix)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{prefix}: it has no config.json; allowed is a Transformers model folder or Hub model id")
    config = _read_json(folder / "config.json", f"{prefix}: its config.json")
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{prefix}: model_type={config.get('model_type')!r} is not supported; allowed are {SUPPORTED_MODEL_TYPES} "
            f"(LLaVA-OneVision checkpoints and ST-GridPool repos)"
        )
    try:
        settings = VideoPoolingSettings.from_config({**config, **(overrides or {})})
    except ValueError as error:
        raise ModelLoadError(f"{prefix}: {str(error).splitlines()[0]}") from None
    reasons = untrusted_code(folder)
    if reasons and not trust_remote_code:
        raise ModelLoadError(
            f"{prefix}: {'; '.join(reasons)}: loading it would run that code; pass {trust_hint} if you trust it"
        )
    source = ModelSource(model_id, folder, commit, config, settings, remote_code=bool(reasons), label=label)
    if not source.remote_code:
        build_config(source)  # every field of config.json checked now, not when the model loads
    return source


def build_config(source: ModelSource):
    """The installed STGridPoolConfig of a repo (any llava_onevision config.json) with its settings applied."""
    from configuration_stgridpool import STGridPoolConfig

    try:
        return STGridPoolConfig.from_dict({**source.config, **source.settings.to_kwargs()})
    except Exception as error:  # strict-dataclass, type and value errors of a bad config.json
        raise ModelLoadError(f"{source.name}: its config.json is invalid ({_first_line(error)})") from None


def context_length(source: ModelSource) -> int:
    """Tokens the repo's language model can attend to (its text config's `max_position_embeddings`): the bound of
    any prompt plus generation."""
    return build_config(source).get_text_config().max_position_embeddings


def load_processor(source: ModelSource):
    """The repo's processor, with the settings' geometry (so its video token counts match the model's)."""
    geometry = source.settings.geometry()
    try:
        if source.remote_code:
            from transformers import AutoProcessor

            processor_class = AutoProcessor
        else:
            from processing_stgridpool import STGridPoolProcessor

            processor_class = STGridPoolProcessor
        processor = processor_class.from_pretrained(source.model_id, **source.pretrained_kwargs(), **geometry)
    except Exception as error:
        raise ModelLoadError(f"{source.name}: cannot load its processor ({_first_line(error)})") from None
    theirs = VideoPoolingSettings.from_config({**source.settings.to_kwargs(), **vars(processor)})
    if theirs.geometry() != geometry:
        raise ModelLoadError(f"{source.name}: its processor does not take the settings {geometry}")
    return processor


def load_model(source: ModelSource, **model_kwargs):
    """The model (eval mode), safetensors weights only (their headers checked first, see `check_weights`).
    `model_kwargs` go to `from_pretrained` (dtype, device_map, attn_implementation, ...)."""
    check_weights(source)
    pretrained = source.pretrained_kwargs()
    try:
        if source.remote_code:
            from transformers import AutoConfig, AutoModelForImageTextToText

            config = AutoConfig.from_pretrained(source.model_id, **pretrained)
            config = type(config).from_dict({**config.to_dict(), **source.settings.to_kwargs()})
            model_class = AutoModelForImageTextToText
        else:
            from modeling_stgridpool_llava import STGridPoolLlavaOnevisionForConditionalGeneration

            config, model_class = build_config(source), STGridPoolLlavaOnevisionForConditionalGeneration
        model = model_class.from_pretrained(
            source.model_id, config=config, use_safetensors=True, **model_kwargs, **pretrained
        )
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"{source.name}: cannot load the model ({_first_line(error)})") from None
    return model.eval()


def load_model_and_processor(source: ModelSource, **model_kwargs):
    """(model, processor) of a repo checked by `resolve_model`, the settings applied to both; the processor first,
    so a bad one fails before the weights load. `model_kwargs` go to `load_model`."""
    processor = load_processor(source)
    return load_model(source, **model_kwargs), processor
