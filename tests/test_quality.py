"""Unit tests of benchmarks/quality.py's protocol: the selection rule, the per-seed comparison and the
verdict it carries, the sweep's placeholders, and the report's refusal to run on unfrozen choices.
Synthetic rows only: seconds.

    python -m pytest tests/test_quality.py -q
"""
import json
import os
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import critics
from benchmarks import quality


def digits_row(model, nfe, seed, cfd, pixel=0.02, recall=0.9, split="validation"):
    return quality.row("digits", split, seed, model, nfe, {"cfd": cfd, "pixel_energy": pixel, "precision": 0.9,
                                                           "recall": recall})


def test_protocol_seeds_are_disjoint_and_the_full_plan_uses_them():
    assert not set(quality.PROTOCOL["tuning_seeds"]) & set(quality.PROTOCOL["reporting_seeds"])
    assert len(quality.PROTOCOL["reporting_seeds"]) >= 3


def test_the_sweep_trains_only_tuning_seeds_on_validation_and_the_report_only_reporting_seeds_on_test(monkeypatch):
    seen = []

    def fake_chains(pool, chains):  # every job the sweep or the report would run, and a row for each
        rows, metrics = [], {"cfd": 5.0, "energy": 0.1, "pixel_energy": 0.02, "precision": 0.9, "recall": 0.9}
        for first, then in chains:
            for kind, dataset, arguments in (first, *then):
                seen.append((kind, arguments["seed"], arguments["split"]))
                models = [("base DDIM", 50)] if kind == "prepare" else [(arguments["name"], k) for k in arguments["nfes"]]
                rows += [quality.row(dataset, arguments["split"], arguments["seed"], model, k, metrics)
                         for model, k in models]
        return rows

    monkeypatch.setattr(quality, "run_chains", fake_chains)
    full = quality.PLANS["full"]
    quality.tune(full, None, "w", quality.STUDIES["main"])
    assert seen and {(seed, split) for _, seed, split in seen} == {(s, "validation") for s in quality.PROTOCOL["tuning_seeds"]}
    seen.clear()
    quality.report(full, None, "w", quality.recipes(quality.TUNED), quality.STUDIES["main"])
    assert seen and {(seed, split) for _, seed, split in seen} == {(s, "test") for s in quality.PROTOCOL["reporting_seeds"]}


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


# ---------------------------------------------------------------- the GAN study (--study gan)


def test_gan_study_runs_base_feature_recipes_only_once_its_sweep_is_frozen_and_they_carry_every_choice():
    unfrozen = quality.gan_recipes(None)
    assert not any("basefeat" in name for part in unfrozen.values() for name in part)  # runnable before the sweep
    chosen = {"basefeat_gan_weight": 0.3, "basefeat_layers": "middle.1", "basefeat_t_loc": 3.0,
              "basefeat_disc_steps": 5, "basefeat_train_backbone": True}
    table = quality.gan_recipes(chosen)
    basefeat = [fields for part in table.values() for name, (fields, _) in part.items() if "basefeat" in name]
    assert len(basefeat) == 3
    for fields in basefeat:
        assert fields["disc_kind"] == "basefeat" and fields["coupling"] == "teacher"
        assert (fields["gan_weight"], fields["disc_feature_layers"], fields["disc_t_loc"], fields["disc_steps"],
                fields["disc_train_backbone"]) == (0.3, "middle.1", 3.0, 5, True)
    assert {name: fields for part in unfrozen.values() for name, (fields, _) in part.items()} == {
        name: fields for part in table.values() for name, (fields, _) in part.items() if "basefeat" not in name}
    assert all(fields["finetune_lr"] == quality.TUNED["lcm_lr"] for fields, _ in table["table1"].values())
    assert all(why for part in table.values() for _, why in part.values())
    for stage, (_, template, field, values) in quality.GAN_TUNING.items():  # placeholders name stages
        assert template[field] == "{}" and len(values) >= 2
        assert {v[1:-1] for v in template.values() if isinstance(v, str) and v.startswith("{") and v != "{}"} <= \
            set(quality.GAN_TUNING)


