"""Tests of adaptive_destruction.py and benchmarks/destruction.py: the targets' log Z and exact samples,
the kernels, the objectives on a sampler that is exact by construction, the bounds, a stabilised
learned run, the benchmark's output contract, and its --spread mode (each subprocess gets the plan's config;
every metric and ratio recorded under each CPU setting).

    OMP_NUM_THREADS=1 python -m pytest -q related/tests/test_destruction.py      # about 40 s on 2 CPU cores
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from related import adaptive_destruction as ad
from related.benchmarks import destruction as benchmark
from train_utils import command_line, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def grid_log_Z(target: ad.Target, low: float, high: float, points: int = 1201) -> float:
    """log of the integral of R over a 2D square, by the trapezoid rule (float64)."""
    axis = torch.linspace(low, high, points, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    values = torch.exp(target.log_reward(grid)).reshape(points, points)
    return math.log(float(torch.trapezoid(torch.trapezoid(values, axis), axis)))


@pytest.mark.parametrize("name, low, high", [("gmm25", -14.0, 14.0), ("ring8", -1.6, 1.6)])
def test_mixture_log_Z_by_quadrature(name, low, high):
    target = ad.make_target(name)
    assert grid_log_Z(target, low, high) == pytest.approx(target.log_Z, abs=1e-4)


def test_many_well_closed_form_log_Z_by_quadrature():
    x1 = torch.linspace(-4.0, 4.0, 80001, dtype=torch.float64)
    Z1 = float(torch.trapezoid(torch.exp(ad.many_well_x1_log_density(x1)), x1))
    assert Z1 == pytest.approx(ad.MANY_WELL_Z1, rel=1e-8)
    pair = ad.many_well(dim=2)  # one (x1, x2) pair in 2D, integrated on a grid, against the closed form
    assert grid_log_Z(pair, -5.0, 5.0, points=2001) == pytest.approx(pair.log_Z, abs=1e-4)
    assert ad.many_well().log_Z == pytest.approx(16 * (math.log(ad.MANY_WELL_Z1) + 0.5 * math.log(2 * math.pi)))


def test_funnel_log_Z_by_importance_sampling():
    """log Z = log E_q[R / q] with q the funnel but with its inner variance doubled (bounded weights)."""
    target = ad.make_target("funnel")
    generator = torch.Generator().manual_seed(0)
    head = 3.0 * torch.randn(200_000, 1, generator=generator, dtype=torch.float64)
    rest = torch.exp(0.5 * head) * math.sqrt(2.0) * torch.randn(200_000, 9, generator=generator, dtype=torch.float64)
    log_q = (-0.5 * head.squeeze(1) ** 2 / 9 - math.log(3.0) - 0.5 * math.log(2 * math.pi)
             - 0.5 * (rest ** 2).sum(1) * torch.exp(-head.squeeze(1)) / 2 - 4.5 * (head.squeeze(1) + math.log(4 * math.pi)))
    log_w = target.log_reward(torch.cat([head, rest], 1)) - log_q
    assert ad.logmeanexp(log_w) == pytest.approx(0.0, abs=0.03)


def test_exact_samples_match_their_densities():
    generator = torch.Generator().manual_seed(1)
    funnel = ad.make_target("funnel").sample(100_000, generator)
    assert float(funnel[:, 0].std()) == pytest.approx(3.0, rel=0.02)
    assert float((funnel[:, 1:] * torch.exp(-0.5 * funnel[:, :1])).std()) == pytest.approx(1.0, rel=0.02)
    wells = ad.make_target("many_well").sample(20_000, generator).double()
    x1 = torch.linspace(-4.0, 4.0, 80001, dtype=torch.float64)
    density = torch.exp(ad.many_well_x1_log_density(x1))
    mean_x1 = float(torch.trapezoid(x1 * density, x1) / torch.trapezoid(density, x1))
    assert float(wells[:, 0::2].mean()) == pytest.approx(mean_x1, abs=0.02)
    assert float(wells[:, 1::2].std()) == pytest.approx(1.0, rel=0.02)
    gmm = ad.make_target("gmm25")
    assert ad.modes_covered(gmm.sample(5000, generator), gmm.means, gmm.mode_std) == 25


def test_gaussian_log_prob_matches_torch_distributions():
    generator = torch.Generator().manual_seed(2)
    x, mean, log_var = (torch.randn(7, 3, 4, generator=generator) for _ in range(3))
    expected = torch.distributions.Normal(mean, torch.exp(0.5 * log_var)).log_prob(x).sum(-1)
    torch.testing.assert_close(ad.gaussian_log_prob(x, mean, log_var), expected)


def test_brownian_bridge_is_the_posterior_of_brownian_motion():
    """W_{t_i} | W_{t_{i+1}} for W_t ~ N(0, sigma^2 t): mean t_i/t_{i+1} x, variance sigma^2 t_i (t_{i+1}-t_i)/t_{i+1}."""
    x_next = torch.tensor([[2.0, -1.0]])
    mean, log_var = ad.brownian_bridge(x_next, torch.tensor([3]), num_steps=5, noise_scale=4.0)
    t_i, t_next = 3 / 5, 4 / 5
    torch.testing.assert_close(mean, x_next * t_i / t_next)
    torch.testing.assert_close(log_var.exp(), torch.full((1, 2), 4.0 * t_i * (t_next - t_i) / t_next))


def exact_gaussian_problem(num_steps=5, destruction="fixed"):
    """A sampler that is exact by construction: zero drift and unit variance make p_F Brownian motion, so
    x_T ~ N(0, sigma^2 I), and the bridge is its exact time reversal. Target R = unnormalised N(0, sigma^2 I)."""
    sigma2, dim = 2.0, 3
    target = ad.Target("gauss", dim, lambda x: -0.5 * x.pow(2).sum(1) / sigma2,
                       lambda n, g: math.sqrt(sigma2) * torch.randn(n, dim, generator=g), 0.5 * dim * math.log(2 * math.pi * sigma2),
                       sigma2)
    torch.manual_seed(0)
    sampler = ad.DiffusionSampler(dim, num_steps, sigma2, destruction)  # heads are zero-initialised
    with torch.no_grad():
        sampler.log_Z.fill_(target.log_Z)
    return sampler, target


@pytest.mark.parametrize("destruction", ["fixed", "learned"])
def test_balance_losses_vanish_for_an_exact_sampler(destruction):
    sampler, target = exact_gaussian_problem(destruction=destruction)
    path = ad.sample_generation(sampler, 512, torch.Generator().manual_seed(3))
    log_probs = ad.path_log_probs(sampler, path)
    for objective in ad.OBJECTIVES.values():
        loss = objective(sampler.log_Z, log_probs["log_pF"], log_probs["log_pB"], target.log_reward(path[-1]))
        assert loss.shape == (512,) and float(loss.detach().max()) < 1e-8
    metrics = ad.evaluate(sampler, target, 512, seed=4)
    for key in ("elbo", "eubo", "log_Z_hat"):
        assert metrics[key] == pytest.approx(target.log_Z, abs=1e-4)


def test_trajectory_balance_is_positive_with_a_wrong_log_Z():
    sampler, target = exact_gaussian_problem()
    path = ad.sample_generation(sampler, 64, torch.Generator().manual_seed(5))
    log_probs = ad.path_log_probs(sampler, path)
    loss = ad.trajectory_balance(sampler.log_Z + 0.5, log_probs["log_pF"], log_probs["log_pB"], target.log_reward(path[-1]))
    torch.testing.assert_close(loss, torch.full((64,), 0.25), atol=1e-5, rtol=0)


def test_bounds_sandwich_log_Z_for_an_untrained_sampler():
    """ELBO <= log Z <= EUBO for any sampler (Jensen), by far more than the Monte Carlo error on GMM25."""
    target = ad.make_target("gmm25")
    torch.manual_seed(0)
    sampler = ad.DiffusionSampler(2, 5, target.noise_scale, "learned")
    metrics = ad.evaluate(sampler, target, 2000, seed=6)
    assert metrics["elbo"] < target.log_Z - 1.0 and metrics["eubo"] > target.log_Z + 1.0
    assert metrics["gap"] == pytest.approx(metrics["eubo"] - metrics["elbo"])


def test_learned_destruction_starts_as_the_brownian_bridge():
    torch.manual_seed(0)
    fixed, learned = ad.DiffusionSampler(2, 5, 5.0, "fixed"), ad.DiffusionSampler(2, 5, 5.0, "learned")
    learned.load_state_dict(fixed.state_dict())
    path = ad.sample_generation(fixed, 16, torch.Generator().manual_seed(7))
    torch.testing.assert_close(ad.path_log_probs(fixed, path)["log_pB"], ad.path_log_probs(learned, path)["log_pB"])


def test_replay_buffer_prefers_high_reward_states():
    buffer = ad.ReplayBuffer(capacity=100)
    buffer.add(torch.arange(150.0)[:, None], torch.arange(150.0))  # only the last 100 are kept: 50..149
    assert len(buffer) == 100 and float(buffer.states.min()) == 50.0
    drawn = buffer.sample(20_000, torch.Generator().manual_seed(8)).squeeze(1)
    assert float(drawn.min()) >= 50.0 and float((drawn >= 140).float().mean()) > 0.5


def test_stabilised_learned_run_stays_finite_and_improves():
    config = ad.SamplerConfig(target="gmm25", num_steps=5, destruction="learned", iterations=150, eval_every=150,
                              batch_size=128, eval_samples=256, final_samples=512, distance_samples=256)
    _, record = ad.train(config)
    first, last = record["curve"][0], record["curve"][-1]
    assert not record["diverged"]
    assert all(math.isfinite(record["final"][key]) for key in ("elbo", "eubo", "log_Z_hat", "w1"))
    assert last["gap"] < 0.7 * first["gap"]


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="target"):
        ad.SamplerConfig(target="moons")
    with pytest.raises(ValueError, match="num_steps"):
        ad.SamplerConfig(num_steps=1)
    with pytest.raises(ValueError, match="target_decay"):
        ad.SamplerConfig(target_decay=1.0)


@pytest.mark.slow
def test_benchmark_quick_prints_finite_headline_and_writes_results(tmp_path):
    completed = subprocess.run([sys.executable, os.path.join(ROOT, "related", "benchmarks", "destruction.py"), "--quick", "--out",
                                str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    headline = json.loads(completed.stdout.strip().splitlines()[-1])
    keys = [f"{target}/{key}" for target in ad.TARGETS
            for key in ("gap_learned5_vs_fixed5", "gap_learned5_vs_fixed20", "logz_error_learned5")]
    assert set(keys) <= set(headline) and all(math.isfinite(headline[key]) for key in keys)
    record = json.loads((tmp_path / "destruction-quick.json").read_text())
    assert {key: round(value, 4) for key, value in record["headline"].items()} == headline
    assert (tmp_path / "destruction-quick.png").is_file()


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_spread_hands_each_subprocess_the_plans_config(mode):
    plan = benchmark.PLANS[mode]
    run = {**{key: plan[key] for key in benchmark.RUN_SETTINGS if key in plan},
           "target": "funnel", "destruction": "learned", "num_steps": 20, "seed": 0}
    assert parse_config(ad.SamplerConfig, command_line(run)) == ad.SamplerConfig(**run)


@pytest.mark.slow
def test_spread_quick_records_every_metric_and_ratio_under_two_cpu_settings(tmp_path):
    completed = subprocess.run([sys.executable, os.path.join(ROOT, "related", "benchmarks", "destruction.py"), "--spread",
                                "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    record = json.loads((tmp_path / "destruction-spread-quick.json").read_text())
    assert len(record["settings"]) == 2 and record["config"]["iterations"] == benchmark.PLANS["quick"]["iterations"]
    assert set(record["runs"]) == {f"gmm25/{destruction}/T{steps}" for destruction, steps in benchmark.SPREAD_RUNS}
    assert set(record["ratios"]) == {"gmm25/gap_learned5_vs_fixed5", "gmm25/gap_learned5_vs_fixed20"}
    entries = [*record["ratios"].values(), *(entry for run in record["runs"].values() for entry in run.values())]
    assert all(len(entry["values"]) == 2 and 0 <= entry["relative"] <= 1 for entry in entries)
    for name in record["settings"]:  # a ratio is made of the runs recorded beside it
        gaps = {key: run["gap"]["values"][name] for key, run in record["runs"].items()}
        assert record["ratios"]["gmm25/gap_learned5_vs_fixed5"]["values"][name] == pytest.approx(
            gaps["gmm25/learned/T5"] / gaps["gmm25/fixed/T5"])
