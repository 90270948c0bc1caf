"""Tests of dsd.py (Diffusion as Self-Distillation at toy scale) and its benchmark's output contract.

    python -m pytest -q related/tests/test_dsd.py      # under a minute on 2 CPU cores

They prove: one network holds every role; DSD's target latent gets no gradient while the naive loss
sends its gradient into the encoder through the target; the effective rank is right on known spectra;
a short naive run shrinks the latents while DSD's does not; the two-stage baseline has twice the
parameters; the end-to-end fine-tune trains the sampler and the decoder; the metric is the committed
instrument whatever the random state; the --quick benchmark writes its JSON and plot and prints the headline
last; --spread hands each subprocess the plan's config and records every column under each CPU setting.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from related import dsd
from related.benchmarks import dsd as dsd_benchmark
from train_utils import command_line, parse_config
import e2ediff
import toy_data
from toy_nets import ClassifierFrechetDistance

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(digits):  # the session's digits (conftest.py)
    return digits


@pytest.fixture(scope="module")
def images(data):
    return data.train_images


def test_every_hidden_layer_serves_every_role_and_the_output_rows_split_by_slot():
    torch.manual_seed(0)
    network = dsd.OneNetwork(latent_dim=8, hidden=32, depth=2)
    images, latent, t = torch.randn(4, 1, 8, 8), torch.randn(4, 8), torch.randint(0, 1000, (4,))
    outputs = {"encode": lambda: network.encode(images), "decode": lambda: network.decode(latent),
               "denoise": lambda: network(latent, t)}
    last = network.net[-1].weight  # (64 + 8, hidden): pixel rows, then latent rows
    for role, output in outputs.items():
        network.zero_grad(set_to_none=True)
        output().pow(2).sum().backward()
        hidden = [p for p in network.net[:-1].parameters()]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hidden), role
        pixel_rows, latent_rows = last.grad[:64].abs().sum(), last.grad[64:].abs().sum()
        assert (pixel_rows > 0) == (role == "decode") and (latent_rows > 0) == (role != "decode"), role
    assert sum(p.numel() for p in network.parameters()) == sum(p.numel() for p in network.net.parameters())


class ZeroVelocity(torch.nn.Module):
    """A denoiser that ignores its input: v_hat = 0, so x0_hat = alpha z_t."""

    def forward(self, z_t, t, cond=None):
        return torch.zeros_like(z_t)


def replayed_noise(seed, shape, schedule):
    """The (alpha, sigma, eps) that a generator seeded `seed` gives diffusion_loss / self_distillation_loss."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.randint(0, schedule.num_train_timesteps, (shape[0],), generator=generator)
    eps = torch.randn(shape, generator=generator)
    return schedule.alpha(t)[:, None], schedule.sigma(t)[:, None], eps


def test_dsd_target_gets_no_gradient_while_naive_sends_its_gradient_through_the_target():
    schedule, d = dsd.build_schedule(), 8
    z = torch.randn(16, d, requires_grad=True)
    alpha, sigma, eps = replayed_noise(3, z.shape, schedule)
    # DSD: loss = mean (alpha^2 z + alpha sigma eps - sg(z))^2; only the online view alpha z_t carries gradient
    dsd.self_distillation_loss(ZeroVelocity(), z, schedule, torch.Generator().manual_seed(3)).sum().backward()
    residual = alpha**2 * z + alpha * sigma * eps - z
    online_only = 2 / d * residual * alpha**2
    both_views = 2 / d * residual * (alpha**2 - 1)
    assert torch.allclose(z.grad, online_only.detach(), atol=1e-6)
    assert not torch.allclose(z.grad, both_views.detach(), atol=1e-3)
    # naive L_v: the model ignores z_t here, so all of the encoder's gradient comes through the target v = alpha eps - sigma z
    z.grad = None
    e2ediff.diffusion_loss(ZeroVelocity(), z, schedule, generator=torch.Generator().manual_seed(3)).sum().backward()
    through_target = -2 / d * sigma * (alpha * eps - sigma * z)
    assert torch.allclose(z.grad, through_target.detach(), atol=1e-6) and z.grad.abs().sum() > 1


def test_effective_rank_of_known_spectra():
    d = 6
    isotropic = torch.cat([torch.eye(d), -torch.eye(d)])  # centred, all singular values equal
    assert dsd.effective_rank(isotropic) == pytest.approx(d, rel=1e-9)
    line = torch.outer(torch.tensor([1.0, -2.0, 0.5, 0.5]), torch.randn(d))  # centred rows on one line
    assert dsd.effective_rank(line) == pytest.approx(1.0, rel=1e-6)
    two = torch.cat([torch.diag(torch.tensor([3.0, 1.0])), -torch.diag(torch.tensor([3.0, 1.0]))])  # p = (3/4, 1/4)
    assert dsd.effective_rank(two) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=1e-9)
    assert dsd.effective_rank(isotropic + 5.0) == pytest.approx(d, rel=1e-9)  # a shift changes nothing (centred)


