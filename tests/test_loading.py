"""The model loader (`stgridpool.loading`), the one place a model repo is checked: folders and Hub ids (from a
populated offline Hub cache, as a user's `ORG/NAME` resolves), the trust rule over every JSON file a repo ships,
and every unusable repo refused in one line."""

import builtins
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from helpers import add_to_hub_cache, copy_repo, evil_repo, use_hub_cache, write_json

from stgridpool.loading import ModelLoadError, load_model, load_model_and_processor, load_processor, resolve_model


def snapshot(cache: Path, repo_id: str, commit: str) -> Path:
    return cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit


@pytest.mark.parametrize("kind", ["stock", "converted"])
def test_hub_id_loads_like_its_folder(kind, offline_hub, hub_cache_dir, tiny_stock_dir, converted_dir):
    """`ORG/NAME` from the Hub cache: checked on its snapshot, pinned to the snapshot's commit, and loaded with the
    installed classes exactly as the same files in a folder load."""
    repo_id = offline_hub[kind]
    folder = {"stock": tiny_stock_dir, "converted": converted_dir}[kind]
    commit = (hub_cache_dir / f"models--{repo_id.replace('/', '--')}" / "refs" / "main").read_text()
    source = resolve_model(repo_id)
    assert (source.revision, source.folder) == (commit, snapshot(hub_cache_dir, repo_id, commit))
    assert not source.remote_code and source.pretrained_kwargs() == {"trust_remote_code": False, "revision": commit}
    for revision in ("main", commit):
        assert resolve_model(repo_id, revision=revision) == source
    model, processor = load_model_and_processor(source)
    local_model, local_processor = load_model_and_processor(resolve_model(str(folder)))
    assert type(model).__name__ == type(local_model).__name__ == "STGridPoolLlavaOnevisionForConditionalGeneration"
    assert type(processor).__name__ == "STGridPoolProcessor"
    assert processor.num_video_tokens(4) == local_processor.num_video_tokens(4)
    assert model.config.name_or_path == repo_id
    assert {**model.config.to_dict(), "_name_or_path": ""} == {**local_model.config.to_dict(), "_name_or_path": ""}
    for name, tensor in local_model.state_dict().items():
        assert model.state_dict()[name].equal(tensor), name


def test_hub_revision_is_the_one_checked_and_loaded(tiny_stock_dir, tmp_path, monkeypatch):
    """Two commits of one id: main changed the modeling code (refused without trust), the tag v1 did not; each
    revision is checked on its own snapshot and loads from it (v1's bilinear config, not main's)."""
    cache, repo_id = tmp_path / "cache", "tiny-org/two-commits"
    v1 = copy_repo(tiny_stock_dir, tmp_path / "v1")
    write_json(v1 / "config.json", {**json.loads((tiny_stock_dir / "config.json").read_text()),
                                   "video_pooling_mode": "bilinear"})  # fmt: skip
    old = add_to_hub_cache(cache, repo_id, v1, refs=("v1",))
    main = copy_repo(tiny_stock_dir, tmp_path / "main")
    (main / "modeling_stgridpool_llava.py").write_text("raise SystemExit('never imported')\n")
    add_to_hub_cache(cache, repo_id, main)
    use_hub_cache(monkeypatch, cache)
    with pytest.raises(ModelLoadError, match="modeling_stgridpool_llava.py differs"):
        resolve_model(repo_id)
    source = resolve_model(repo_id, revision="v1")
    assert source.revision == old and source.settings.video_pooling_mode == "bilinear"
    model, processor = load_model_and_processor(source)
    assert model.config.video_pooling_mode == processor.video_pooling_mode == "bilinear"


def test_hub_id_problems_are_one_line(offline_hub, hub_cache_dir, tmp_path, monkeypatch):
    cases = {
        "tiny-org/not-cached": "fetching it as a Hub model id failed (LocalEntryNotFoundError",
        str(tmp_path / "no" / "such" / "folder"): "no such folder, and fetching it as a Hub model id failed",
    }
    for model_id, words in cases.items():
        with pytest.raises(ModelLoadError) as error:
            resolve_model(model_id)
        message = str(error.value)
        assert message.startswith(f"--model {model_id}: ") and words in message and "\n" not in message, message
    # a cached snapshot without its weights: the id resolves, the weights are named as missing
    cache = tmp_path / "cache"
    shutil.copytree(hub_cache_dir, cache, symlinks=True)
    commit = (cache / f"models--{offline_hub['stock'].replace('/', '--')}" / "refs" / "main").read_text()
    (snapshot(cache, offline_hub["stock"], commit) / "model.safetensors").unlink()
    use_hub_cache(monkeypatch, cache)
    with pytest.raises(ModelLoadError, match=f"--model {offline_hub['stock']}: it has no weights; allowed are"):
        load_model(resolve_model(offline_hub["stock"]))


