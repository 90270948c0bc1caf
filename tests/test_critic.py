"""The adversarial term can act: its critics learn (held-out AUC), the critic's warm-up trains it alone, and the
controls that guard every table: a fine-tune at a vanishing learning rate reproduces its start model's row.

    pytest tests/test_critic.py      # about 30 s on 2 CPU cores
"""
import copy
import json
import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

import critics
import e2ediff
import toy_data
import toy_training
import train_utils
from toy_training import Config

CRITIC_STEPS = 150  # a fixed budget: batch 32, lr 1e-3 (the probes: a PatchGAN at AUC 0.96 after 100)
LEARNS = 0.9  # held-out AUC a critic must reach against the base's 4-step samples within CRITIC_STEPS
CHANCE_WIDTH = 0.1  # |AUC - 0.5| when fake = real: ~3 standard errors at 180 samples a side


@pytest.fixture(scope="module")
def base(tmp_path_factory, digits):
    """A small diffusion base (digits, 400 steps) whose 4-step DDIM samples are blurred digits, and its config."""
    config = train_utils.make_config(Config, out_dir=str(tmp_path_factory.mktemp("critic-base")), model_channels=16,
                                     pretrain_steps=400, pretrain_batch_size=64, log_every=10**6, save_every=10**6)
    toy_training.pretrain(config, digits, torch.device("cpu"))
    return toy_training.load_base(config, digits, torch.device("cpu")), config


def samples(base, config, digits, labels, seed, nfe=4):
    schedule = toy_training.build_schedule(config, torch.device("cpu"))
    noise = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return e2ediff.unrolled_sample(base, noise, schedule, nfe, prediction_type=config.prediction_type,
                                       update="ddim", cond=labels).clamp(-1, 1)


def critic(kind, base, config, digits):
    """The toy's discriminator of `kind` as train_toy builds it (projection on the labels), and its GANLoss."""
    method = e2ediff.EndToEndConfig(**{**toy_training.TOY_METHOD, "gan_weight": 0.5, "disc_kind": kind})
    if kind == "basefeat":
        schedule = toy_training.build_schedule(config, torch.device("cpu"))
        discriminator = critics.base_feature_discriminator(copy.deepcopy(base), schedule, method, digits.train_images[:1],
                                                          digits.train_labels[:1], digits.num_classes)
    else:
        discriminator = e2ediff.PatchDiscriminator(1, method.disc_channels, method.disc_layers, digits.num_classes)
    return e2ediff.GANLoss(discriminator, method)