def test_short_naive_run_shrinks_the_latents_and_dsd_run_does_not(images):
    config = dsd.Config(steps=300, log_every=300, hidden=128)  # half the width: a third faster, same behaviour
    probe = images[:512]
    naive = dsd.train("naive", config, images, probe).history
    self_distilled = dsd.train("dsd", config, images, probe).history
    assert naive[0]["latent_std"] == pytest.approx(self_distilled[0]["latent_std"])  # the same initial network
    # measured (seed 0): 0.127 at the start -> naive 0.021, DSD 0.34 (the full run ends at 0.028 vs 0.99)
    assert naive[-1]["latent_std"] < 0.5 * naive[0]["latent_std"]
    assert self_distilled[-1]["latent_std"] > 1.5 * naive[0]["latent_std"]
    assert self_distilled[-1]["latent_std"] > 4 * naive[-1]["latent_std"]


def test_two_stage_baseline_has_twice_the_parameters_and_a_frozen_autoencoder(images):
    config = dsd.Config(steps=2, log_every=1, hidden=32)
    two_stage = dsd.train("two_stage", config, images, images[:64])
    one = dsd.train("dsd", config, images, images[:64])
    assert two_stage.autoencoder is not two_stage.denoiser and one.autoencoder is one.denoiser
    assert two_stage.parameters == 2 * one.parameters
    assert not any(p.requires_grad for p in two_stage.autoencoder.parameters())


def test_end_to_end_loss_trains_the_sampler_and_the_decoder(images):
    torch.manual_seed(0)
    network = dsd.OneNetwork(hidden=64, depth=2)
    schedule, images = dsd.build_schedule(), images[:64]
    config = e2ediff.EndToEndConfig(num_steps=2, update="ddim", coupling="inversion", lpips_weight=0.0, grad_checkpoint=False)
    loss_fn = dsd.DecodedEndToEndLoss(network, schedule, config)
    optimizer = torch.optim.AdamW(network.parameters(), lr=3e-3)
    z_T = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    batch = {"target": torch.zeros(64, 8), "z_T": z_T, "images": images}
    loss, _, decoded, _ = loss_fn(z_T, batch["target"], 0, target_image=images)
    loss.backward()
    last = network.net[-1].weight.grad
    assert last[:64].abs().sum() > 0 and last[64:].abs().sum() > 0  # the decoder's rows and the denoiser's rows
    assert decoded.shape == images.shape
    optimizer.zero_grad(set_to_none=True)
    logs = [e2ediff.train_step(loss_fn, optimizer, e2ediff.EMA(network, 0.0), [batch], step)["loss"] for step in range(30)]
    assert logs[-1] < 0.5 * logs[0]


def test_metric_is_the_committed_instrument_whatever_the_global_random_state(data):
    classifier, _ = toy_data.load_metric_classifier()
    direct = ClassifierFrechetDistance(classifier, data.test_images)(data.train_images[:200])
    scores = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # what earlier trainings leave behind differs from seed to seed
        scores.append(dsd.Judge(dsd.Config(seed=3), data)(data.train_images[:200])["cfd"])
    assert scores == [direct, direct]


@pytest.mark.slow
def test_benchmark_quick_prints_finite_headline_and_writes_results(tmp_path):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, os.path.join(ROOT, "related", "benchmarks", "dsd.py"), "--quick", "--out", str(tmp_path)],
                               capture_output=True, text=True, timeout=300, cwd=ROOT, env=environment)
    assert completed.returncode == 0, completed.stderr[-3000:]
    headline = json.loads(completed.stdout.strip().splitlines()[-1])
    keys = {"dsd/latent_std_naive_vs_two_stage", "dsd/cfd4_vs_two_stage", "dsd/e2e_cfd4_vs_dsd4"}
    assert keys <= set(headline) and all(math.isfinite(headline[key]) for key in keys)
    assert headline["dsd/params_dsd_vs_two_stage"] == 0.5
    record = json.loads((tmp_path / "dsd-quick.json").read_text())
    assert {key: round(value, 4) for key, value in record["headline"].items()} == headline
    assert (tmp_path / "dsd-quick.png").is_file()


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_spread_hands_each_subprocess_the_plans_config(mode):
    config = dsd_benchmark.PLANS[mode]["config"]
    assert parse_config(dsd.Config, ["--seed", "0", *command_line(config)]) == dsd.Config(seed=0, **config)


@pytest.mark.slow
def test_spread_quick_records_every_column_under_two_cpu_settings(tmp_path):
    completed = subprocess.run([sys.executable, os.path.join(ROOT, "related", "benchmarks", "dsd.py"), "--spread", "--quick",
                                "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    record = json.loads((tmp_path / "dsd-spread-quick.json").read_text())
    assert len(record["settings"]) == 2 and record["config"]["steps"] == dsd_benchmark.PLANS["quick"]["config"]["steps"]
    assert set(record["final"]) == set(dsd_benchmark.MODELS)
    entries = [*(e for row in record["rows"].values() for e in row.values()),
               *(e for row in record["final"].values() for e in row.values())]
    assert all(len(e["values"]) == 2 and 0 <= e["relative"] <= 1 for e in entries)
    assert set(record["headline"]) == {f"dsd-spread/{model}/{column}" for model in dsd_benchmark.MODELS
                                       for column in ("cfd", "energy", *dsd_benchmark.INDICATORS)}