def test_code_anywhere_in_any_json_needs_trust(converted_dir, tmp_path):
    """An `auto_map` at any depth of any JSON file the repo ships (and a JSON file that cannot be read, so cannot
    be checked) naming code that is not this project's: refused in one line without trust, remote code with it."""
    processor_config = json.loads((converted_dir / "processor_config.json").read_text())
    nested = json.loads((converted_dir / "processor_config.json").read_text())
    nested["video_processor"]["auto_map"] = {"AutoVideoProcessor": "evil.EvilVideoProcessor"}
    backends = json.loads((converted_dir / "processor_config.json").read_text())
    backends["image_processor"]["auto_map"] = {"AutoImageProcessor": {"torchvision": "evil_fast.Fast"}}
    config = json.loads((converted_dir / "config.json").read_text())
    cases = {  # name: ({file: JSON to write, or text}, words)
        "tokenizer": ({"tokenizer_config.json": {"auto_map": {"AutoTokenizer": ["tokenization_x.X", None]}}},
                      "tokenizer_config.json names code tokenization_x.py"),
        "other repo": ({"processor_config.json": {**processor_config, "auto_map": {"AutoProcessor": "o/r--p.X"}}},
                       "processor_config.json names another repo's code 'o/r--p.X'"),
        "model": ({"config.json": {**config, "auto_map": {**config["auto_map"], "AutoModel": "modeling_x.X"}}},
                  "config.json names code modeling_x.py"),
        "nested video processor": ({"processor_config.json": nested}, "processor_config.json names code evil.py"),
        "backend map": ({"processor_config.json": backends}, "names code evil_fast.py"),
        "any file, any depth": ({"extra/custom.json": [{"a": [{"auto_map": {"AutoModel": "deep.D"}}]}]},
                                "extra/custom.json names code deep.py"),
        "unreadable json": ({"other.json": "{not json"}, "its other.json cannot be checked for code references"),
    }  # fmt: skip
    for name, (files, words) in cases.items():
        repo = copy_repo(converted_dir, tmp_path / name.replace(" ", "-"))
        for file_name, data in files.items():
            if isinstance(data, str):
                (repo / file_name).write_text(data)
            else:
                write_json(repo / file_name, data)
        with pytest.raises(ModelLoadError, match="--trust-remote-code if you trust it") as error:
            resolve_model(str(repo))
        message = str(error.value)
        assert message.startswith(f"--model {repo}: ") and words in message and "\n" not in message, (name, message)
        assert resolve_model(str(repo), trust_remote_code=True).remote_code, name
    assert not resolve_model(str(converted_dir)).remote_code  # its own auto_maps (nested one included) are ours


@pytest.mark.parametrize("where", ["video_processor", "tokenizer"])
def test_foreign_code_never_runs_even_when_a_terminal_says_yes(where, tiny_stock_dir, tmp_path, monkeypatch):
    """A repo whose `auto_map` Transformers would ask about: refused by the check, and even a source that got past
    it (as if the check had missed the code) loads with an explicit trust_remote_code=False: Transformers refuses
    instead of asking, so a user (or `yes |`) answering y at a prompt never runs evil.py."""
    marker = tmp_path / "marker"
    repo = evil_repo(tiny_stock_dir, tmp_path / "evil", marker, where)
    with pytest.raises(ModelLoadError, match=r"names code evil\.py, which is not this project's"):
        resolve_model(str(repo))
    prompts = []

    def answer_yes(prompt=""):
        prompts.append(prompt)
        return "y"

    monkeypatch.setattr(builtins, "input", answer_yes)
    missed = dataclasses.replace(resolve_model(str(repo), trust_remote_code=True), remote_code=False)
    with pytest.raises(ModelLoadError, match=f"--model {repo}: cannot load its processor"):
        load_processor(missed)
    assert prompts == [] and not marker.exists()


def test_unusable_repos_are_one_line(tiny_stock_dir, converted_dir, tmp_path):
    """Every unusable repo: one ModelLoadError line naming the repo, what is wrong and what is allowed, before any
    weight is read."""
    config = json.loads((converted_dir / "config.json").read_text())
    weights = (converted_dir / "model.safetensors").read_bytes()
    cases = {  # name: ({file: new JSON, bytes, or None to delete}, words)
        "keep ratio": ({"config.json": {**config, "nsp_keep_ratio": 0.3}}, "nsp_keep_ratio=0.3"),
        "temperature": ({"config.json": {**config, "nsp_temperature": -1}}, "nsp_temperature=-1"),
        "mode": ({"config.json": {**config, "video_pooling_mode": "max"}}, "video_pooling_mode='max'"),
        "pyramid": ({"config.json": {**config, "pyramid_levels": [[0, 2]]}}, "group size 0"),
        "vision config": ({"config.json": {**config, "vision_config": 5}}, "config.json is invalid"),
        "list config": ({"config.json": [1, 2]}, "JSON list"),
        "no config": ({"config.json": None}, "no config.json"),
        "model type": ({"config.json": {**config, "model_type": "qwen2"}}, "model_type='qwen2'"),
        "no weights": ({"model.safetensors": None}, "no weights"),
        "truncated": ({"model.safetensors": weights[: len(weights) // 2]}, "damaged"),
        "garbage": ({"model.safetensors": b"garbage" * 20}, "damaged"),
        "pickle": ({"model.safetensors": None, "pytorch_model.bin": b"never unpickled"}, "pickle"),
    }
    for name, (changes, words) in cases.items():
        repo = copy_repo(converted_dir, tmp_path / name.replace(" ", "-"))
        for file_name, content in changes.items():
            (repo / file_name).unlink(missing_ok=True)
            if isinstance(content, bytes):
                (repo / file_name).write_bytes(content)
            elif content is not None:
                write_json(repo / file_name, content)
        with pytest.raises(ModelLoadError) as error:
            load_model_and_processor(resolve_model(str(repo)))
        message = str(error.value)
        assert message.startswith(f"--model {repo}: ") and words in message and "\n" not in message, (name, message)
