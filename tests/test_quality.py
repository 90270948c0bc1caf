"""Unit tests of benchmarks/quality.py's protocol: the selection rule, the per-seed comparison and the
verdict it carries, the sweep's placeholders, and the report's refusal to run on unfrozen choices.
Synthetic rows only: seconds.

    python -m pytest tests/test_quality.py -q
"""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import quality  # noqa: E402


def digits_row(model, nfe, seed, cfd, pixel=0.02, recall=0.9, split="validation"):
    return quality.row("digits", split, seed, model, nfe, {"cfd": cfd, "pixel_energy": pixel, "precision": 0.9,
                                                           "recall": recall})


def test_protocol_seeds_are_disjoint_and_the_full_plan_uses_them():
    assert not set(quality.PROTOCOL["tuning_seeds"]) & set(quality.PROTOCOL["reporting_seeds"])
    assert len(quality.PROTOCOL["reporting_seeds"]) >= 3
    full = quality.PLANS["full"]
    assert (full["tuning_seeds"], full["reporting_seeds"]) == (quality.PROTOCOL["tuning_seeds"],
                                                              quality.PROTOCOL["reporting_seeds"])


def test_selection_rule_never_picks_a_value_that_drops_modes():
    rows = [digits_row("base DDIM", 50, seed, 10.0, recall=0.9) for seed in (1, 2)]
    rows += [digits_row("lr=1", 4, seed, 5.0, recall=0.5) for seed in (1, 2)]  # lowest CFD, modes dropped
    rows += [digits_row("lr=2", 4, seed, 9.0 + seed, recall=0.88) for seed in (1, 2)]
    rows += [digits_row("lr=3", 4, seed, 12.0, recall=0.9) for seed in (1, 2)]
    assert quality.choose(rows, "digits", "lr", (1, 2, 3), 4) == 2
    everyone_drops = [r if not r["model"].startswith("lr") else {**r, "recall": 0.1} for r in rows]
    assert quality.choose(everyone_drops, "digits", "lr", (1, 2, 3), 4) == 1  # then the lowest distance


def test_compare_averages_per_seed_ratios_and_judges_the_means_by_the_verdict_rule():
    rows = [digits_row("base DDIM", 50, 1, 10.0), digits_row("base DDIM", 50, 2, 20.0),
            digits_row("R", 4, 1, 5.0), digits_row("R", 4, 2, 20.0)]
    result = quality.compare(rows, "digits", "R", 4, "base DDIM", 50)
    assert result["distance_ratio_mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert result["seeds"] == [1, 2] and result["beats"]  # means: 12.5 vs 15 = 0.83, pixel and recall equal
    dropped = rows[:2] + [digits_row("R", 4, seed, 5.0, recall=0.5) for seed in (1, 2)]
    assert not quality.compare(dropped, "digits", "R", 4, "base DDIM", 50)["beats"]


def test_sweep_templates_fill_the_swept_value_and_earlier_choices():
    template = quality.TUNING["gan_weight"][1]
    assert quality.fill(template, 0.5, {"teacher_lr": 3e-4}) == dict(coupling="teacher", finetune_lr=3e-4,
                                                                    gan_weight=0.5)
    names = set(quality.TUNING)
    for _, template, field, values in quality.TUNING.values():  # every placeholder names a stage; values swept
        assert template[field] == "{}" and values
        assert {v[1:-1] for v in template.values() if isinstance(v, str) and v.startswith("{") and v != "{}"} <= names


def test_report_refuses_choices_that_differ_from_the_committed_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "RESULTS", str(tmp_path))
    with pytest.raises(SystemExit, match="--tune"):
        quality.check_frozen({"teacher_lr": 1e-4})
    (tmp_path / "quality-tune.json").write_text(json.dumps({"chosen": {"teacher_lr": 3e-4}}))
    with pytest.raises(SystemExit, match="freeze"):
        quality.check_frozen({"teacher_lr": 1e-4})
    quality.check_frozen({"teacher_lr": 3e-4})


def test_every_recipe_says_why_and_no_headline_key_names_a_best_of_choice():
    tuned = {name: 1e-4 for name in quality.TUNING}
    table = quality.recipes(tuned)
    assert set(table) == {"digits", "ring2d", "table1"}
    assert all(why for recipes in table.values() for _, why in recipes.values())
    plan = {**quality.PLANS["quick"], "nfe": (1, 4)}
    rows = [digits_row("real data", None, 0, 4.0, split="test"), *[
        digits_row(m, k, 0, 5.0, split="test") for m in ["base DDIM", "LCM", *table["digits"], *table["table1"]]
        for k in (1, 4, 50)]]
    rows += [quality.row("ring2d", "test", 0, m, k, {"energy": 0.01, "precision": 1.0, "recall": 1.0})
             for m in ["base DDIM", *table["ring2d"]] for k in (1, 4, 50)]
    main, table1, verdicts, _ = quality.headlines(rows, plan, table)
    assert "digits/base50_vs_floor" in main and "digits/teacher-L2+P+GAN/nfe4/recall_delta" in main
    assert "table1/lcm-independent-L2/nfe4/cfd_ratio_vs_lcm" in table1
    assert not any("best" in key for key in [*main, *table1, *verdicts])