def test_gan_study_headline_keys_follow_the_protocol_scheme():
    table = quality.gan_recipes({"basefeat_gan_weight": 0.1, "basefeat_layers": "auto", "basefeat_t_loc": 1.0,
                                 "basefeat_disc_steps": 1, "basefeat_train_backbone": False})
    plan = {**quality.PLANS["quick"], "nfe": quality.STUDIES["gan"]["nfe"]}
    rows = [digits_row("real data", None, 0, 4.0, split="test"), *[
        digits_row(m, k, 0, 5.0, split="test") for m in ["base DDIM", "LCM", *table["digits"], *table["table1"]]
        for k in (1, 2, 4, 50)]]
    main, table1, _, _ = quality.headlines(rows, plan, table)
    assert {f"digits/teacher-L2+P+basefeat/nfe{k}/{m}" for k in (1, 2, 4)
            for m in ("cfd_ratio", "pixel_ratio", "recall_delta")} <= set(main)
    assert "table1/lcm-teacher-L2+P+basefeat/nfe4/cfd_ratio_vs_lcm" in table1
    assert not any(key.startswith("ring2d/") for key in main)


def test_a_setting_two_sweep_stages_share_is_trained_once_and_its_rows_serve_both(monkeypatch):
    ran = []

    def fake_chains(pool, chains):
        ran.extend(job[2]["name"] for job, _ in chains)
        return [digits_row(job[2]["name"], 4, job[2]["seed"], 5.0 + len(ran)) for job, _ in chains]

    monkeypatch.setattr(quality, "run_chains", fake_chains)
    plan, trained = quality.PLANS["quick"], {}
    first = quality.finetune_jobs(plan, (1,), "validation", "w", "digits", {"w=0.1": {"gan_weight": 0.1}}, (4,))
    rows = quality.run_once(None, first, trained)
    again = quality.finetune_jobs(plan, (1,), "validation", "w", "digits", {"steps=1": {"gan_weight": 0.1},
                                                                            "steps=5": {"gan_weight": 0.1,
                                                                                        "disc_steps": 5}}, (4,))
    rows += quality.run_once(None, again, trained)
    assert ran == ["w=0.1", "steps=5"]  # steps=1 is w=0.1's setting: not trained again
    by_name = {r["model"]: r for r in rows}
    assert by_name["steps=1"]["cfd"] == by_name["w=0.1"]["cfd"] and by_name["steps=1"]["same_as"] == "w=0.1"
    assert "same_as" not in by_name["steps=5"]


def test_gan_report_refuses_an_unfrozen_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "RESULTS", str(tmp_path))
    with pytest.raises(SystemExit, match="--study gan --tune"):
        quality.check_frozen(None, "gan")
    (tmp_path / "quality-gan-tune.json").write_text(json.dumps({"chosen": {"basefeat_gan_weight": 0.1}}))
    with pytest.raises(SystemExit, match="GAN_TUNED"):
        quality.check_frozen(None, "gan")
    quality.check_frozen({"basefeat_gan_weight": 0.1}, "gan")


# ---------------------------------------------------------------- the critic study (--study critic)


