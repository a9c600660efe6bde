"""stgridpool-compare reads lmms-eval result files and prints the stock vs ST-GridPool table (no lmms-eval
needed)."""

import json
import sys

import pytest

from stgridpool.integrations.lmms_eval.compare import Score, format_table, lmms_eval_command, main, task_score


def write_results(run_dir, results, group_subtasks=None):
    run_dir.mkdir(parents=True)
    payload = {"results": results, "group_subtasks": group_subtasks or {}}
    (run_dir / "20260101_000000_results.json").write_text(json.dumps(payload))


MVBENCH = {"mvbench": ["mvbench_action_count", "mvbench_object_shuffle"]}


def test_each_metric_is_scaled_by_its_task_not_by_its_value():
    """Fractions (lvb_acc, egoschema_subset, nextqa) become percentages; percentages (videomme, tempcompass,
    mvbench) stay as they are, including a real score of 1.0 or less; groups average their subtasks."""
    results = {
        "results": {
            "videomme": {"alias": "videomme", "videomme_perception_score,none": 0.8,
                         "videomme_perception_score_stderr,none": "N/A"},
            "longvideobench_val_v": {"lvb_acc,none": 0.565, "lvb_acc_stderr,none": 0.01},
            "egoschema_subset": {"score,none": 0.6},
            "nextqa_mc_test": {"alias": "nextqa_mc_test", "exact_match,none": 0.794, "exact_match_stderr,none": 0.01},
            "tempcompass_multi_choice": {"speed_accuracy,none": 50.0, "avg_accuracy,none": 1.0},
            "mvbench": {"alias": "mvbench"},
            "mvbench_action_count": {"mvbench_accuracy,none": 0.5},
            "mvbench_object_shuffle": {"mvbench_accuracy,none": 60.0},
            "egoschema": {"submission,none": None},
            "nextqa_mc_test_local": {"exact_match,none": 1.0},
            "videomme_local": {"videomme_perception_score,none": 1.0},
        },
        "group_subtasks": MVBENCH,
    }
    expected = {"videomme": 0.8, "longvideobench_val_v": 56.5, "egoschema_subset": 60.0, "nextqa_mc_test": 79.4,
                "tempcompass_multi_choice": 1.0, "mvbench": 30.25, "nextqa_mc_test_local": 100.0, "videomme_local": 1.0}
    for task, value in expected.items():
        assert task_score(results, task) == Score(pytest.approx(value), True), task
    assert task_score(results, "egoschema") is None  # a submission the server did not score: no number
    assert task_score(results, "not_run") is None


def test_a_metric_of_unknown_scale_is_shown_as_reported_with_a_note():
    stock = {"results": {"videomme": {"videomme_perception_score,none": 0.9}, "mystery": {"acc,none": 0.5}}}
    stgp = {"results": {"videomme": {"videomme_perception_score,none": 1.0}, "mystery": {"acc,none": 0.75}}}
    assert task_score(stock, "mystery") == Score(0.5, False)
    table = format_table(["videomme", "mystery"], stock, stgp, "stock")
    assert "| videomme | 0.9 | 1.0 | +0.1 |" in table
    assert "| mystery | 0.5* | 0.8* | +0.2* |" in table
    assert "| mean |" not in table  # only one row of known scale
    assert "mystery: metric scale unknown" in table and "shown as lmms-eval reported it" in table


def test_no_run_prints_the_table_with_deltas(tmp_path, capsys):
    write_results(tmp_path / "stock", {"videomme": {"videomme_perception_score,none": 58.2},
                                       "mvbench_action_count": {"mvbench_accuracy,none": 50.0},
                                       "mvbench_object_shuffle": {"mvbench_accuracy,none": 60.0},
                                       "nextqa_mc_test": {"exact_match,none": 0.794}}, MVBENCH)
    write_results(tmp_path / "stgridpool", {"videomme": {"videomme_perception_score,none": 59.0},
                                            "mvbench_action_count": {"mvbench_accuracy,none": 55.0},
                                            "mvbench_object_shuffle": {"mvbench_accuracy,none": 61.0},
                                            "nextqa_mc_test": {"exact_match,none": 0.796}}, MVBENCH)
    assert main(["--no-run", "--tasks", "videomme,mvbench,nextqa_mc_test", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| videomme | 58.2 | 59.0 | +0.8 |" in out
    assert "| mvbench | 55.0 | 58.0 | +3.0 |" in out
    assert "| nextqa_mc_test | 79.4 | 79.6 | +0.2 |" in out
    assert "| mean | 64.2 | 65.5 | +1.3 |" in out
    assert "*" not in out


def test_missing_results_and_conflicting_args_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no lmms-eval"):
        main(["--no-run", "--tasks", "videomme", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--pretrained", "x", "--tasks", "videomme", "--output-dir", str(tmp_path),
              "--model-args", "video_pooling_mode=average"])


def test_command_lines_of_the_two_runs(tmp_path):
    from argparse import Namespace

    args = Namespace(pretrained="repo", tasks="videomme,mvbench",
                     model_args="max_frames_num=32,pyramid_levels=[[4,2],[4,4]]",
                     launcher="accelerate launch --num_processes 8 -m", lmms_eval_args="--limit 4")
    command = lmms_eval_command(args, "average", tmp_path / "stock")
    assert command[:5] == ["accelerate", "launch", "--num_processes", "8", "-m"]
    assert command[5:10] == ["lmms_eval", "--model", "stgridpool", "--model_args",
                             "pretrained=repo,video_pooling_mode=average,max_frames_num=32,"
                             "pyramid_levels=[[4,2],[4,4]]"]
    assert command[-2:] == ["--limit", "4"] and str(tmp_path / "stock") in command


def test_a_run_that_writes_no_results_does_not_stop_the_other(tmp_path, capsys, monkeypatch):
    """lmms-eval exits 0 when a task fails (e.g. egoschema's upload, after writing its submission file): compare
    still makes the other run, lists the submission files, then fails naming the runs without results. The runs get
    HF_HOME even where it is unset (lmms-eval's nextqa and tempcompass code needs it)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HOME", raising=False)
    fake_lmms_eval = (  # writes its HF_HOME where egoschema writes its answers
        f"{sys.executable} -c \"import os, pathlib, sys; "
        "out = pathlib.Path(sys.argv[sys.argv.index('--output_path') + 1]); "
        "(out / 'submissions').mkdir(parents=True); "
        "(out / 'submissions' / 'answers.json').write_text(os.environ['HF_HOME'])\""
    )
    with pytest.raises(SystemExit, match="the stock and stgridpool run"):
        main(["--pretrained", "repo", "--tasks", "egoschema", "--launcher", fake_lmms_eval,
              "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    for run in ("stock", "stgridpool"):
        path = tmp_path / run / "submissions" / "answers.json"
        assert f"submission file (lmms-eval's answers to upload; see README): {path}" in out
        assert path.read_text() == constants.HF_HOME
