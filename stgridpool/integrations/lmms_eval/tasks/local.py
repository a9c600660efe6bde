"""The paper's lmms-eval tasks on local copies, with no network: `<task>_local` is lmms-eval 0.7.3's own `<task>`
(prompts, answer parsing, metrics, aggregation: its yaml and utils, loaded from the installed lmms-eval when the task
is built) reading its documents and videos from `$STGRIDPOOL_EVAL_DATA/<benchmark>/`:

    <benchmark>/[<config>/]   the documents of the task's Hub dataset config (egoschema: GENERATION and Subset, nextqa:
                              MC, tempcompass: multi-choice, mvbench: one per subtask; videomme, longvideobench: none),
                              either a `save_to_disk` folder of the DatasetDict or `<split>.parquet|.jsonl|.json`
    <benchmark>/cache/        the videos, laid out as lmms-eval unpacks them into `$HF_HOME/<the task's cache_dir>`
                              (e.g. a copy of, or a link to, ~/.cache/huggingface/videomme)

`egoschema_local` (the full set, whose answers are not public) writes lmms-eval's submission file and returns no
score: the scoring server is online. `egoschema_subset_local` scores its 500 questions locally.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import huggingface_hub.constants
import lmms_eval.tasks
from lmms_eval.api.task import ConfigurableTask
from lmms_eval.tasks._task_utils.file_utils import generate_submission_file
from lmms_eval.utils import load_yaml_config

DATA_ENV = "STGRIDPOOL_EVAL_DATA"
DOC_FILES = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}  # <split><suffix> -> datasets builder
LMMS_EVAL_TASKS = Path(lmms_eval.tasks.__file__).parent


def data_dir(benchmark: str) -> Path:
    """$STGRIDPOOL_EVAL_DATA/<benchmark>: where a benchmark's local copy lives."""
    root = os.environ.get(DATA_ENV)
    if not root:
        raise ValueError(
            f"{DATA_ENV} is not set: the *_local tasks read their local copies from $STGRIDPOOL_EVAL_DATA/<benchmark>/ "
            "(see README, offline evaluation)"
        )
    return Path(root).expanduser() / benchmark


def local_dataset(docs_dir: Path, split: str) -> tuple[str, dict]:
    """(dataset_path, dataset_kwargs) that make lmms-eval's own loader read the documents of `split` in `docs_dir`:
    a `save_to_disk` DatasetDict, or a `<split>.parquet|.jsonl|.json` file."""
    if (docs_dir / "dataset_dict.json").is_file():
        return str(docs_dir), {"load_from_disk": True}
    if (docs_dir / "state.json").is_file():
        raise ValueError(
            f"{docs_dir} holds a single Dataset: save the DatasetDict instead (load_dataset(repo, config) without "
            f"split=, or DatasetDict({{'{split}': dataset}}).save_to_disk(...)), or write {split}.parquet there"
        )
    for suffix, builder in DOC_FILES.items():
        path = docs_dir / f"{split}{suffix}"
        if path.is_file():
            return builder, {"data_files": {split: str(path)}}
    raise FileNotFoundError(
        f"{docs_dir}: no documents: allowed are a save_to_disk DatasetDict (dataset_dict.json) or "
        f"{', '.join(split + s for s in DOC_FILES)}"
    )


class LocalTask(ConfigurableTask):
    """lmms-eval's task `stock_config` (a yaml path under lmms_eval/tasks) with its documents read from
    `$STGRIDPOOL_EVAL_DATA/<benchmark>/[<dataset_name>/]`; any other key of this task's yaml replaces the stock one
    (doc_to_visual, which reads the videos from `<benchmark>/cache/`; egoschema_local's metric_list)."""

    def __init__(self, config: dict) -> None:
        config = dict(config)
        config.pop("class", None)  # lmms-eval's python-task marker, not a TaskConfig field
        stock_config = config.pop("stock_config")
        benchmark = config.pop("benchmark")
        # lmms-eval 0.7.3's nextqa and tempcompass utils read os.environ["HF_HOME"] on import and fail when it is
        # unset; unset means huggingface_hub's default, so say that one.
        os.environ.setdefault("HF_HOME", huggingface_hub.constants.HF_HOME)
        merged = {**load_yaml_config(str(LMMS_EVAL_TASKS / stock_config), mode="full"), **config}
        docs_dir = data_dir(benchmark) / (merged.get("dataset_name") or "")
        merged["dataset_path"], merged["dataset_kwargs"] = local_dataset(docs_dir, merged["test_split"])
        merged["dataset_name"] = None  # the folder above is the config's; a local file has no configs
        super().__init__(config=merged)


def _video(benchmark: str, relative: str, other_suffixes: tuple[str, ...] = ()) -> list[str]:
    """[path] of the video `relative` to `<benchmark>/cache/` (or with one of `other_suffixes`, as lmms-eval tries)."""
    path = data_dir(benchmark) / "cache" / relative
    candidates = [path] + [path.with_suffix(suffix) for suffix in other_suffixes]
    for candidate in candidates:
        if candidate.is_file():
            return [str(candidate)]
    raise FileNotFoundError(f"{benchmark}: no video {' or '.join(map(str, candidates))}")


def videomme_doc_to_visual(doc: dict) -> list[str]:
    return _video("videomme", f"data/{doc['videoID']}.mp4", (".MP4", ".mkv"))


def longvideobench_doc_to_visual(doc: dict) -> list[str]:
    return _video("longvideobench", f"videos/{doc['video_path']}")


def egoschema_doc_to_visual(doc: dict) -> list[str]:
    return _video("egoschema", f"videos/{doc['video_idx']}.mp4", (".MP4",))


def nextqa_doc_to_visual(doc: dict) -> list[str]:
    return _video("nextqa", f"NExTVideo/{doc['video']}.mp4", (".MP4",))


def tempcompass_doc_to_visual(doc: dict) -> list[str]:
    return _video("tempcompass", f"videos/{doc['video_id']}.mp4")


def mvbench_doc_to_visual(doc: dict, lmms_eval_specific_kwargs: dict) -> list[str]:
    """Under the subtask's source folder (lmms-eval's own DATA_LIST)."""
    from lmms_eval.tasks.mvbench.utils import DATA_LIST

    return _video("mvbench", f"{DATA_LIST[lmms_eval_specific_kwargs['sub_task']]}/{doc['video']}")


def egoschema_write_submission(results: list[dict], args=None) -> None:
    """Aggregation of `egoschema_local`: write the answers ({video_idx: option index}) to lmms-eval's submission file
    (OUTPUT_PATH/submissions/) for the EgoSchema server, which an offline run cannot reach; no score (None)."""
    answers = {}
    for answer in results:
        answers.update(answer)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    path = generate_submission_file(f"inference_results_egoschema_MC_local_{stamp}.json", args)
    with open(path, "w") as f:
        json.dump(answers, f, indent=4)
    print(f"egoschema_local: {len(answers)} answers written to {path}: upload them to the EgoSchema server to score")
