"""benchmarks/commands.py reads what README's two commands print, and report.py renders what it recorded.

    pytest tests/test_commands.py      # about a second: parses logs, runs no command
"""
import json

import pytest

from benchmarks import commands, report

GREEN = """...
719 passed, 18 deselected, 3 warnings in 80.32s (0:01:20)
...
18 passed, 719 deselected in 608.81s (0:10:08)
"""


def test_pytest_tiers_reads_both_green_summaries_in_order():
    tiers = commands.pytest_tiers(GREEN)
    assert [(tier["name"], tier["counts"], tier["seconds"]) for tier in tiers] == [
        ("default", "719 passed, 18 deselected, 3 warnings", 80.3), ("slow", "18 passed, 719 deselected", 608.8)]
    assert report.tier_cell(tiers[0]) == "719 passed in 80 s"


@pytest.mark.parametrize("log", [
    GREEN.replace("18 passed, 719", "1 failed, 17 passed, 719"),
    GREEN.replace("18 passed, 719", "17 passed, 1 error, 719"),
    GREEN.split("...")[1],  # the slow tier never ran
])
def test_pytest_tiers_refuses_a_red_or_missing_tier(log):
    with pytest.raises(RuntimeError, match="two green pytest summaries"):
        commands.pytest_tiers(log)


def test_a_failing_command_raises_with_its_logs_tail(tmp_path):
    with pytest.raises(RuntimeError, match=r"exited 3(.|\n)*the last words"):
        commands.timed("echo the last words; exit 3", tmp_path, tmp_path / "command.log")


def test_quickstart_stages_sum_the_last_row_of_every_fine_tune(tmp_path):
    rows = [{"stage": "pretrain", "step": 50, "seconds": 5.0, "steps_per_second": 10.0},
            {"stage": "pretrain", "step": 100, "seconds": 8.0, "steps_per_second": 12.5},
            {"stage": "finetune-nfe1", "step": 10, "seconds": 2.0, "steps_per_second": 5.0},
            {"stage": "finetune-nfe1", "step": 20, "seconds": 3.0, "steps_per_second": 6.7},
            {"stage": "finetune-nfe4", "step": 20, "seconds": 7.0, "steps_per_second": 2.9},
            {"stage": "evaluate", "model": "base"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert commands.quickstart_stages(tmp_path) == {"pretrain_s": 8.0, "finetune_s": 10.0, "pretrain_steps_per_s": 12.5}


def test_same_but_wall_time_sees_any_other_difference():
    committed = {"config": {"seed": 0}, "wall_s": 296.4, "rows": [{"model": "base", "cfd": 5.04}]}
    assert commands.same_but_wall_time({**committed, "wall_s": 373.0}, committed)
    assert not commands.same_but_wall_time({**committed, "rows": [{"model": "base", "cfd": 5.05}]}, committed)


def test_readme_line_takes_the_latest_runs_and_projects_the_slowest_to_the_present_length():
    note = "transcribed"
    runs = [{"command": 1, "date": "d1", "reported_in": "a", "finetune_steps": 600, "install_s": 100, "run_s": 500,
             "total_s": 600, "pretrain_s": 200, "finetune_s": 270, "pretrain_steps_per_s": 10, "source": note},
            {"command": 1, "date": "d2", "commit": "b", "finetune_steps": 400, "install_s": 60, "run_s": 300,
             "total_s": 360, "source": note},
            {"command": 2, "date": "d2", "commit": "b", "total_s": 783,
             "tiers": [{"name": "default", "counts": None, "seconds": 80}, {"name": "slow", "counts": None, "seconds": 609}]}]
    line = report.commands_readme({"runs": runs})
    # the slowest run's fine-tunes scaled from 600 to 400 steps: 600 - 270 / 3 = 510
    assert report.projected(runs[0], 400) == 510
    assert "command 1 took 360 s on d2 (pip 60 s, the run 300 s), ≈ 510 s at the stage speeds" in line
    assert "command 2 took 13 min 3 s (default tier 80 s, slow tier 609 s)." in line
    assert "`a` (transcribed)" in report.commands_tables({"runs": runs})


def test_largest_differences_compare_each_column_row_by_row_and_judge_them_by_the_training_spread():
    committed = {"rows": [{"model": "real", "nfe": None, "cfd": 5.0, "pixel_energy": 0.02, "precision": 0.9,
                           "recall": 0.0, "hf_ratio": 1.0},
                          {"model": "base", "nfe": 4, "cfd": 20.0, "pixel_energy": 0.1, "precision": 1.0,
                           "recall": 0.5, "hf_ratio": 0.7}]}
    drifted = json.loads(json.dumps(committed))
    drifted["rows"][1]["cfd"] = 20.0 * (1 + 1e-7)
    differences = commands.largest_differences(drifted, committed)
    assert differences["cfd"] == pytest.approx(1e-7) and differences["pixel_energy"] == 0.0
    assert commands.within_training_spread(differences)
    drifted["rows"][0]["recall"] = 0.01  # from a committed zero: any change counts in full
    differences = commands.largest_differences(drifted, committed)
    assert differences["recall"] == 1.0 and not commands.within_training_spread(differences)
    with pytest.raises(RuntimeError, match="other rows"):
        commands.largest_differences({"rows": committed["rows"][:1]}, committed)


def test_the_table_says_whether_a_run_that_differs_stayed_within_the_cpu_spread():
    base = {"same_as_committed": False, "largest_relative_difference": {"cfd": 4.3e-07}}
    assert report.same_as_committed({**base, "within_training_spread": True}) == "within the CPU spread (CFD 4.3e-07)"
    assert report.same_as_committed({**base, "within_training_spread": False}).startswith("**no**: beyond")
    assert report.same_as_committed({"same_as_committed": True}) == "yes"
    assert report.same_as_committed({"same_as_committed": False}) == "**no**"
