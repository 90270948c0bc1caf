"""Tests of train_toy.py on tiny configs of the embedded digits (CPU, no network, ~30 s).

    python -m pytest tests/test_toy.py -q
"""
import json
import math
import os
import pickle
import signal
from dataclasses import fields

import numpy as np
import pytest
import torch

import e2ediff
import toy_data
import toy_nets
import toy_training
import train_utils
from e2ediff import EndToEndConfig
from toy_training import Config, load_checkpoint
from train_utils import UsageError


METHOD_FIELDS = {f.name for f in fields(EndToEndConfig)}


def tiny(out_dir, **overrides):
    """A config that runs every stage in about a second."""
    settings = dict(
        out_dir=str(out_dir), model_channels=8, pretrain_steps=6, pretrain_batch_size=32, warmup_steps=2,
        finetune_steps=4, finetune_batch_size=16, nfe=(1,), base_nfe=(1, 2), inversion_steps=4,
        eval_samples=100, eval_batch_size=100, classifier_epochs=1, log_every=1, save_every=100)
    return train_utils.make_config(Config, **{**settings, **overrides})


def flat_tensors(tree, prefix=""):
    """{path: tensor} for every tensor in a nested checkpoint (dicts, lists, tuples)."""
    if torch.is_tensor(tree):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return {key: value for name, sub in items for key, value in flat_tensors(sub, f"{prefix}/{name}").items()}


def assert_bit_identical(path_a, path_b, parts):
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert a["step"] == b["step"]
    for part in parts:
        tensors_a, tensors_b = flat_tensors(a[part]), flat_tensors(b[part])
        assert tensors_a.keys() == tensors_b.keys() and tensors_a, part
        for key in tensors_a:
            assert torch.equal(tensors_a[key], tensors_b[key]), f"{part}{key} differs"


# --- both stages end to end -------------------------------------------------------------------


def test_quickstart_command_runs_all_stages_and_writes_checkpoints_log_grids_table(tmp_path):
    out = tmp_path / "run"
    toy_training.main(["--out-dir", str(out), "--model-channels", "8", "--pretrain-steps", "20",
                    "--pretrain-batch-size", "32", "--finetune-steps", "6", "--finetune-batch-size", "16",
                    "--nfe", "1,2", "--base-nfe", "1,2,50", "--inversion-steps", "4", "--eval-samples", "100",
                    "--classifier-epochs", "1", "--log-every", "5"])
    base = torch.load(out / "pretrain.pt", weights_only=True)
    assert base["step"] == 20 and base["stage"] == "pretrain" and base["config"]["model_channels"] == 8
    assert {"model", "ema", "optimizer", "batches", "rng", "config"} <= base.keys()
    for steps in (1, 2):
        tuned = torch.load(out / f"finetune-nfe{steps}.pt", weights_only=True)
        assert tuned["step"] == 6 and tuned["nfe"] == steps
        moved = [not torch.equal(tuned["model"][k], base["ema"]["module"][k]) for k in tuned["model"]]
        assert any(moved), "fine-tuning did not change the weights"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "pretrain"] == [5, 10, 15, 20]
    assert [r["step"] for r in rows if r["stage"] == "finetune-nfe2"] == [5, 6]
    assert all(np.isfinite(r["loss"]) and r["steps_per_second"] > 0 for r in rows if "loss" in r)
    results = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["model"], r["nfe"]) for r in results] == [
        ("real data (train split)", None), ("base, DDIM", 1), ("base, DDIM", 2), ("base, DDIM", 50),
        ("E2E fine-tuned", 1), ("E2E fine-tuned", 2)]
    assert all(np.isfinite(r["cfd"]) and r["cfd"] >= 0 and r["pixel_energy"] >= 0 for r in results)
    assert all(0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 for r in results)
    assert "| E2E fine-tuned | 2 |" in (out / "results.md").read_text()
    from PIL import Image
    assert Image.open(out / "grids" / "e2e-nfe1.png").size == (10 * 66 + 2, 10 * 66 + 2)  # 10x10 digits, 64 px


