"""stgridpool_eval.compare reads lmms-eval result files and prints the stock vs ST-GridPool table (no lmms-eval needed)."""

import json

import pytest

from stgridpool_eval.compare import lmms_eval_command, main, task_score


def write_results(run_dir, results, group_subtasks=None):
    run_dir.mkdir(parents=True)
    payload = {"results": results, "group_subtasks": group_subtasks or {}}
    (run_dir / "20260101_000000_results.json").write_text(json.dumps(payload))


MVBENCH = {"mvbench": ["mvbench_action_count", "mvbench_object_shuffle"]}


def test_scores_are_percentages_and_groups_average_their_subtasks():
    results = {
        "results": {
            "videomme": {"alias": "videomme", "videomme_perception_score,none": 58.2, "videomme_perception_score_stderr,none": "N/A"},
            "nextqa_mc_test": {"alias": "nextqa_mc_test", "exact_match,none": 0.794, "exact_match_stderr,none": 0.01},
            "mvbench": {"alias": "mvbench"},
            "mvbench_action_count": {"mvbench_accuracy,none": 50.0},
            "mvbench_object_shuffle": {"mvbench_accuracy,none": 60.0},
        },
        "group_subtasks": MVBENCH,
    }
    assert task_score(results, "videomme") == pytest.approx(58.2)
    assert task_score(results, "nextqa_mc_test") == pytest.approx(79.4)
    assert task_score(results, "mvbench") == pytest.approx(55.0)
    assert task_score(results, "egoschema") is None


def test_no_run_prints_the_table_with_deltas(tmp_path, capsys):
    write_results(tmp_path / "stock", {"videomme": {"score,none": 58.2}, "mvbench_action_count": {"acc,none": 0.5},
                                       "mvbench_object_shuffle": {"acc,none": 0.6}}, MVBENCH)
    write_results(tmp_path / "stgridpool", {"videomme": {"score,none": 59.0}, "mvbench_action_count": {"acc,none": 0.55},
                                            "mvbench_object_shuffle": {"acc,none": 0.61}}, MVBENCH)
    assert main(["--no-run", "--tasks", "videomme,mvbench", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| videomme | 58.2 | 59.0 | +0.8 |" in out
    assert "| mvbench | 55.0 | 58.0 | +3.0 |" in out
    assert "| mean | 56.6 | 58.5 | +1.9 |" in out


def test_missing_results_and_conflicting_args_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no lmms-eval"):
        main(["--no-run", "--tasks", "videomme", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--pretrained", "x", "--tasks", "videomme", "--output-dir", str(tmp_path), "--model-args", "video_pooling_mode=average"])


def test_command_lines_of_the_two_runs(tmp_path):
    from argparse import Namespace

    args = Namespace(pretrained="repo", tasks="videomme,mvbench", model_args="max_frames_num=32,pyramid_levels=[[4,2],[4,4]]",
                     launcher="accelerate launch --num_processes 8 -m", lmms_eval_args="--limit 4")
    command = lmms_eval_command(args, "average", tmp_path / "stock")
    assert command[:5] == ["accelerate", "launch", "--num_processes", "8", "-m"]
    assert command[5:10] == ["lmms_eval", "--model", "stgridpool", "--model_args",
                             "pretrained=repo,video_pooling_mode=average,max_frames_num=32,pyramid_levels=[[4,2],[4,4]]"]
    assert command[-2:] == ["--limit", "4"] and str(tmp_path / "stock") in command