def test_critic_study_recipes_carry_the_frozen_length_and_every_gan_recipe_warms_its_critic_up():
    table = quality.critic_recipes({"critic_finetune_steps": 1500})
    recipes = {name: fields for part in table.values() for name, (fields, _) in part.items()}
    long = {name: fields for name, fields in recipes.items() if name.endswith(f"-warm{quality.CRITIC_LONG_WARMUP_STEPS}")}
    assert all(fields["finetune_steps"] == 1500 for name, fields in recipes.items() if name not in long)
    gan = {name: fields for name, fields in recipes.items() if fields.get("gan_weight", 0) > 0}
    assert set(gan) == {name for name in recipes if "GAN" in name or "basefeat" in name} and len(gan) == 10
    for name, fields in gan.items():
        warmup = quality.CRITIC_LONG_WARMUP_STEPS if name in long else quality.CRITIC_WARMUP_STEPS
        assert fields["critic_warmup_steps"] == warmup < fields["finetune_steps"]
        assert fields["finetune_steps"] - warmup == 1500 - quality.CRITIC_WARMUP_STEPS  # the same generator steps
        assert fields["disc_steps"] == quality.CRITIC_DISC_STEPS
    assert set(long) == {"lcm-GAN-warm1500", "lcm-ddim-GAN-warm1500"}
    for name in long:  # the GAN-only row it repeats, but for the warm-up
        twin = recipes[name.removesuffix(f"-warm{quality.CRITIC_LONG_WARMUP_STEPS}")]
        assert {k: v for k, v in long[name].items() if k not in ("critic_warmup_steps", "finetune_steps")} == \
            {k: v for k, v in twin.items() if k not in ("critic_warmup_steps", "finetune_steps")}
    assert {fields["lcm_update"] for fields, _ in table["table1"].values()} == {"lcm", "ddim"}  # both update arms
    assert all(fields["finetune_lr"] == quality.TUNED["lcm_lr"] for fields, _ in table["table1"].values())
    for name in ("lcm-GAN", "lcm-ddim-GAN"):  # no regression term at all
        assert (recipes[name]["l2_weight"], recipes[name].get("lpips_weight", 0.0)) == (0.0, 0.0)
    assert quality.CRITIC_TUNED["critic_finetune_steps"] >= 1000  # the floor at 4 NFE


def test_critic_study_headline_has_hf_ratio_for_every_recipe_and_auc_for_every_gan_recipe():
    table = quality.critic_recipes({"critic_finetune_steps": 1000})
    plan = {**quality.PLANS["quick"], "nfe": quality.STUDIES["critic"]["nfe"]}
    extra = {"hf_ratio": 0.8}
    rows = [digits_row("real data", None, 0, 4.0, split="test"),
            *[{**digits_row(m, k, 0, 5.0, split="test"), **extra} for m in ("base DDIM", "LCM") for k in (4, 50)],
            {**digits_row(quality.LCM_DDIM, 4, 0, 4.0, split="test"), **extra}]  # the ddim arm's untrained start
    for name, (fields, _) in [*table["digits"].items(), *table["table1"].items()]:
        auc = {"critic_auc_warmup": 0.85, "critic_auc": 0.9} if fields.get("gan_weight", 0) > 0 else {}
        rows.append({**digits_row(name, 4, 0, 5.0, split="test"), **extra, **auc})
    main, table1, verdicts, _ = quality.headlines(rows, plan, table)
    assert table1["table1/lcm_ddim_untrained/nfe4/cfd_ratio_vs_lcm"] == pytest.approx(0.8)
    for name, (fields, _) in table["table1"].items():  # a DDIM recipe is also measured against its own start
        through_ddim = fields["lcm_update"] == "ddim"
        assert (f"table1/{name}/nfe4/cfd_ratio_vs_lcm_ddim" in table1) == through_ddim
        assert (f"table1/{name}/nfe4 vs {quality.LCM_DDIM} 4" in verdicts) == through_ddim
        if through_ddim:
            assert table1[f"table1/{name}/nfe4/cfd_ratio_vs_lcm_ddim"] == pytest.approx(1.25)
            assert table1[f"table1/{name}/nfe4/cfd_ratio_vs_lcm"] == pytest.approx(1.0)
    for prefix, names in (("digits", table["digits"]), ("table1", table["table1"])):
        for name in names:
            keys = set(main if prefix == "digits" else table1)
            assert f"{prefix}/{name}/nfe4/hf_ratio" in keys
            has_critic = "GAN" in name or "basefeat" in name
            assert ({f"{prefix}/{name}/nfe4/critic_auc_warmup", f"{prefix}/{name}/nfe4/critic_auc"} <= keys) == has_critic