def train_critic(gan, real, fake, labels, steps=CRITIC_STEPS, batch=32):
    """`steps` discriminator updates on random batches of (real, fake) pairs that share their labels."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        index = torch.randint(0, len(real), (batch,), generator=generator)
        loss = gan.discriminator_loss(real[index], fake[index], 0, labels[index])["disc"]
        gan.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gan.optimizer.step()


@pytest.mark.parametrize("kind", ["patch", "basefeat"])
def test_critic_tells_held_out_digits_from_the_base_4_step_samples(kind, base, digits):
    model, config = base
    torch.manual_seed(0)
    gan = critic(kind, model, config, digits)
    fake = samples(model, config, digits, digits.train_labels, seed=1)
    train_critic(gan, digits.train_images, fake, digits.train_labels)
    held_out = samples(model, config, digits, digits.test_labels, seed=2)  # new noise: samples it never saw
    labels = gan.labels(digits.test_labels)
    auc = critics.critic_auc(gan.discriminator, digits.test_images, held_out, *labels, *labels)
    assert auc > LEARNS, f"{kind}: held-out AUC {auc:.3f} after {CRITIC_STEPS} critic steps"


@pytest.mark.parametrize("kind", ["patch", "basefeat"])
def test_critic_stays_at_chance_when_fake_is_real(kind, base, digits):
    model, config = base
    torch.manual_seed(0)
    gan = critic(kind, model, config, digits)
    generator, perm = torch.Generator().manual_seed(3), torch.arange(len(digits.train_labels))
    for c in range(digits.num_classes):  # a permutation within each class: "fakes" are the same real digits
        members = (digits.train_labels == c).nonzero().squeeze(1)
        perm[members] = members[torch.randperm(len(members), generator=generator)]
    train_critic(gan, digits.train_images, digits.train_images[perm], digits.train_labels)
    half = len(digits.test_images) // 2  # held out: one half of the test split against the other
    labels_a, labels_b = gan.labels(digits.test_labels[:half]), gan.labels(digits.test_labels[half:2 * half])
    auc = critics.critic_auc(gan.discriminator, digits.test_images[:half], digits.test_images[half:2 * half],
                             *labels_a, *labels_b)
    assert abs(auc - 0.5) < CHANCE_WIDTH, f"{kind}: AUC {auc:.3f} with real digits as fakes"


def test_critic_auc_is_one_for_a_perfect_score_and_a_half_for_a_constant_one():
    class Sign(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)

    real, fake = torch.ones(20, 1, 2, 2), -torch.ones(30, 1, 2, 2)
    assert critics.critic_auc(Sign(), real, fake) == 1.0
    assert critics.critic_auc(Sign(), fake, real) == 0.0
    assert critics.critic_auc(Sign(), real, real.clone()) == 0.5


@pytest.mark.parametrize("scores, auc, n_real, n_fake, within", [
    ("exponential", 0.9, 40, 400, 0.05), ("exponential", 0.6, 400, 40, 0.05), ("exponential", 0.8, 256, 256, 0.05),
    ("binormal", 0.6, 256, 256, 0.1), ("binormal", 0.8, 256, 256, 0.1), ("binormal", 0.9, 256, 256, 0.1)])
def test_auc_standard_error_is_how_far_the_auc_moves_between_held_out_batches(scores, auc, n_real, n_fake, within):
    """4,000 held-out batches of scores at that AUC: the Mann-Whitney AUCs' standard deviation is the formula's.
    Hanley-McNeil's model is exponential scores: there it holds within 2 %, unbalanced batches included (swapping
    the counts is off by 12-46 %); for binormal scores of equal variance, balanced as the toy measures, 2-7 %.
    The simulation's own error is ~1 %."""
    generator = np.random.default_rng(0)
    if scores == "exponential":  # P(real > fake) = scale / (scale + 1)
        real, fake = generator.exponential(auc / (1 - auc), (4000, n_real)), generator.exponential(1, (4000, n_fake))
    else:  # P(real > fake) = Phi(shift / sqrt 2)
        real = generator.normal(math.sqrt(2) * NormalDist().inv_cdf(auc), 1, (4000, n_real))
        fake = generator.normal(0, 1, (4000, n_fake))
    ranks = np.concatenate([real, fake], axis=1).argsort(axis=1).argsort(axis=1) + 1
    aucs = (ranks[:, :n_real].sum(axis=1) - n_real * (n_real + 1) / 2) / (n_real * n_fake)
    assert abs(aucs.mean() - auc) < 0.003
    assert aucs.std() == pytest.approx(critics.auc_standard_error(auc, n_real, n_fake), rel=within)


# --- the critic's warm-up -------------------------------------------------------------------------


def warmup_setup(warmup_steps):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 1, 3, padding=1))

    class Denoiser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, z, t, cond=None):
            return self.net(z)

    denoiser = Denoiser()
    config = e2ediff.EndToEndConfig(num_steps=2, update="ddim", lpips_weight=0.0, gan_weight=0.5, gan_adaptive=False,
                                    critic_warmup_steps=warmup_steps, disc_layers=1, disc_channels=8, disc_steps=2,
                                    grad_checkpoint=False)
    gan = e2ediff.GANLoss(e2ediff.PatchDiscriminator(1, 8, 1), config)
    loss_fn = e2ediff.EndToEndLoss(denoiser, e2ediff.make_schedule("linear", zero_terminal_snr=True), config, gan=gan)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=1e-2)
    return denoiser, loss_fn, optimizer, e2ediff.EMA(denoiser, 0.5), gan


