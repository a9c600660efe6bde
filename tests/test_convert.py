"""The converter: a stock LLaVA-OneVision checkpoint -> an ST-GridPool Hub repo that loads with trust_remote_code.

All offline: the tests write tiny stock checkpoints themselves. Loading checks run in fresh Python processes where
the project's modules cannot be imported (tests/remote_check.py), as on a user's machine that only has the repo.
"""

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from helpers import add_to_hub_cache, use_hub_cache

import stgridpool

PROJECT = Path(__file__).resolve().parents[1]
REMOTE_CHECK = Path(__file__).with_name("remote_check.py")
# The code files a repo carries: the converter's one list (it grows when the project adds a module).
CODE_MODULES = tuple(f"{module}.py" for module in stgridpool.CODE_MODULES)
SOURCE_CARD = "---\nlicense: apache-2.0\nlanguage:\n- en\n---\n\n# tiny llava-onevision\n"
# Non-default settings for the main conversion, so the test sees that every option lands in config and processor.
OPTIONS = {
    "--pyramid-levels": "2:1,4:2",
    "--keep-ratio": "1/9",
    "--temperature": "0.5",
    "--norm-p": "1",
    "--padding": "1",
    "--newline-position": "frame",
}
EXPECTED_FIELDS = {
    "video_pooling_mode": "stgridpool",
    "pyramid_levels": [[2, 1], [4, 2]],
    "nsp_keep_ratio": 1 / 9,
    "nsp_temperature": 0.5,
    "nsp_norm_p": 1.0,
    "nsp_padding": 1,
    "nsp_partial_windows": True,
    "video_newline_position": "frame",
}


def env(tmp: Path) -> dict:
    """Environment for child processes: offline, remote code cached under `tmp`, nothing from the user's HF home
    (the Hub cache is `tmp`/hf_home/hub)."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp / "hf_home"),
        "HF_HUB_CACHE": str(tmp / "hf_home" / "hub"),
        "HF_MODULES_CACHE": str(tmp / "hf_modules"),
        "TOKENIZERS_PARALLELISM": "false",
    }


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "stgridpool.convert", *map(str, args)]


def run_cli_process(tmp: Path, *args) -> subprocess.CompletedProcess:
    """`python -m stgridpool.convert ARGS` in a child process, as a user runs it."""
    return subprocess.run(cli_command(*args), cwd=PROJECT, env=env(tmp), capture_output=True, text=True, timeout=300)


def run_cli(*args) -> subprocess.CompletedProcess:
    """The converter's command line in this process: `main(ARGS)`, what `python -m stgridpool.convert` runs, without
    the seconds a child process spends importing Transformers. Exit code and what it printed, as from a process
    (the `converted` fixture and `test_refusals` run real processes too)."""
    from stgridpool.convert.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exit:  # argparse's usage errors
            code = exit.code
    return subprocess.CompletedProcess(cli_command(*args), code, out.getvalue(), err.getvalue())


def run_cli_many(commands: list[list]) -> list[tuple[int, str]]:
    """`run_cli` for each command: [(exit code, stderr)]."""
    return [(result.returncode, result.stderr) for result in (run_cli(*args) for args in commands)]


def run_remote_checks(tmp: Path, jobs: dict[str, tuple[str, Path, Path]]) -> dict:
    """tests/remote_check.py in one fresh process whose cwd is outside the project, over `jobs` ({name: (check, repo,
    src)}, each given its own work folder); returns {name: its JSON result}."""
    work = Path(tempfile.mkdtemp(prefix="remote-", dir=tmp))
    listed = []
    for name, (check, repo, src) in jobs.items():
        (work / name).mkdir()
        listed.append({"name": name, "check": check, "repo": str(repo), "src": str(src), "work": str(work / name)})
    child_env = env(tmp)
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != PROJECT
    )
    result = subprocess.run(
        [sys.executable, str(REMOTE_CHECK), str(PROJECT), json.dumps(listed)],
        cwd=work, env=child_env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(root: Path) -> dict:
    """{relative path: sha256} of every file under `root`: to show a directory was not touched."""
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def shard(src: Path, dst: Path) -> Path:
    """A copy of the checkpoint `src` with its weights split into two safetensors shards plus an index."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for p in src.iterdir():
        if p.name != "model.safetensors":
            (dst / p.name).write_bytes(p.read_bytes())
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    halves = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    weight_map = {}
    for file_name, keys in halves.items():
        save_file({k: tensors[k].contiguous() for k in keys}, dst / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file_name))
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": weight_map,
    }
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return dst


# The tests of the converted repos (the `converted`, `originals` and `remote_checks` fixtures: conversions and a
# process that loads every repo) are one pytest-xdist group (`--dist loadgroup`): one worker builds the repos, once.
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def stock(workdir) -> Path:
    """A tiny stock LLaVA-OneVision checkpoint with a model card carrying a license."""
    from stgridpool.demo import save_tiny_stock_checkpoint

    path = save_tiny_stock_checkpoint(workdir / "stock")
    (path / "README.md").write_text(SOURCE_CARD)
    return path