def test_critic_study_declares_its_choices_and_reports_on_fresh_seeds(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "RESULTS", str(tmp_path))
    quality.check_frozen(quality.CRITIC_TUNED, "critic")  # nothing swept, no sweep file needed
    with pytest.raises(SystemExit, match="--study gan --tune"):  # a study that sweeps still needs its file
        quality.check_frozen(quality.GAN_TUNED, "gan")
    seeds = quality.STUDIES["critic"]["reporting_seeds"]
    assert seeds and set(seeds) <= set(quality.PROTOCOL["reporting_seeds"])
    assert not set(seeds) & set(quality.PROTOCOL["tuning_seeds"])
    with pytest.raises(SystemExit):
        quality.main(["--study", "critic", "--tune", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # refused before anything is created


# ---------------------------------------------------------------- the critic warm-up probe


def test_warmup_headline_names_the_first_step_at_the_goal_or_none_and_the_study_warmups_auc():
    from benchmarks import critic_warmup
    study = quality.CRITIC_WARMUP_STEPS
    learns = {"critic": "PatchGAN", "student": "LCM", "warmup_steps": 4 * study, "auc_samples": 256,
              "curve": [[study, 0.6], [2 * study, 0.79], [3 * study, 0.81], [4 * study, 0.7]]}
    stuck = {"critic": "basefeat", "student": "LCM", "warmup_steps": 2 * study, "auc_samples": 256,
             "curve": [[study, 0.55], [2 * study, 0.6]]}
    values = critic_warmup.headline([learns, stuck])
    assert values["PatchGAN/LCM/steps_to_goal"] == 3 * study  # the first step at >= 0.8, though it falls after
    assert values["PatchGAN/LCM/auc_at_study_warmup"] == 0.6 and values["PatchGAN/LCM/auc_final"] == 0.7
    assert values["basefeat/LCM/steps_to_goal"] is None and values["basefeat/LCM/auc_final"] == 0.6
    # the last half: the steps past half the warm-up (0.81, 0.7; and 0.6 alone)
    assert values["PatchGAN/LCM/auc_last_half_mean"] == pytest.approx(0.755)
    assert values["PatchGAN/LCM/auc_last_half_std"] == pytest.approx(0.055)
    assert values["basefeat/LCM/auc_last_half_mean"] == 0.6 and values["basefeat/LCM/auc_last_half_std"] == 0.0
    assert values["auc_standard_error_at_goal"] == critics.auc_standard_error(critic_warmup.AUC_GOAL, 256, 256)


def test_committed_reports_that_share_bases_agree_on_them():
    """The main report (quality.json) and the critic study (quality-critic-table1.json) train the same bases on the
    same reporting seeds and measure them in the same fixed instrument, so their rows of the real data, the base and
    the LCM must agree. They did not while quality.json predated the instrument (its per-seed classifiers put the
    base's 50-step CFD at 5.65 ± 0.93 against the instrument's 6.68 ± 0.35). Tolerance: the CPU-stability goal the
    spread benchmark holds every CFD to (spread.json's goal_relative_cfd), should one file be re-run on another CPU."""
    results = Path(ROOT, "benchmarks", "results")
    load = lambda name: json.loads((results / name).read_text())
    tolerance = load("spread.json")["goal_relative_cfd"]
    shared = ("real data", "base DDIM", "LCM")
    rows = lambda name: {(r["dataset"], r["seed"], r["model"], r["nfe"]): r for r in load(name)["rows"]
                         if r["model"] in shared}
    main, critic = rows("quality.json"), rows("quality-critic-table1.json")
    common = sorted(set(main) & set(critic), key=str)
    assert {key[2] for key in common} == set(shared) and len({key[1] for key in common}) == 3
    for key in common:
        for metric in ("cfd", "pixel_energy", "precision", "recall"):
            assert main[key][metric] == pytest.approx(critic[key][metric], rel=tolerance, abs=1e-12), (key, metric)