def test_lcm_base_distils_then_fine_tunes_the_lcm_through_its_own_sampler_and_reports_table1(tmp_path, capsys):
    out = tmp_path / "run"
    toy_training.main(["--out-dir", str(out), "--base", "lcm", "--model-channels", "8", "--pretrain-steps", "6",
                    "--pretrain-batch-size", "32", "--distill-steps", "4", "--distill-batch-size", "16",
                    "--finetune-steps", "3", "--finetune-batch-size", "16", "--nfe", "1,2", "--base-nfe", "1,50",
                    "--inversion-steps", "2", "--eval-samples", "30", "--classifier-epochs", "1", "--log-every", "1"])
    lcm = load_checkpoint(out / "lcm.pt")
    assert lcm["stage"] == "distill" and lcm["step"] == 4 and {"model", "target", "optimizer"} <= lcm.keys()
    base = load_checkpoint(out / "pretrain.pt")["ema"]["module"]
    assert any(not torch.equal(lcm["target"]["module"][k], base[k]) for k in base)  # distillation moved it
    tuned = load_checkpoint(out / "finetune-lcm-nfe2.pt")
    assert any(not torch.equal(tuned["model"][k], lcm["target"]["module"][k]) for k in base)
    assert not (out / "finetune-nfe2.pt").exists()
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["model"], r["nfe"]) for r in rows] == [
        ("real data (train split)", None), ("base, DDIM", 1), ("base, DDIM", 50), ("LCM (distilled)", 1),
        ("LCM (distilled)", 2), ("E2E from LCM", 1), ("E2E from LCM", 2)]
    printed = capsys.readouterr().out
    verdicts = [line for line in printed.splitlines() if line.startswith("2 NFE: E2E from LCM ")]
    assert len(verdicts) == 2 and "LCM (distilled) at 2 NFE: CFD" in verdicts[0] and "base, DDIM at 50 NFE" in verdicts[1]
    assert all("pixel ratio" in line and "recall" in line for line in verdicts)  # the whole verdict rule
    logged = {json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert {"pretrain", "distill", "finetune-lcm-nfe1", "finetune-lcm-nfe2", "eval"} == logged


def test_resume_of_a_finished_run_redoes_nothing_and_a_new_evaluation_replaces_the_old_rows(tmp_path, capsys):
    out, flags = tmp_path / "run", ["--model-channels", "8", "--pretrain-steps", "4", "--pretrain-batch-size", "32",
                                    "--finetune-steps", "2", "--finetune-batch-size", "16", "--nfe", "1",
                                    "--base-nfe", "1", "--inversion-steps", "2", "--eval-samples", "20",
                                    "--classifier-epochs", "1", "--log-every", "1"]
    toy_training.main(["--out-dir", str(out), *flags])
    before = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in out.rglob("*") if path.is_file()}
    capsys.readouterr()
    toy_training.main(["--out-dir", str(out), *flags, "--resume"])
    printed = capsys.readouterr().out
    assert "is up to date (nothing trained since), skipping" in printed and "inverted" not in printed
    after = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in out.rglob("*") if path.is_file()}
    assert after == before  # no checkpoint, log row, grid or result written again
    toy_training.main(["--out-dir", str(out), *flags, "--stage", "eval"])  # asked for: evaluates again
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["nfe"] for r in rows if r["stage"] == "eval"] == [None, 1, 1]  # data, base, E2E: once each


def test_finetune_with_l1_lpips_and_patchgan_on_independent_pairs_trains_the_discriminator(tmp_path, digits):
    config = tiny(tmp_path, coupling="independent", l1_weight=1.0, l2_weight=0.0, lpips_weight=0.5,
                  perceptual_net="lpips", lpips_random_backbone=True, gan_weight=0.1, gan_start_step=2, finetune_steps=3,
                  nfe=(2,), grad_checkpoint=True, backprop_steps=1)
    toy_training.pretrain(config, digits, torch.device("cpu"))
    path = toy_training.finetune(config, digits, torch.device("cpu"))[2]
    checkpoint = load_checkpoint(path)
    assert {"discriminator", "disc_optimizer"} <= checkpoint.keys()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    tuned = [r for r in rows if r["stage"] == "finetune-nfe2"]
    assert "gan" not in tuned[0] and {"l1", "lpips", "gan", "gan_weight", "disc"} <= tuned[-1].keys()
    assert tuned[-1]["loss"] == pytest.approx(tuned[-1]["recon"] + tuned[-1]["gan_total"], rel=1e-5)