@pytest.fixture(scope="module")
def converted(workdir, stock) -> Path:
    """The stock checkpoint converted through the CLI with non-default settings; SRC must stay as it was."""
    before = tree_digest(stock)
    dst = workdir / "repos" / "converted"
    options = [item for pair in OPTIONS.items() for item in pair]
    result = run_cli_process(
        workdir, stock, dst, *options, "--partial-windows", "--base-model", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
    )
    assert result.returncode == 0, result.stderr
    assert tree_digest(stock) == before, "the converter modified SRC"
    return dst


HUB_ID = "tiny-org/stgridpool-converted"  # `converted`, as a user names it on the Hub


def bilinear_paths(workdir: Path) -> tuple[Path, Path]:
    """(a sharded copy of the stock checkpoint, the repo converted from it in bilinear mode) of `remote_checks`."""
    return workdir / "stock-sharded", workdir / "repos" / "bilinear"


@pytest.fixture(scope="module")
def remote_checks(workdir, stock, converted, originals) -> dict:
    """Every repo these tests convert, loaded with remote code only (tests/remote_check.py), all in one fresh process:
    {name: its results}."""
    sharded, bilinear = bilinear_paths(workdir)
    shard(stock, sharded)
    result = run_cli(sharded, bilinear, "--video-pooling-mode", "bilinear", "--copy")
    assert result.returncode == 0, result.stderr
    # the converted repo as a Hub id too, resolved from the Hub cache of the checking process (see `env`)
    add_to_hub_cache(workdir / "hf_home" / "hub", HUB_ID, converted)
    jobs = {
        "full": ("full", converted, stock),
        "bilinear": ("stock", bilinear, stock),
        "hub-pipeline": ("pipeline", HUB_ID, stock),
    }
    for flavour, (src, dst) in originals.items():
        jobs[f"original-{flavour}"] = ("original", dst, src)
    return run_remote_checks(workdir, jobs)


@pytest.mark.xdist_group("converted_repos")
def test_repo_files(converted, stock):
    names = sorted(p.name for p in converted.iterdir())
    assert names == sorted(
        [
            "README.md", "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
            "processor_config.json", "tokenizer.json", "tokenizer_config.json", *CODE_MODULES,
        ]
    )  # fmt: skip
    for name in CODE_MODULES:  # verbatim copies of the project's modules
        assert (converted / name).read_bytes() == (PROJECT / name).read_bytes()
    for name in ("model.safetensors", "generation_config.json", "chat_template.jinja", "tokenizer.json"):
        assert sha256(converted / name) == sha256(stock / name), name