def test_critic_warmup_trains_the_discriminator_alone_then_the_generator_sees_the_gan_term():
    denoiser, loss_fn, optimizer, ema, gan = warmup_setup(warmup_steps=2)
    batch = [{"target": torch.rand(4, 1, 8, 8) * 2 - 1}]
    weights = copy.deepcopy(denoiser.state_dict())
    critic_weights = copy.deepcopy(gan.discriminator.state_dict())
    for step in range(2):
        logs = e2ediff.train_step(loss_fn, optimizer, ema, batch, step, gan=gan)
        assert logs["critic_warmup"] == 1.0 and "loss" not in logs and "disc" in logs
    assert all(torch.equal(weights[k], v) for k, v in denoiser.state_dict().items())  # the generator is frozen
    assert all(torch.equal(weights[k], v) for k, v in ema.module.state_dict().items())  # and so is its EMA
    assert not all(torch.equal(critic_weights[k], v) for k, v in gan.discriminator.state_dict().items())
    assert len(gan.optimizer.state[next(gan.discriminator.parameters())]) and \
        gan.optimizer.state[next(gan.discriminator.parameters())]["step"] == 4  # disc_steps = 2 updates a step
    logs = e2ediff.train_step(loss_fn, optimizer, ema, batch, 2, gan=gan)
    assert "gan" in logs and "critic_warmup" not in logs
    assert not all(torch.equal(weights[k], v) for k, v in denoiser.state_dict().items())


# --- the toy script: AUC logged, recorded; identity controls ----------------------------------------


def tiny(out_dir, **overrides):
    settings = dict(out_dir=str(out_dir), model_channels=8, pretrain_steps=6, pretrain_batch_size=32, warmup_steps=2,
                    finetune_steps=4, finetune_batch_size=16, nfe=(2,), base_nfe=(2,), inversion_steps=4,
                    eval_samples=100, eval_batch_size=100, log_every=2, save_every=100, distill_steps=3)
    return [f"--{key.replace('_', '-')}={','.join(map(str, value)) if isinstance(value, tuple) else value}"
            for key, value in {**settings, **overrides}.items()]


def test_gan_fine_tune_logs_the_critic_auc_and_records_it_after_the_warmup_and_at_the_end(tmp_path):
    toy_training.main(tiny(tmp_path, gan_weight=0.5, critic_warmup_steps=2))
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    finetune = [row for row in log if row.get("stage", "").startswith("finetune")]
    assert [row["step"] for row in finetune] == [2, 4] and all(0 <= row["critic_auc"] <= 1 for row in finetune)
    assert finetune[0]["critic_warmup"] == 1.0 and "loss" not in finetune[0] and "loss" in finetune[1]
    e2e = next(row for row in json.loads((tmp_path / "results.json").read_text())["rows"] if row["model"].startswith("E2E"))
    assert (e2e["critic_auc_warmup"], e2e["critic_auc"]) == (finetune[0]["critic_auc"], finetune[1]["critic_auc"])


@pytest.mark.parametrize("base", ["diffusion", "lcm"])
def test_a_fine_tune_at_a_vanishing_learning_rate_reproduces_its_start_models_row(tmp_path, base):
    """The control behind every table: at lr 1e-12 a weight moves by ~1e-12 at most (those initialised at zero; the
    rest not at all, below float32's resolution), so the fine-tuned row must equal the row of the model it started
    from in every column, to 1e-9: a harness that evaluates another model, other noise or another split moves
    them by percents."""
    toy_training.main(tiny(tmp_path, base=base, finetune_lr=1e-12, gan_weight=0.5))
    rows = {(row["model"], row["nfe"]): row for row in json.loads((tmp_path / "results.json").read_text())["rows"]}
    start = rows["base, DDIM" if base == "diffusion" else "LCM (distilled)", 2]
    tuned = rows["E2E fine-tuned" if base == "diffusion" else "E2E from LCM", 2]
    for column in ("cfd", "pixel_energy", "precision", "recall", "hf_ratio"):
        assert tuned[column] == pytest.approx(start[column], rel=1e-9, abs=1e-12), column
    assert toy_data.METRIC_CLASSIFIER.name in json.loads((tmp_path / "results.json").read_text())["metric_classifier"]["path"]