def test_teacher_pairs_are_the_base_samples_made_once_per_image_and_cached_on_disk(tmp_path, digits, monkeypatch):
    config = tiny(tmp_path, coupling="teacher", teacher_steps=3, teacher_pool=2)
    device = torch.device("cpu")
    toy_training.pretrain(config, digits, device)
    base, schedule = toy_training.load_base(config, digits, device), toy_training.build_schedule(config, device)
    z_T, samples = toy_training.coupling_pairs(config, digits, device, base, schedule)
    assert len(z_T) == len(samples) == 2 * len(digits.train_images)
    index = torch.tensor([0, 5, len(digits.train_images) + 5])  # pair i carries image i % N's label
    cond, _ = toy_training.conditions(config, digits, digits.train_labels[index % len(digits.train_images)])
    with torch.no_grad():
        again = e2ediff.unrolled_sample(base, z_T[index], schedule, 3, prediction_type=config.prediction_type, cond=cond)
    torch.testing.assert_close(again, samples[index], rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(toy_training, "teacher_pairs", lambda *args: pytest.fail("the cache was not reused"))
    cached = toy_training.coupling_pairs(config, digits, device, base, schedule)
    assert torch.equal(cached[0], z_T) and torch.equal(cached[1], samples)
    toy_training.finetune(config, digits, device)  # fine-tunes from the cached pairs
    assert (tmp_path / "finetune-nfe1.pt").is_file()


def test_trained_perceptual_backbone_is_its_own_network_cached_and_used_by_the_lpips_term(tmp_path, digits):
    config = tiny(tmp_path, lpips_weight=1.0, gan_weight=0.5, classifier_epochs=2)
    cpu = torch.device("cpu")
    toy_training.pretrain(config, digits, cpu)
    toy_training.finetune(config, digits, cpu)
    cached = load_checkpoint(tmp_path / "perceptual.pt")
    assert cached["key"]["seed"] == config.seed + toy_training.PERCEPTUAL_SEED_OFFSET  # never the metric's seed
    assert not (tmp_path / "classifier.pt").exists()  # the metric's classifier is trained apart, for evaluation
    network = toy_training.train_perceptual(config, digits, cpu)  # loaded from the cache, not trained again
    assert isinstance(network, toy_nets.PerceptualNet) and not isinstance(network, toy_nets.Classifier)
    for name, tensor in network.state_dict().items():
        assert torch.equal(tensor, cached["model"][name])
    shapes = [tuple(f.shape) for f in network.features(digits.test_images[:2])]
    assert shapes == [(2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    tuned = [r for r in rows if r["stage"] == "finetune-nfe1"]
    assert all(r["lpips"] > 0 and "disc" in r for r in tuned)
    assert tuned[-1]["recon"] == pytest.approx(tuned[-1]["l2"] + tuned[-1]["lpips"], rel=1e-5)


def test_gan_discriminator_is_conditional_on_the_labels_by_default(tmp_path, digits):
    config = tiny(tmp_path, gan_weight=0.5)
    toy_training.pretrain(config, digits, torch.device("cpu"))
    checkpoint = load_checkpoint(toy_training.finetune(config, digits, torch.device("cpu"))[1])
    assert checkpoint["discriminator"]["class_embed.weight"].shape == (digits.num_classes + 1, 2 * 64)  # its last features
    with pytest.raises(train_utils.UsageError, match="--disc-conditional"):
        toy_training.parse_config(["--no-class-conditional", "--gan-weight", "0.5"])
    assert not toy_training.parse_config(["--no-class-conditional"]).class_conditional  # no GAN: nothing to condition


def test_finetune_with_base_feature_discriminator_trains_heads_on_the_frozen_base(tmp_path, digits):
    assert toy_training.parse_config(["--disc-kind", "basefeat", "--gan-weight", "0.5"]).e2e.disc_kind == "basefeat"
    config = tiny(tmp_path, gan_weight=0.5, disc_kind="basefeat", disc_steps=2, finetune_steps=2)
    cpu = torch.device("cpu")
    toy_training.pretrain(config, digits, cpu)
    base = {name: tensor.clone() for name, tensor in toy_training.load_base(config, digits, cpu).state_dict().items()}
    checkpoint = load_checkpoint(toy_training.finetune(config, digits, cpu)[1])
    heads = checkpoint["discriminator"]
    assert heads and all(key.startswith("heads.") for key in heads)  # the heads alone: no copy of the base
    assert heads["heads.0.embed.weight"].shape[0] == digits.num_classes + 1  # conditional on the labels by default
    assert {int(state["step"]) for state in checkpoint["disc_optimizer"]["state"].values()} == {4}  # 2 steps x 2 critic steps
    assert all(torch.equal(tensor, base[name]) for name, tensor in toy_training.load_base(config, digits, cpu).state_dict().items())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    tuned = [r for r in rows if r["stage"] == "finetune-nfe1"]
    assert len(tuned) == 2 and all(math.isfinite(r["disc"]) and math.isfinite(r["gan"]) for r in tuned)


# --- exact resume -----------------------------------------------------------------------------


def test_pretrain_resume_is_bit_identical_to_one_uninterrupted_run(tmp_path, digits):
    cpu = torch.device("cpu")
    toy_training.pretrain(tiny(tmp_path / "straight", pretrain_steps=6), digits, cpu)
    toy_training.pretrain(tiny(tmp_path / "halves", pretrain_steps=3), digits, cpu)
    toy_training.pretrain(tiny(tmp_path / "halves", pretrain_steps=6, resume=True), digits, cpu)
    assert_bit_identical(tmp_path / "straight" / "pretrain.pt", tmp_path / "halves" / "pretrain.pt",
                         ["model", "ema", "optimizer", "batches", "rng"])


def test_ctrl_c_saves_a_checkpoint_and_finetune_resumes_bit_identically(tmp_path, digits, monkeypatch):
    cpu = torch.device("cpu")
    config = tiny(tmp_path / "straight", nfe=(2,))
    toy_training.pretrain(config, digits, cpu)
    toy_training.finetune(config, digits, cpu)
    (tmp_path / "halves").mkdir()
    (tmp_path / "halves" / "pretrain.pt").write_bytes((tmp_path / "straight" / "pretrain.pt").read_bytes())

    calls, real_step = [], toy_training.train_step
    def ctrl_c_at_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during step 2
        return real_step(*args, **kwargs)
    monkeypatch.setattr(toy_training, "train_step", ctrl_c_at_step_2)
    with pytest.raises(KeyboardInterrupt, match="finetune-nfe2 interrupted at step 2"):
        toy_training.finetune(tiny(tmp_path / "halves", nfe=(2,)), digits, cpu)
    assert load_checkpoint(tmp_path / "halves" / "finetune-nfe2.pt")["step"] == 2
    monkeypatch.setattr(toy_training, "train_step", real_step)

    toy_training.finetune(tiny(tmp_path / "halves", nfe=(2,), resume=True), digits, cpu)
    assert_bit_identical(tmp_path / "straight" / "finetune-nfe2.pt", tmp_path / "halves" / "finetune-nfe2.pt",
                         ["model", "ema", "optimizer", "batches", "rng"])


def test_resume_after_a_crash_logs_every_step_once(tmp_path, digits, monkeypatch):
    """A run that dies after logging past its last checkpoint must not leave those rows twice."""
    cpu = torch.device("cpu")
    calls, real_loss = [], toy_training.diffusion_loss
    def crash_in_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return real_loss(*args, **kwargs)
    monkeypatch.setattr(toy_training, "diffusion_loss", crash_in_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        toy_training.pretrain(tiny(tmp_path, pretrain_steps=6, save_every=3), digits, cpu)
    assert load_checkpoint(tmp_path / "pretrain.pt")["step"] == 3  # steps 1-4 logged, 3 saved
    monkeypatch.setattr(toy_training, "diffusion_loss", real_loss)
    toy_training.pretrain(tiny(tmp_path, pretrain_steps=6, save_every=3, resume=True), digits, cpu)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["stage"] == "pretrain"] == [1, 2, 3, 4, 5, 6]


# --- data -------------------------------------------------------------------------------------


def write_fake_cifar10(root, per_batch=4):
    """The python-pickle layout of CIFAR-10 with a few images per batch; image i of batch b has
    every pixel of channel c equal to 10 b + c, and label (b + i) % 10."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = np.repeat(np.array([10 * b, 10 * b + 1, 10 * b + 2], dtype=np.uint8), 1024)[None].repeat(per_batch, 0)
        with open(folder / name, "wb") as file:
            pickle.dump({"data": data, "labels": [(b + i) % 10 for i in range(per_batch)]}, file)


def test_cifar10_loader_reads_a_fake_cifar_format_folder(tmp_path):
    write_fake_cifar10(tmp_path)
    data = toy_training.build_dataset(Config(dataset="cifar10", data_dir=str(tmp_path), download=False))
    assert data.train_images.shape == (20, 3, 32, 32) and data.test_images.shape == (4, 3, 32, 32)
    assert data.train_labels.tolist()[:6] == [0, 1, 2, 3, 1, 2]
    # batch 2, image 0, channel 1 holds 21 everywhere -> 21 / 255 * 2 - 1 in [-1, 1]
    assert torch.allclose(data.train_images[8, 1], torch.full((32, 32), 21 / 255 * 2 - 1))
    assert torch.allclose(data.test_images[:, 2], torch.full((4, 32, 32), 52 / 255 * 2 - 1))


def test_missing_cifar10_offline_names_the_archive_and_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz") as error:
        toy_data.load_cifar10(tmp_path, download=False)
    assert str(tmp_path / "cifar-10-batches-py") in str(error.value)


def test_batches_cover_every_example_once_per_epoch():
    batches = toy_training.Batches(10, 3, seed=0)
    epoch = torch.cat([batches.next() for _ in range(3)])
    assert sorted(epoch.tolist()) == sorted(set(epoch.tolist())) and len(epoch) == 9


# --- the offline metric -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier():
    return toy_data.load_metric_classifier()[0]  # the committed instrument


def test_cfd_of_data_against_itself_is_zero(classifier, digits):
    cfd = toy_nets.ClassifierFrechetDistance(classifier, digits.test_images)
    assert abs(cfd(digits.test_images)) < 1e-3


def test_cfd_of_noise_is_far_above_the_train_test_floor_and_symmetric(classifier, digits):
    noise = torch.rand(len(digits.test_images), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    floor = toy_nets.ClassifierFrechetDistance(classifier, digits.test_images)(digits.train_images)
    noise_to_data = toy_nets.ClassifierFrechetDistance(classifier, digits.test_images)(noise)
    data_to_noise = toy_nets.ClassifierFrechetDistance(classifier, noise)(digits.test_images)
    assert noise_to_data > 20 * floor > 0
    assert data_to_noise == pytest.approx(noise_to_data, rel=1e-4)


def test_a_retrained_metric_classifier_is_read_back_from_its_cache(digits, tmp_path):
    config = Config(out_dir=str(tmp_path), classifier_epochs=1, metric_classifier="retrain")
    toy_training.metric_classifier(config, digits, torch.device("cpu"))
    cached = torch.load(tmp_path / "classifier.pt", weights_only=True)
    cached["model"]["head.bias"] += 100.0  # a mark that no training could have made
    torch.save(cached, tmp_path / "classifier.pt")
    again, _ = toy_training.metric_classifier(config, digits, torch.device("cpu"))
    assert torch.equal(again.head.bias, cached["model"]["head.bias"])


def test_committed_metric_classifier_is_the_pinned_file_and_classifies_digits(digits):
    classifier, record = toy_data.load_metric_classifier()
    assert record["sha256"] == toy_data.METRIC_CLASSIFIER_SHA256 == toy_data.sha256(toy_data.METRIC_CLASSIFIER)
    accuracy = toy_data.classifier_accuracy(classifier, digits.test_images, digits.test_labels)
    assert accuracy > 0.9
    # the accuracy recorded when it was trained; one image more or less is the most a CPU's arithmetic can flip here
    assert abs(accuracy - record["test_accuracy"]) <= 1 / len(digits.test_labels)


@pytest.mark.parametrize("damage", ["missing", "truncated", "other_shape", "not_a_classifier"])
def test_a_bad_metric_classifier_file_fails_in_one_line_naming_it_and_the_rebuild(tmp_path, damage):
    path = tmp_path / "classifier.pt"
    if damage == "truncated":
        path.write_bytes(toy_data.METRIC_CLASSIFIER.read_bytes()[:5000])
    elif damage == "other_shape":
        torch.save({"model": toy_nets.Classifier(1, 10, width=8).state_dict()}, path)
    elif damage == "not_a_classifier":
        torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(UsageError) as error:
        toy_data.load_metric_classifier(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and f"--rebuild-metric-classifier --out {path}" in message


def test_a_changed_committed_instrument_is_refused(monkeypatch, tmp_path):
    copy = tmp_path / "digits-classifier.pt"
    copy.write_bytes(toy_data.METRIC_CLASSIFIER.read_bytes() + b"\0")  # loads fine, but is not the pinned file
    monkeypatch.setattr(toy_data, "METRIC_CLASSIFIER", copy)
    with pytest.raises(UsageError, match="sha256 .* is not the committed instrument's"):
        toy_data.load_metric_classifier()


def test_a_retrained_metric_classifier_is_a_function_of_the_seed_not_of_the_global_random_state(digits, tmp_path):
    weights = []
    for run, global_seed in enumerate((123, 456)):
        torch.manual_seed(global_seed)  # whatever ran before the metric
        config = Config(out_dir=str(tmp_path / str(run)), classifier_epochs=1, seed=7, metric_classifier="retrain")
        weights.append(toy_training.metric_classifier(config, digits, torch.device("cpu"))[0].state_dict())
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_validation_split_is_carved_from_the_train_split_stratified_and_leaves_the_test_split_alone(digits):
    split = toy_training.build_dataset(Config(eval_split="validation"))
    assert len(split.train_images) + len(split.test_images) == len(digits.train_images)
    assert len(split.test_images) == math.ceil(toy_data.VALIDATION_FRACTION * len(digits.train_images))  # as sklearn
    rows = lambda images: {tuple(image.flatten().tolist()) for image in images}  # noqa: E731
    assert rows(split.train_images) | rows(split.test_images) == rows(digits.train_images)
    assert set(split.test_labels.tolist()) == set(range(10))
    assert torch.equal(toy_training.build_dataset(Config()).test_images, digits.test_images)
    row = {"model": "base, DDIM", "nfe": 4, "cfd": 9.0, "pixel_energy": 0.03, "precision": 0.9, "recall": 0.8}
    table = toy_training.results_table([row], split, None, "validation")  # the table names what it measured against
    assert f"against the validation split ({len(split.test_images)} images)" in table and "test split" not in table


def test_verdict_rule_needs_distance_pixel_and_recall_together():
    base = {"cfd": 10.0, "pixel_energy": 0.02, "recall": 0.9}
    assert toy_nets.verdict({"cfd": 8.0, "pixel_energy": 0.02, "recall": 0.88}, base)["beats"]
    assert not toy_nets.verdict({"cfd": 5.0, "pixel_energy": 0.01, "recall": 0.3}, base)["beats"]  # modes dropped
    assert not toy_nets.verdict({"cfd": 8.0, "pixel_energy": 0.03, "recall": 0.9}, base)["beats"]  # pixels worse
    assert not toy_nets.verdict({"cfd": 9.5, "pixel_energy": 0.01, "recall": 0.9}, base)["beats"]  # a tie on CFD
    ring = toy_nets.verdict({"energy": 0.5, "recall": 1.0}, {"energy": 1.0, "recall": 1.0}, "energy")
    assert ring["beats"] and "pixel_ratio" not in ring


def test_pixel_energy_distance_is_zero_on_itself_and_grows_with_a_shift(digits):
    images = digits.test_images
    assert toy_nets.energy_distance(images, images) == pytest.approx(0.0, abs=1e-9)
    near, far = (toy_nets.energy_distance(images + shift, images) for shift in (0.1, 0.5))
    assert 0 < near < far
    assert toy_nets.energy_distance(images, digits.train_images) < near  # the train/test floor is below a 0.1 shift


def test_precision_and_recall_separate_fidelity_from_mode_dropping(digits):
    real, fakes = digits.test_images, digits.train_images
    full = toy_nets.precision_recall(real, fakes)
    ones = toy_nets.precision_recall(real, fakes[digits.train_labels == 1])  # one mode of ten: faithful, not diverse
    noise = toy_nets.precision_recall(real, torch.rand_like(fakes) * 2 - 1)
    assert full["precision"] > 0.6 and full["recall"] > 0.6
    assert ones["precision"] > 0.6 and ones["recall"] < 0.3
    assert noise["precision"] < 0.05


def test_inception_fid_without_weights_names_the_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=train_utils.INCEPTION_WEIGHTS) as error:
        toy_nets.inception_fid(torch.zeros(4, 3, 32, 32), tmp_path)
    assert str(tmp_path / "hub" / "checkpoints") in str(error.value)


# --- clear errors -----------------------------------------------------------------------------


def test_finetune_without_a_pretrained_checkpoint_says_which_file_and_what_to_run(tmp_path, digits):
    with pytest.raises(UsageError, match="--stage pretrain") as error:
        toy_training.finetune(tiny(tmp_path), digits, torch.device("cpu"))
    assert str(tmp_path / "pretrain.pt") in str(error.value)


def test_checkpoint_from_another_config_is_refused_naming_the_differing_fields(tmp_path, digits):
    toy_training.pretrain(tiny(tmp_path), digits, torch.device("cpu"))
    with pytest.raises(UsageError, match=r"--model-channels: checkpoint 8 vs now 16.*--num-res-blocks"):
        toy_training.finetune(tiny(tmp_path, model_channels=16, num_res_blocks=2), digits, torch.device("cpu"))
    with pytest.raises(UsageError, match="--class-conditional"):
        toy_training.pretrain(tiny(tmp_path, class_conditional=False, resume=True), digits, torch.device("cpu"))


def test_existing_run_is_not_overwritten_without_resume(tmp_path, digits):
    toy_training.pretrain(tiny(tmp_path), digits, torch.device("cpu"))
    with pytest.raises(UsageError, match="--resume"):
        toy_training.pretrain(tiny(tmp_path), digits, torch.device("cpu"))


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, digits, monkeypatch):
    calls, real_loss = [], toy_training.diffusion_loss
    def nan_from_step_3(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 3 else loss
    monkeypatch.setattr(toy_training, "diffusion_loss", nan_from_step_3)
    with pytest.raises(FloatingPointError, match="step 3"):
        toy_training.pretrain(tiny(tmp_path, save_every=2), digits, torch.device("cpu"))
    checkpoint = load_checkpoint(tmp_path / "pretrain.pt")
    assert checkpoint["step"] == 2
    assert all(torch.isfinite(tensor).all() for tensor in checkpoint["model"].values())


def test_main_turns_errors_into_one_clear_message_and_exit_status(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        toy_training.main(["--stage", "eval", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"error: no pretrain checkpoint at {tmp_path / 'pretrain.pt'}" in capsys.readouterr().err


def test_ctrl_c_exits_with_status_130_and_says_how_to_continue(tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt("pretrain interrupted at step 7; saved x.pt. Continue with the same command plus --resume.")
    monkeypatch.setattr(toy_training, "pretrain", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        toy_training.main(["--stage", "pretrain", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 130
    assert "plus --resume" in capsys.readouterr().err


def test_unknown_dataset_or_option_lists_the_valid_choices(capsys):
    with pytest.raises(ValueError, match="dataset: got 'mnist', need one of 'digits', 'cifar10'"):
        Config(dataset="mnist")
    with pytest.raises(UsageError) as error:
        toy_training.parse_config(["--coupling", "nearest"])
    assert "--coupling: invalid choice: 'nearest'" in str(error.value)
    assert all(name in str(error.value) for name in ("independent", "inversion", "teacher"))
    with pytest.raises(UsageError, match="unrecognized arguments: --learning-rat"):
        toy_training.parse_config(["--learning-rat", "1"])


def test_help_explains_every_flag_and_cifar10_preset_fills_unset_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        toy_training.parse_config(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    flags = [name for name in Config.__dataclass_fields__ if name != "e2e"] + sorted(METHOD_FIELDS - {"num_steps"})
    for name in flags:
        assert "--" + name.replace("_", "-") in text
    assert "--num-steps" not in text  # the toy's T comes from --nfe
    config = toy_training.parse_config(["--dataset", "cifar10", "--model-channels", "96"])
    assert (config.model_channels, config.num_res_blocks, config.out_dir) == (96, 2, "runs/toy-cifar10")