@pytest.mark.xdist_group("converted_repos")
def test_config_carries_source_and_settings(converted, stock):
    source = json.loads((stock / "config.json").read_text())
    config = json.loads((converted / "config.json").read_text())
    for key, value in source.items():
        if key not in ("model_type", "architectures"):
            assert config[key] == value, key
    assert config["model_type"] == "stgridpool_llava_onevision"
    assert config["architectures"] == ["STGridPoolLlavaOnevisionForConditionalGeneration"]
    for key, value in EXPECTED_FIELDS.items():
        assert config[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert config["auto_map"] == {
        "AutoConfig": "configuration_stgridpool.STGridPoolConfig",
        "AutoModel": "modeling_stgridpool_llava.STGridPoolLlavaOnevisionModel",
        "AutoModelForImageTextToText": "modeling_stgridpool_llava.STGridPoolLlavaOnevisionForConditionalGeneration",
        "AutoModelForMultimodalLM": "modeling_stgridpool_llava.STGridPoolLlavaOnevisionForConditionalGeneration",
        "AutoProcessor": "processing_stgridpool.STGridPoolProcessor",
    }
    processor = json.loads((converted / "processor_config.json").read_text())
    assert processor["auto_map"] == {"AutoProcessor": "processing_stgridpool.STGridPoolProcessor"}
    assert processor["processor_class"] == "STGridPoolProcessor"
    for key in ("video_pooling_mode", "nsp_keep_ratio", "nsp_padding", "nsp_partial_windows", "video_newline_position"):
        assert processor[key] == config[key], key
    tokenizer_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert tokenizer_config["processor_class"] == "STGridPoolProcessor"


@pytest.mark.xdist_group("converted_repos")
def test_model_card(converted):
    text = (converted / "README.md").read_text()
    assert text.startswith("---\n")
    metadata = yaml.safe_load(text[4 : text.index("\n---", 4)])
    assert metadata["base_model"] == "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-text-to-text"
    assert metadata["license"] == "apache-2.0"  # carried over from the source card
    assert "stgridpool" in metadata["tags"]
    assert "| `pyramid_levels` | `[[2, 1], [4, 2]]` |" in text
    assert '| `video_newline_position` | `"frame"` |' in text
    assert "trust_remote_code=True" in text
    assert "arXiv" in text and "2605.22078" in text and "Training-free Spatial-Temporal Pooling and Gridding" in text


@pytest.mark.xdist_group("converted_repos")
def test_loads_with_remote_code_only(remote_checks):
    out = remote_checks["full"]
    ours = "modeling_stgridpool_llava"
    for key, name, module in (
        ("config", "STGridPoolConfig", "configuration_stgridpool"),
        ("model", "STGridPoolLlavaOnevisionForConditionalGeneration", ours),
        ("base_model", "STGridPoolLlavaOnevisionModel", ours),
        ("multimodal_lm", "STGridPoolLlavaOnevisionForConditionalGeneration", ours),
        ("processor", "STGridPoolProcessor", "processing_stgridpool"),
        ("image_pipeline_model", "STGridPoolLlavaOnevisionForConditionalGeneration", ours),
        ("video_pipeline_model", "STGridPoolLlavaOnevisionForConditionalGeneration", ours),
        ("resaved_config", "STGridPoolConfig", "configuration_stgridpool"),
        ("resaved_model", "STGridPoolLlavaOnevisionForConditionalGeneration", ours),
        ("resaved_processor", "STGridPoolProcessor", "processing_stgridpool"),
    ):
        assert out[key]["name"] == name, key
        assert out[key]["module"].startswith("transformers_modules."), key
        assert out[key]["module"].endswith("." + module), key
    assert out["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert out["base_loading_info"]["missing_keys"] == []
    assert out["base_loading_info"]["unexpected_keys"] in (
        [],
        ["language_model.lm_head.weight"],
    )  # the base has no head
    assert out["processor_geometry"] == out["config_geometry"]
    assert out["config_geometry"]["video_newline_position"] == "frame"
    # 8 frames of 27x27 tokens, k = 3, padding 1, partial windows: 29 -> 10 a side; one newline per frame
    assert out["video_placeholders"] == out["expected_placeholders"] == 8 * (10 * 10 + 1)
    assert out["video_new_tokens"] > 0 and out["video_answer"].strip()
    assert out["image_pipeline_answer"].strip()
    assert out["video_pipeline_answer"].strip()
    assert out["video_pipeline_frames_seen"] == [8]
    # a video file: 50 frames, sampled to the repo's num_frames by the repo's own reader module
    assert out["file_frames"] == [1, min(50, out["file_num_frames"]), 3, 54, 54]
    assert out["readers"] and all(name.startswith("transformers_modules.") for name in out["readers"]), out["readers"]
    assert set(CODE_MODULES) <= set(out["resaved_files"])
    assert out["resaved_auto_map"]["AutoModelForImageTextToText"].endswith(
        "STGridPoolLlavaOnevisionForConditionalGeneration"
    )
    assert out["resaved_processor_geometry"] == out["processor_geometry"]
    assert out["resaved_same_inputs"] and out["resaved_logits_max_diff"] == 0.0


@pytest.mark.xdist_group("converted_repos")
def test_pipeline_by_hub_id(remote_checks):
    """`pipeline("image-text-to-text", model=ORG/NAME, trust_remote_code=True)` on a converted repo in the Hub cache
    (offline): the repo's own code answers."""
    out = remote_checks["hub-pipeline"]
    assert out["model"]["name"] == "STGridPoolLlavaOnevisionForConditionalGeneration"
    assert out["model"]["module"].startswith("transformers_modules.")
    assert out["model"]["module"].endswith(".modeling_stgridpool_llava")
    assert out["processor"]["module"].endswith(".processing_stgridpool")
    assert out["name_or_path"] == HUB_ID and out["answer"].strip()


@pytest.mark.xdist_group("converted_repos")
def test_bilinear_mode_equals_stock_from_sharded_source(remote_checks, workdir):
    """A sharded source: the index and shards carried byte for byte; bilinear mode gives stock's logits."""
    sharded, dst = bilinear_paths(workdir)
    for name in (
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ):
        assert sha256(dst / name) == sha256(sharded / name), name
        assert os.stat(dst / name).st_ino != os.stat(sharded / name).st_ino  # --copy: not a hard link
    assert not (dst / "model.safetensors").exists()
    out = remote_checks["bilinear"]
    assert out["model"]["name"] == "STGridPoolLlavaOnevisionForConditionalGeneration"
    assert out["same_input_ids"] and out["same_pixels"]
    assert out["logits_max_diff"] <= 1e-5, out


def _refusal_cases(tmp: Path, stock: Path) -> list:
    """(name, SRC, extra args, words the message must contain)."""
    not_llava = tmp / "not-llava"
    not_llava.mkdir()
    (not_llava / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (not_llava / "model.safetensors").write_bytes((stock / "model.safetensors").read_bytes())
    pickles = tmp / "pickles"
    pickles.mkdir()
    (pickles / "config.json").write_text((stock / "config.json").read_text())
    (pickles / "pytorch_model.bin").write_bytes(b"not a pickle at all: it must never be opened")
    incomplete = shard(stock, tmp / "incomplete")
    (incomplete / "model-00002-of-00002.safetensors").unlink()
    no_tokenizer = tmp / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors", "processor_config.json"):
        (no_tokenizer / name).write_bytes((stock / name).read_bytes())

    def variant(name: str, **changes) -> Path:
        """A copy of the stock checkpoint with files replaced: {file name: text}."""
        path = tmp / name
        path.mkdir()
        for p in stock.iterdir():
            os.link(p, path / p.name)
        for file_name, text in changes.items():
            (path / file_name.replace("__", ".")).unlink(missing_ok=True)
            (path / file_name.replace("__", ".")).write_text(text)
        return path

    config = json.loads((stock / "config.json").read_text())
    bad_processor = variant("bad-processor", processor_config__json="{not json")
    bad_tokenizer = variant("bad-tokenizer", tokenizer_config__json='{"a": ')
    vision_five = variant("vision-five", config__json=json.dumps({**config, "vision_config": 5}))
    big = variant(
        "big", config__json=json.dumps({**config, "text_config": {**config["text_config"], "hidden_size": "big"}})
    )
    custom_tokenizer = variant(
        "custom-tokenizer",
        tokenizer_config__json=json.dumps(
            {"tokenizer_class": "XTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}}
        ),
    )
    return [
        ("missing", tmp / "does-not-exist", [], ["SRC=", "does-not-exist", "no such directory", "allowed"]),
        ("bad processor json", bad_processor, [], ["processor_config.json", "JSON", "allowed"]),
        ("bad tokenizer json", bad_tokenizer, [], ["tokenizer_config.json", "JSON", "allowed"]),
        ("vision config 5", vision_five, [], ["SRC config.json is invalid", "allowed"]),
        ("hidden size big", big, [], ["SRC config.json is invalid", "allowed"]),
        ("custom tokenizer code", custom_tokenizer, [], ["tokenizer_class='XTokenizer'", "not a Transformers class"]),
        ("huge temperature", stock, ["--temperature", "1e400"], ["--temperature='1e400'", "too large"]),
        ("huge keep ratio", stock, ["--keep-ratio", "1e400"], ["--keep-ratio='1e400'", "too large"]),
        ("not llava", not_llava, [], ["SRC=", "model_type='qwen2'", "llava_onevision"]),
        ("pickle only", pickles, [], ["SRC=", "pytorch_model.bin", "safetensors"]),
        ("incomplete index", incomplete, [], ["model-00002-of-00002.safetensors", "missing", "allowed"]),
        ("no tokenizer", no_tokenizer, [], ["SRC=", "tokenizer", "allowed"]),
        ("keep ratio", stock, ["--keep-ratio", "0.3"], ["nsp_keep_ratio=0.3", "allowed", "1/k^2"]),
        (
            "pooling mode",
            stock,
            ["--video-pooling-mode", "max"],
            ["video_pooling_mode='max'", "stgridpool", "bilinear", "average"],
        ),
        ("newline", stock, ["--newline-position", "top"], ["video_newline_position='top'", "one_token", "grid"]),
        ("pyramid", stock, ["--pyramid-levels", "4-2"], ["--pyramid-levels='4-2'", "GROUP:STRIDE", "none"]),
        ("pyramid zero", stock, ["--pyramid-levels", "0:2"], ["pyramid_levels=", "group size 0", "positive"]),
        ("temperature", stock, ["--temperature", "0"], ["nsp_temperature=0", "> 0"]),
        ("padding", stock, ["--padding", "-1"], ["nsp_padding=-1", ">= 0"]),
        ("private without push", stock, ["--private"], ["--private", "--push-to-hub"]),
        ("bad repo id", stock, ["--push-to-hub", "a/b/c"], ["--push-to-hub='a/b/c'", "allowed"]),
    ]


def test_refusals(stock, tmp_path):
    before = tree_digest(stock)
    cases = _refusal_cases(tmp_path, stock)
    commands = [[src, tmp_path / "out" / name.replace(" ", "-") / "repo", *args] for name, src, args, _ in cases]
    for (name, _, _, words), (code, stderr) in zip(cases, run_cli_many(commands)):
        assert code == 2, (name, stderr)
        message = stderr.strip()
        assert len(message.splitlines()) == 1, (name, message)
        for word in words:
            assert word in message, (name, word, message)
    # and as a real process: stderr holds the one line and nothing else (no warning, no traceback)
    name, src, args, words = cases[1]
    result = run_cli_process(tmp_path, src, tmp_path / "out" / "repo", *args)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, (name, result.stderr)
    assert all(word in result.stderr for word in words), (name, result.stderr)
    assert not (tmp_path / "out").exists(), "DST (or its parent) was created"
    assert tree_digest(stock) == before


def test_non_empty_destination_and_overwrite(stock, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    result = run_cli(stock, dst)
    assert result.returncode == 2 and "--overwrite" in result.stderr and "non-empty" in result.stderr
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    inside = stock / "sub"  # DST equal to or containing SRC would destroy it with --overwrite
    result = run_cli(stock, stock, "--overwrite")
    assert result.returncode == 2 and "SRC" in result.stderr and not inside.exists()
    result = run_cli(stock, dst, "--overwrite", "--video-pooling-mode", "average")
    assert result.returncode == 0, result.stderr
    assert not (dst / "keep.txt").exists()
    assert json.loads((dst / "config.json").read_text())["video_pooling_mode"] == "average"
    assert os.stat(dst / "model.safetensors").st_ino == os.stat(stock / "model.safetensors").st_ino  # hard link
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(stock, empty).returncode == 0
    assert (empty / "config.json").is_file()


def test_failure_leaves_nothing(stock, tmp_path, monkeypatch):
    from stgridpool.convert import cli, repo

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(repo, "transfer_weights", broken)  # called while filling the temporary directory
    with pytest.raises(OSError, match="disk full"):
        cli.main([str(stock), str(tmp_path / "dst")])
    assert list(tmp_path.iterdir()) == []


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records what would be created and uploaded."""

    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, *, branch, **kwargs):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, *, repo_id, folder_path, revision=None, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        self.calls.append(("upload_folder", repo_id, folder_path, revision, files))
        return f"https://huggingface.co/{repo_id}/commit/0"


def test_push_to_hub(stock, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from stgridpool.convert import cli

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    dst = tmp_path / "dst"
    code = cli.main([str(stock), str(dst), "--push-to-hub", "me/tiny-stgridpool", "--private", "--revision", "dev"])
    assert code == 0, capsys.readouterr().err
    (create, repo_id, kwargs), branch, upload = FakeHfApi.calls
    assert (create, repo_id, kwargs["private"], kwargs.get("repo_type", "model")) == (
        "create_repo",
        "me/tiny-stgridpool",
        True,
        "model",
    )
    assert branch == ("create_branch", "me/tiny-stgridpool", "dev")
    name, repo_id, folder, revision, files = upload
    assert (name, repo_id, Path(folder), revision) == ("upload_folder", "me/tiny-stgridpool", dst, "dev")
    assert files == sorted(p.name for p in dst.iterdir())
    assert {"config.json", "model.safetensors", "README.md", "processor_config.json", *CODE_MODULES} <= set(files)
    assert 'repo = "me/tiny-stgridpool"' in (dst / "README.md").read_text()


def test_parse_settings():
    """The one parser of setting values (the converter's options, the lmms-eval model's args)."""
    from stgridpool.options import parse_pyramid_levels, parse_setting

    assert parse_pyramid_levels("4:2,4:4,4:8") == [[4, 2], [4, 4], [4, 8]]
    assert parse_pyramid_levels("[[4,2],[4,4]]") == [[4, 2], [4, 4]]
    assert parse_pyramid_levels("none") == parse_pyramid_levels("") == []
    assert parse_pyramid_levels(" 2:1 ") == [[2, 1]]
    assert parse_setting("nsp_keep_ratio", "1/9") == pytest.approx(1 / 9)
    assert parse_setting("nsp_padding", "2") == 2 and parse_setting("nsp_padding", 1.0) == 1
    assert parse_setting("nsp_partial_windows", "true") is True
    for field, text, words in (
        ("nsp_temperature", "1e400", "too large"),
        ("nsp_norm_p", "two", "not a number"),
        ("pyramid_levels", "4-2", "GROUP:STRIDE"),
        ("pyramid_levels", "[[4,2]", "JSON"),
        ("nsp_padding", "1.5", "integers"),
    ):
        with pytest.raises(ValueError, match=words) as info:
            parse_setting(field, text, label="--x")
        assert str(info.value).startswith(f"--x={text!r} is invalid")


def test_destination_inside_source_is_refused(stock, tmp_path):
    """DST inside SRC (or SRC itself, or containing it, through a symbolic link too) is refused; SRC untouched."""
    before = tree_digest(stock)
    names_before = sorted(p.name for p in stock.iterdir())
    link = tmp_path / "link-to-src"
    link.symlink_to(stock)
    cases = [
        [stock, stock / "converted"],
        [stock, stock / "a" / "b"],
        [stock, link / "converted"],
        [stock, stock, "--overwrite"],
        [stock, stock.parent, "--overwrite"],
    ]
    for code, stderr in run_cli_many(cases):
        assert code == 2, stderr
        assert len(stderr.strip().splitlines()) == 1 and "inside SRC" in stderr, stderr
    assert tree_digest(stock) == before and sorted(p.name for p in stock.iterdir()) == names_before


def test_symlinked_destination(stock, tmp_path):
    """A link to a directory is written through (the link stays); a dangling link is refused."""
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    (code, stderr), (dangling_code, dangling_err) = run_cli_many([[stock, link], [stock, dangling]])
    assert code == 0, stderr
    assert link.is_symlink() and (target / "config.json").is_file()
    assert dangling_code == 2 and "does not exist" in dangling_err and len(dangling_err.strip().splitlines()) == 1
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()
    result = run_cli(stock, link, "--overwrite", "--video-pooling-mode", "average")
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and json.loads((target / "config.json").read_text())["video_pooling_mode"] == "average"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "link", "target"]  # no .old / .partial left


def test_only_model_repo_files_and_own_code_are_carried(stock, tmp_path):
    """Allow-list: code, binaries and other files of SRC stay behind; auto_map entries naming other code (a local
    module, another repo) are dropped, so DST loads with this project's code alone."""
    src = tmp_path / "src"
    src.mkdir()
    for p in stock.iterdir():
        os.link(p, src / p.name)
    for name in ("helper.PY", "gui.pyw", "native.so", "tokenization_x.py", "notes.ipynb", "run.sh"):
        (src / name).write_text("raise SystemExit('must not be carried')")
    tokenizer_config = json.loads((stock / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {
        "AutoTokenizer": ["tokenization_x.XTokenizer", None],
        "AutoProcessor": "other-org/other-repo--p.P",
    }
    (src / "tokenizer_config.json").unlink()
    (src / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    processor_config = json.loads((stock / "processor_config.json").read_text())
    processor_config["auto_map"] = {"AutoProcessor": "other-org/other-repo--processing_x.XProcessor"}
    (src / "processor_config.json").unlink()
    (src / "processor_config.json").write_text(json.dumps(processor_config))
    dst = tmp_path / "dst"
    result = run_cli(src, dst)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in dst.iterdir()) == sorted([p.name for p in stock.iterdir()] + list(CODE_MODULES))
    for name in ("tokenizer_config.json", "processor_config.json", "config.json"):
        auto_map = json.loads((dst / name).read_text()).get("auto_map", {})
        modules = {
            str(ref).rsplit(".", 1)[0]
            for value in auto_map.values()
            for ref in (value if isinstance(value, list) else [value])
            if ref
        }
        assert modules <= {name[: -len(".py")] for name in CODE_MODULES}, (name, auto_map)
    from stgridpool.loading import load_processor, resolve_model

    source = resolve_model(str(dst))
    assert not source.remote_code  # only this project's code, byte for byte: the installed classes load it
    assert type(load_processor(source)).__name__ == "STGridPoolProcessor"


def test_interrupted_conversion_leaves_nothing(stock, tmp_path, monkeypatch, capsys):
    """Ctrl-C or SIGTERM mid-copy: one line, exit 130, no temporary folder; a folder left by a killed run (kill -9)
    is removed by the next run."""
    import signal
    import time

    from stgridpool.convert import cli, repo

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".dst.{int(dead.stdout)}.abc.partial"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    for interrupt in ("ctrl-c", "sigterm"):

        def broken(*args, **kwargs):
            if interrupt == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

        monkeypatch.setattr(repo, "transfer_weights", broken)
        assert cli.main([str(stock), str(tmp_path / "dst"), "--copy"]) == 130
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "interrupted" in err[0], err
        assert list(tmp_path.iterdir()) == [], interrupt  # the stale folder went too


def test_hub_id_source(stock, tmp_path, monkeypatch, capsys):
    """A Hub model id is fetched with snapshot_download (pickles skipped) and becomes the card's base_model."""
    import huggingface_hub
    from stgridpool.convert import cli

    fetched = []

    def fake_snapshot_download(repo_id, revision=None, ignore_patterns=None, **kwargs):
        fetched.append((repo_id, revision, ignore_patterns))
        return str(stock)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["llava-hf/tiny-ov", str(tmp_path / "dst"), "--src-revision", "v1"]) == 0, capsys.readouterr().err
    ((repo_id, revision, ignore),) = fetched
    assert (repo_id, revision) == ("llava-hf/tiny-ov", "v1") and "*.bin" in ignore
    text = (tmp_path / "dst" / "README.md").read_text()
    assert yaml.safe_load(text[4 : text.index("\n---", 4)])["base_model"] == "llava-hf/tiny-ov"


# ---------------------------------------------------------------------------------------------------------------
# Original LLaVA-NeXT checkpoints (LlavaQwenForCausalLM): LLaVA-Video and lmms-lab LLaVA-OneVision
# ---------------------------------------------------------------------------------------------------------------

TINY_VISION = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "image_size": 54, "patch_size": 2}


def test_hub_id_source_from_the_hub_cache(stock, tmp_path, monkeypatch, capsys):
    """SRC given as a Hub model id at a tag resolves from the Hub cache offline, as after a download: the repo is
    written from that snapshot, and loads with the installed classes."""
    from stgridpool.convert import cli

    from stgridpool.loading import resolve_model

    cache = tmp_path / "cache"
    add_to_hub_cache(cache, "llava-hf/tiny-ov", stock, refs=("main", "v1"))
    use_hub_cache(monkeypatch, cache)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["llava-hf/tiny-ov", "dst", "--src-revision", "v1"]) == 0, capsys.readouterr().err
    text = (tmp_path / "dst" / "README.md").read_text()
    assert yaml.safe_load(text[4 : text.index("\n---", 4)])["base_model"] == "llava-hf/tiny-ov"
    assert sha256(tmp_path / "dst" / "model.safetensors") == sha256(stock / "model.safetensors")
    assert not resolve_model(str(tmp_path / "dst")).remote_code


def original_name(name: str, vision_model_prefix: bool) -> str | None:
    """In-memory Transformers parameter name -> the original LLaVA-NeXT weight name (what a test checkpoint holds)."""
    for ours, theirs in (
        ("model.language_model.", "model."),
        ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
        ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
        ("model.image_newline", "model.image_newline"),
        ("lm_head.", "lm_head."),
    ):
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    assert name.startswith("model.vision_tower."), name
    rest = name[len("model.vision_tower.") :].removeprefix("vision_model.")  # in memory with or without it, by version
    return "model.vision_tower.vision_tower." + ("vision_model." if vision_model_prefix else "") + rest


def expected_saved_name(original: str) -> str:
    """Where the converter must put an original weight: the layout Transformers saves llava-onevision checkpoints in."""
    for theirs, ours in (
        ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
        ("model.vision_tower.vision_tower.", "vision_tower."),
        ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
        ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
        ("model.image_newline", "image_newline"),
        ("lm_head.", "language_model.lm_head."),
        ("model.", "language_model.model."),
    ):
        if original.startswith(theirs):
            return ours + original[len(theirs) :]
    raise AssertionError(original)


def save_original_checkpoint(path: Path, *, video: bool, vision_model_prefix: bool, tied: bool, shards: int) -> Path:
    """A tiny synthetic checkpoint in the original LLaVA-NeXT layout: flat Qwen2 config with mm_* fields, original
    weight names, Qwen-style tokenizer files. `video`: LLaVA-Video flavour (average pooling, grid newlines)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from stgridpool.demo import build_tiny_tokenizer, tiny_config_kwargs

    path.mkdir()
    tokenizer = build_tiny_tokenizer()
    kwargs = tiny_config_kwargs(tokenizer, tie_word_embeddings=tied)
    names = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(**kwargs)).state_dict()
    generator = torch.Generator().manual_seed(1 + video)
    tensors = {}
    for name, tensor in names.items():
        if tied and name == "lm_head.weight":
            continue
        tensors[original_name(name, vision_model_prefix)] = torch.randn(tensor.shape, generator=generator) * 0.2
    keys = sorted(tensors)
    if shards == 1:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            file_name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = keys[i::shards]
            save_file({k: tensors[k] for k in part}, path / file_name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file_name))
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    text = kwargs["text_config"]
    config = {
        "model_type": "llava",
        "architectures": ["LlavaQwenForCausalLM"],
        **{
            k: text[k]
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
                "max_position_embeddings",
                "eos_token_id",
            )
        },
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "mm_vision_tower": "tiny/siglip-test",
        "mm_hidden_size": 16,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_patch_merge_type": "spatial_unpad",
        "image_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": "(1x1),...,(2x2)" if video else [[54, 54], [54, 108]],
        "mm_spatial_pool_mode": "average" if video else "bilinear",
        "mm_spatial_pool_stride": 2,
        "mm_newline_position": "grid" if video else "one_token",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(path)
    (path / "vision_config.json").write_text(json.dumps(TINY_VISION))  # what --vision-config reads in these tests
    return path


ORIGINAL_FLAVOURS = {
    # name: (checkpoint options, converter options)
    "llava-video": (
        dict(video=True, vision_model_prefix=True, tied=False, shards=2),
        ["--video-pooling-mode", "average"],
    ),
    "onevision": (dict(video=False, vision_model_prefix=False, tied=True, shards=1), []),
}


@pytest.fixture(scope="module")
def originals(workdir) -> dict:
    """Each flavour: (SRC, DST) after a CLI conversion; SRC must stay as it was."""
    out = {}
    for name, (checkpoint, options) in ORIGINAL_FLAVOURS.items():
        src = save_original_checkpoint(workdir / f"original-{name}", **checkpoint)
        out[name] = (src, workdir / "repos" / f"from-{name}", options)
    before = {name: tree_digest(src) for name, (src, _, _) in out.items()}
    commands = [
        [src, dst, "--vision-config", src / "vision_config.json", *options] for src, dst, options in out.values()
    ]
    for code, stderr in run_cli_many(commands):
        assert code == 0, stderr
    assert {name: tree_digest(src) for name, (src, _, _) in out.items()} == before, "the converter modified SRC"
    return {name: (src, dst) for name, (src, dst, _) in out.items()}


def read_safetensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.mark.xdist_group("converted_repos")
@pytest.mark.parametrize("flavour", list(ORIGINAL_FLAVOURS))
def test_original_tensors_and_config(originals, flavour):
    import torch

    src, dst = originals[flavour]
    video = ORIGINAL_FLAVOURS[flavour][0]["video"]
    source, converted = read_safetensors(src), read_safetensors(dst)
    assert sorted(converted) == sorted(expected_saved_name(k) for k in source)
    for key, tensor in source.items():
        new = converted[expected_saved_name(key)]
        assert new.dtype == tensor.dtype and torch.equal(new, tensor), key
    # and the model built from the repo holds each original tensor in the parameter it came from
    from modeling_stgridpool_llava import STGridPoolLlavaOnevisionForConditionalGeneration

    model = STGridPoolLlavaOnevisionForConditionalGeneration.from_pretrained(dst)
    vision_model_prefix = ORIGINAL_FLAVOURS[flavour][0]["vision_model_prefix"]
    state = model.state_dict()
    for name, tensor in state.items():
        key = original_name(name, vision_model_prefix)
        if key == "lm_head.weight" and key not in source:  # tied head: the input embedding
            key = "model.embed_tokens.weight"
        assert torch.equal(tensor, source[key]), (name, key)
    assert len(state) == len(source) + (ORIGINAL_FLAVOURS[flavour][0]["tied"])
    shards = sorted(p.name for p in dst.glob("*.safetensors"))
    if ORIGINAL_FLAVOURS[flavour][0]["shards"] > 1:
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        assert sorted(set(index["weight_map"].values())) == shards and sorted(index["weight_map"]) == sorted(converted)
    else:
        assert shards == ["model.safetensors"]
    config = json.loads((dst / "config.json").read_text())
    original = json.loads((src / "config.json").read_text())
    assert config["model_type"] == "stgridpool_llava_onevision"
    assert config["vision_config"]["num_hidden_layers"] == 2 and config["vision_config"]["vision_use_head"] is False
    assert (config["vision_feature_layer"], config["vision_feature_select_strategy"]) == (-1, "full")
    assert (
        config["text_config"]["hidden_size"] == 32 and config["tie_word_embeddings"] is original["tie_word_embeddings"]
    )
    for key in (
        "mm_spatial_pool_mode",
        "mm_newline_position",
        "mm_vision_tower",
    ):  # the source's stock pooling, recorded
        assert config[key] == original[key]
    assert config["video_newline_position"] == ("grid" if video else "one_token")
    assert config["video_pooling_mode"] == ("average" if video else "stgridpool")
    assert (
        config["image_grid_pinpoints"] == [[54, 54], [54, 108], [108, 54], [108, 108]]
        if video
        else [[54, 54], [54, 108]]
    )
    processor = json.loads((dst / "processor_config.json").read_text())
    assert processor["video_processor"]["num_frames"] == (64 if video else 32)
    assert processor["video_newline_position"] == config["video_newline_position"]
    assert processor["auto_map"]["AutoProcessor"] == "processing_stgridpool.STGridPoolProcessor"
    assert set(CODE_MODULES) <= {p.name for p in dst.iterdir()}


@pytest.mark.xdist_group("converted_repos")
@pytest.mark.parametrize("flavour", list(ORIGINAL_FLAVOURS))
def test_original_loads_and_matches_original_forward(remote_checks, flavour):
    from configuration_stgridpool import video_token_count

    video = ORIGINAL_FLAVOURS[flavour][0]["video"]
    out = remote_checks[f"original-{flavour}"]
    assert out["model"]["name"] == "STGridPoolLlavaOnevisionForConditionalGeneration"
    assert out["model"]["module"].startswith("transformers_modules.")
    assert out["processor"]["name"] == "STGridPoolProcessor"
    assert out["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    side = 13  # 27x27 tokens: average pooling and the paper's NSP (k = 2, no partial windows) both give 13x13
    assert out["video_placeholders"] == video_token_count(5, side, side, "grid" if video else "one_token")
    assert out["processor_num_frames"] == (64 if video else 32)
    assert out["video_new_tokens"] > 0
    if video:
        assert out["features_shape"] == out["reference_shape"] == [5 * 13 * 14, 32]
        assert out["features_max_diff"] <= 1e-5, out


def test_original_refusals(tmp_path):
    base, _ = ORIGINAL_FLAVOURS["onevision"]
    src = save_original_checkpoint(tmp_path / "src", **base)
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors", "vision_config.json"):
        (no_tokenizer / name).write_bytes((src / name).read_bytes())
    unknown_key = tmp_path / "unknown-key"
    unknown_key.mkdir()
    for p in src.iterdir():
        (unknown_key / p.name).write_bytes(p.read_bytes())
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    tensors["model.vision_resampler.weight"] = tensors["model.image_newline"].clone()
    save_file(tensors, unknown_key / "model.safetensors", metadata={"format": "pt"})
    garbage = tmp_path / "garbage-header"
    garbage.mkdir()
    for p in src.iterdir():
        (garbage / p.name).write_bytes(p.read_bytes() if p.name != "model.safetensors" else b"garbage" * 20)
    vision = ["--vision-config", src / "vision_config.json"]
    wrong_vision = tmp_path / "wrong_vision.json"
    wrong_vision.write_text(json.dumps({**TINY_VISION, "hidden_size": 24}))
    cases = [
        (no_tokenizer, vision, ["SRC=", "tokenizer", "--tokenizer"]),
        (src, [], ["mm_vision_tower='tiny/siglip-test'", "--vision-config", "google/siglip-so400m-patch14-384"]),
        (unknown_key, vision, ["model.vision_resampler.weight", "allowed"]),
        (src, ["--vision-config", src / "config.json"], ["--vision-config=", "image_size", "patch_size", "allowed"]),
        (src, ["--vision-config", wrong_vision], ["vision config", "shape", "patch_embedding"]),
        (garbage, vision, ["model.safetensors", "not a readable safetensors file", "allowed"]),
    ]
    results = run_cli_many([[s, tmp_path / "out" / str(i), *args] for i, (s, args, _) in enumerate(cases)])
    for (s, args, words), (code, stderr) in zip(cases, results):
        assert code == 2, stderr
        assert len(stderr.strip().splitlines()) == 1, stderr
        for word in words:
            assert word in stderr, (word, stderr)
    assert not (tmp_path / "out").exists()
    # --tokenizer supplies what SRC lacks
    result = run_cli(no_tokenizer, tmp_path / "with-tokenizer", *vision, "--tokenizer", src)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "with-tokenizer" / "tokenizer.json").is_file()


def test_push_failure_keeps_the_written_repo(stock, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from stgridpool.convert import cli

    class Offline(FakeHfApi):
        def upload_folder(self, **kwargs):
            raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    assert cli.main([str(stock), str(tmp_path / "dst"), "--push-to-hub", "me/x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "me/x" in err and "ConnectionError: no network" in err
    assert (tmp_path / "dst" / "config.json").is_file()
