"""Tests of the core module e2ediff.py. Run: python -m pytest -q tests/test_e2ediff.py"""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import critics
import e2ediff
import perceptual
import toy2d
import train_utils


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# ---------------------------------------------------------------- 1. schedule


def test_linear_schedule_matches_closed_form():
    schedule = e2ediff.make_schedule("linear", 1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(schedule.betas.numpy(), betas, rtol=1e-6)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-5)
    t = torch.tensor([0, 500, 999])
    abar = torch.from_numpy(np.cumprod(1 - betas)[[0, 500, 999]]).float()
    torch.testing.assert_close(schedule.alpha(t), abar.sqrt())
    torch.testing.assert_close(schedule.sigma(t), (1 - abar).sqrt())
    torch.testing.assert_close(schedule.snr(t), abar / (1 - abar))
    assert schedule.betas.dtype == torch.float32 and not schedule.zero_terminal_snr


def test_scaled_linear_and_cosine_schedules_match_closed_form():
    scaled = e2ediff.make_schedule("scaled_linear", 1000)
    assert scaled.betas[0].item() == pytest.approx(0.00085, rel=1e-5)
    assert scaled.betas[-1].item() == pytest.approx(0.012, rel=1e-5)
    assert scaled.betas[500].item() == pytest.approx(np.linspace(0.00085**0.5, 0.012**0.5, 1000)[500] ** 2, rel=1e-5)
    cosine = e2ediff.make_schedule("cosine", 1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 250, 500, 900):  # unclamped region: abar_t = f(t + 1) / f(0)
        assert cosine.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-4)
    assert cosine.betas.max().item() <= 0.999 + 1e-7


@pytest.mark.parametrize("kind", e2ediff.SCHEDULES)
def test_zero_terminal_snr_rescale_zeroes_last_and_keeps_first(kind):
    plain = e2ediff.make_schedule(kind, 1000)
    rescaled = e2ediff.make_schedule(kind, 1000, zero_terminal_snr=True)
    assert rescaled.alphas_cumprod[-1].item() == 0.0 and rescaled.zero_terminal_snr
    assert rescaled.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-6)
    assert torch.all(rescaled.alphas_cumprod[1:] <= rescaled.alphas_cumprod[:-1])


def test_sampling_timesteps_follow_diffusers_conventions():
    assert e2ediff.sampling_timesteps(1000, 4, "trailing").tolist() == [999, 749, 499, 249]
    assert e2ediff.sampling_timesteps(1000, 4, "leading").tolist() == [751, 501, 251, 1]
    assert e2ediff.sampling_timesteps(1000, 4, "linspace").tolist() == [999, 666, 333, 0]
    assert e2ediff.sampling_timesteps(1000, 1, "trailing").tolist() == [999]


LCM_GRID_T1_TO_8 = {  # diffusers' LCMScheduler().set_timesteps(T).timesteps, original_inference_steps 50
    1: [999], 2: [999, 499], 3: [999, 679, 339], 4: [999, 759, 499, 259], 5: [999, 799, 599, 399, 199],
    6: [999, 839, 679, 499, 339, 179], 7: [999, 859, 719, 579, 439, 299, 159],
    8: [999, 879, 759, 639, 499, 379, 259, 139],
}


@pytest.mark.parametrize("num_steps", range(1, 9))
def test_lcm_spacing_stays_on_the_50_step_distillation_grid(num_steps):
    timesteps = e2ediff.sampling_timesteps(1000, num_steps, "lcm").tolist()
    assert timesteps == LCM_GRID_T1_TO_8[num_steps]
    assert all((t + 1) % 20 == 0 for t in timesteps)  # every one of them is on {19, 39, ..., 999}


@pytest.mark.parametrize("original_steps", [50, 25, 8])
def test_lcm_spacing_equals_diffusers_lcm_scheduler(original_steps):
    diffusers = pytest.importorskip("diffusers", reason="the t2i extras (requirements-t2i.txt) compare with diffusers")
    scheduler = diffusers.LCMScheduler(original_inference_steps=original_steps)
    for num_steps in range(1, min(8, original_steps) + 1):
        scheduler.set_timesteps(num_steps)
        ours = e2ediff.sampling_timesteps(1000, num_steps, "lcm", original_steps)
        assert ours.tolist() == scheduler.timesteps.tolist(), (original_steps, num_steps)


def test_leakage_positive_for_plain_linear_and_zero_after_rescale():
    plain = e2ediff.make_schedule("linear")
    rescaled = e2ediff.make_schedule("linear", zero_terminal_snr=True)
    expected = math.sqrt(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[-1])
    assert e2ediff.start_leakage(plain, 4, "trailing") == pytest.approx(expected, rel=1e-4)
    assert expected > 0.004
    assert e2ediff.start_leakage(rescaled, 4, "trailing") == 0.0
    # "leading" never starts at t = N - 1: it leaks even with a zero-SNR schedule
    assert e2ediff.start_leakage(rescaled, 4, "leading") > 0.05
    # Stable Diffusion's schedule: sqrt(abar_T) ~ 0.068 (Lin et al. 2024)
    assert e2ediff.start_leakage(e2ediff.make_schedule("scaled_linear"), 4) == pytest.approx(0.068, abs=1e-3)


# ---------------------------------------------------------------- 2. parameterisations


@pytest.mark.parametrize("prediction_type", e2ediff.PREDICTION_TYPES)
def test_parameterisation_round_trip(prediction_type):
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, 4, 4, generator=generator), torch.randn(5, 3, 4, 4, generator=generator)
    abar = torch.rand(5, generator=generator) * 0.98 + 0.01
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    z = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    output = e2ediff.prediction_target(x0, eps, alpha, sigma, prediction_type)
    x0_back, eps_back = e2ediff.split_prediction(output, z, alpha, sigma, prediction_type)
    torch.testing.assert_close(x0_back, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_back, eps, rtol=1e-4, atol=1e-4)


def test_epsilon_prediction_refused_under_zero_terminal_snr():
    schedule = e2ediff.make_schedule("linear", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="v_prediction"):
        e2ediff.check_prediction_type("epsilon", schedule)
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        e2ediff.unrolled_sample(lambda z, t, c: z, torch.randn(2, 2), schedule, 2, prediction_type="epsilon")
    e2ediff.check_prediction_type("epsilon", e2ediff.make_schedule("linear"))  # fine without the rescale


# ---------------------------------------------------------------- 3. sampler + 4. couplings


def point_oracle(x_star: torch.Tensor, schedule, prediction_type="v_prediction"):
    """A model that knows the data is the single point x_star: outputs the exact target."""
    def model(z, t, cond=None):
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        eps = (z - e2ediff._expand(alpha, z) * x_star) / e2ediff._expand(sigma, z)
        return e2ediff.prediction_target(x_star.expand_as(z), eps, alpha, sigma, prediction_type)
    return model


def gaussian_oracle(mean: float, std: float, schedule):
    """The exact v-prediction for data x0 ~ N(mean, std^2 I): E[x0 | z_t] is linear in z_t."""
    def model(z, t, cond=None):
        alpha, sigma = e2ediff._expand(schedule.alpha(t), z), e2ediff._expand(schedule.sigma(t), z)
        x0 = mean + alpha * std**2 / (alpha**2 * std**2 + sigma**2) * (z - alpha * mean)
        eps = (z - alpha * x0) / sigma
        return alpha * eps - sigma * x0
    return model


def test_point_oracle_ddim_from_its_inversion_reconstructs_the_point():
    schedule = e2ediff.make_schedule("linear", zero_terminal_snr=True)
    x_star = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    model = point_oracle(x_star, schedule)
    z_T = e2ediff.ddim_invert(model, x_star, schedule, 25)
    assert relative_error(z_T, x_star) > 0.5  # z_T is noise, not the data
    z0 = e2ediff.unrolled_sample(model, z_T, schedule, 4)
    torch.testing.assert_close(z0, x_star, rtol=1e-4, atol=1e-4)


def test_gaussian_oracle_inversion_then_ddim_reconstructs_each_sample():
    """The probability-flow ODE is invertible: inverting and re-sampling maps each x0 back to itself
    up to a first-order discretisation error (halving the step size halves it), and the inverted z_T
    look like N(0, I)."""
    schedule = e2ediff.make_schedule("linear", zero_terminal_snr=True)
    model = gaussian_oracle(0.5, 0.3, schedule)
    x0 = 0.5 + 0.3 * torch.randn(2000, 2, generator=torch.Generator().manual_seed(2))
    errors = {}
    for steps in (50, 200):
        z_T = e2ediff.ddim_invert(model, x0, schedule, steps)
        errors[steps] = (e2ediff.unrolled_sample(model, z_T, schedule, steps) - x0).abs().mean().item()
    assert z_T.mean().item() == pytest.approx(0.0, abs=0.05) and z_T.std().item() == pytest.approx(1.0, abs=0.05)
    assert errors[200] < 0.015  # the data's own spread is 0.3
    assert errors[50] / errors[200] > 3  # first order: 4x the steps, ~4x smaller error


class PerStepGain(nn.Module):
    """Denoiser with one scalar gain per sampler timestep, so each step's gradient is visible."""

    def __init__(self, timesteps):
        super().__init__()
        self.index = {t: i for i, t in enumerate(timesteps)}
        self.gains = nn.Parameter(torch.ones(len(timesteps)))
        self.net = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 2))

    def forward(self, z, t, cond=None):
        gain = self.gains[torch.tensor([self.index[int(s)] for s in t])]
        return gain[:, None] * self.net(torch.cat([z, t[:, None].float() / 1000], dim=1))


def _gains_grad(num_steps, **kwargs):
    torch.manual_seed(0)
    schedule = e2ediff.make_schedule("linear", zero_terminal_snr=True)
    model = PerStepGain(e2ediff.sampling_timesteps(1000, num_steps).tolist())
    z_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    out = e2ediff.unrolled_sample(model, z_T, schedule, num_steps, **kwargs)
    out.pow(2).sum().backward()
    return model, z_T


def test_gradients_reach_the_model_through_every_step():
    for update in e2ediff.UPDATES:
        model, z_T = _gains_grad(4, update=update, generator=torch.Generator().manual_seed(0))
        assert torch.all(model.gains.grad.abs() > 1e-6), (update, model.gains.grad)
    assert z_T.grad is not None and z_T.grad.abs().sum() > 0


def test_truncated_backprop_gives_no_gradient_before_the_last_k_steps():
    model, z_T = _gains_grad(4, backprop_steps=2)
    assert torch.all(model.gains.grad[:2] == 0)  # steps 1, 2 (t = 999, 749)
    assert torch.all(model.gains.grad[2:].abs() > 1e-6)  # steps 3, 4
    assert z_T.grad is None


@pytest.mark.parametrize("update,guidance_scale", [("ddim", 1.0), ("lcm", 1.0), ("ddim", 3.0)])
def test_checkpointed_gradients_match_plain(update, guidance_scale):
    schedule = e2ediff.make_schedule("linear", zero_terminal_snr=True)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 64), nn.SiLU(), nn.Dropout(0.1), nn.Linear(64, 2))
    model = lambda z, t, cond: net(torch.cat([z, t[:, None].float() / 1000, cond], dim=1))  # noqa: E731
    z_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(4))
    cond, uncond = torch.ones(16, 1), torch.zeros(16, 1)
    grads = []
    for use_checkpoint in (False, True, "selective"):  # plain, full recomputation, selective (matmul outputs kept)
        torch.manual_seed(1)  # same dropout masks; checkpoint replays the RNG state
        net.zero_grad()
        out = e2ediff.unrolled_sample(model, z_T, schedule, 4, update=update, cond=cond, uncond=uncond, guidance_scale=guidance_scale,
                                      generator=torch.Generator().manual_seed(5), checkpoint=use_checkpoint)
        out.pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert grads[0].norm() > 0
    assert relative_error(grads[1], grads[0]) <= 1e-5
    assert relative_error(grads[2], grads[0]) <= 1e-5


def test_sampler_is_reproducible_with_a_generator():
    schedule = e2ediff.make_schedule("linear", zero_terminal_snr=True)
    model = gaussian_oracle(0.0, 1.0, schedule)
    z_T = torch.randn(4, 2)
    runs = [e2ediff.unrolled_sample(model, z_T, schedule, 3, update="lcm", generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    torch.testing.assert_close(runs[0], runs[1])
    other = e2ediff.unrolled_sample(model, z_T, schedule, 3, update="lcm", generator=torch.Generator().manual_seed(8))
    assert relative_error(other, runs[0]) > 1e-3  # the fresh noise does matter


def test_ddim_with_eta_zero_equals_ddim_default_and_eta_changes_it():
    schedule = e2ediff.make_schedule("linear", zero_terminal_snr=True)
    model = gaussian_oracle(0.0, 0.5, schedule)
    z_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    deterministic = e2ediff.unrolled_sample(model, z_T, schedule, 4)
    stochastic = e2ediff.unrolled_sample(model, z_T, schedule, 4, eta=1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(deterministic, e2ediff.unrolled_sample(model, z_T, schedule, 4, eta=0.0))
    assert relative_error(stochastic, deterministic) > 1e-2


def smooth_model(z, t, cond=None):
    """A fixed, smooth stand-in for a network (any deterministic function compares two samplers)."""
    return torch.tanh(0.7 * z + t.float().reshape(-1, *[1] * (z.dim() - 1)) / 1000)


def diffusers_sample(scheduler, z_T, num_steps, generator, **step_options):
    """Sample with a diffusers scheduler's own loop: set_timesteps, then step() at each timestep."""
    scheduler.set_timesteps(num_steps)
    z = z_T
    for t in scheduler.timesteps:
        output = smooth_model(z, torch.full((len(z),), int(t)))
        z = scheduler.step(output, t, z, generator=generator, **step_options).prev_sample
    return z


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_equals_diffusers_under_zero_terminal_snr(eta):
    """eta < 1: diffusers' DDIMScheduler. eta = 1: DDIM is DDPM's ancestral step with x0_hat, so the
    reference is DDPMScheduler, whose posterior-mean form has no cancellation; DDIMScheduler's own
    1 - abar_prev - std^2 is 0 in exact arithmetic from abar_t = 0 and comes out negative in float32
    (NaN from the first step at T = 4)."""
    diffusers = pytest.importorskip("diffusers", reason="the t2i extras (requirements-t2i.txt) compare with diffusers")
    options = dict(beta_schedule="linear", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                   prediction_type="v_prediction", clip_sample=False)
    scheduler = diffusers.DDPMScheduler(**options) if eta == 1 else diffusers.DDIMScheduler(**options, set_alpha_to_one=True)
    schedule = e2ediff.make_schedule("linear", zero_terminal_snr=True)
    torch.testing.assert_close(schedule.alphas_cumprod, scheduler.alphas_cumprod, rtol=1e-5, atol=1e-7)
    z_T = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    for num_steps in (2, 4, 8):
        ours = e2ediff.unrolled_sample(smooth_model, z_T, schedule, num_steps, eta=eta,
                                       generator=torch.Generator().manual_seed(1))
        theirs = diffusers_sample(scheduler, z_T, num_steps, torch.Generator().manual_seed(1),
                                  **({} if eta == 1 else {"eta": eta}))
        assert relative_error(ours, theirs) <= 1e-5, (num_steps, relative_error(ours, theirs))


@pytest.mark.parametrize("kind", e2ediff.SCHEDULES)
def test_ddim_noise_split_is_exact_where_the_plain_subtraction_cancels(kind):
    """sigma_prev^2 - noise^2 at eta = 1 is small next to both terms when abar_t << abar_prev; computed
    as a sum of non-negative terms it matches exact rational arithmetic on the same float32 abars."""
    from fractions import Fraction
    abar = e2ediff.make_schedule(kind, zero_terminal_snr=True).alphas_cumprod
    for num_steps in range(2, 9):
        timesteps = e2ediff.sampling_timesteps(1000, num_steps).tolist()
        for t, t_prev in zip(timesteps[:-1], timesteps[1:]):
            at, ap = Fraction(abar[t].item()), Fraction(abar[t_prev].item())
            exact = math.sqrt((1 - ap) - (1 - ap) / (1 - at) * (1 - at / ap))
            direction, noise = e2ediff._ddim_split(float(at), float(ap), 1.0)
            assert direction == pytest.approx(exact, rel=1e-12, abs=1e-15)
            assert noise**2 + direction**2 == pytest.approx(float(1 - ap), rel=1e-12)


def test_lcm_sampler_equals_diffusers_lcm_scheduler_on_its_grid():
    diffusers = pytest.importorskip("diffusers", reason="the t2i extras (requirements-t2i.txt) compare with diffusers")
    scheduler = diffusers.LCMScheduler()  # PixArt-delta's: scaled_linear, epsilon, original_inference_steps 50
    schedule = e2ediff.make_schedule("scaled_linear")
    z_T = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    for num_steps in (1, 2, 4, 8):
        ours = e2ediff.unrolled_sample(smooth_model, z_T, schedule, num_steps, prediction_type="epsilon", update="lcm",
                                       spacing="lcm", generator=torch.Generator().manual_seed(1))
        theirs = diffusers_sample(scheduler, z_T, num_steps, torch.Generator().manual_seed(1))
        assert relative_error(ours, theirs) <= 1e-5, (num_steps, relative_error(ours, theirs))


def test_consistency_scalings_make_the_lcm_step_the_identity_at_t0_and_negligible_on_the_grid():
    assert e2ediff.consistency_scalings(0) == (1.0, 0.0)
    c_skip, c_out = e2ediff.consistency_scalings(torch.tensor([19.0, 999.0]))
    assert c_skip.max() < 1e-5 and (1 - c_out).abs().max() < 1e-5


def test_teacher_coupling_targets_are_the_base_models_many_step_samples():
    schedule = e2ediff.make_schedule("linear", zero_terminal_snr=True)
    model = gaussian_oracle(0.2, 0.4, schedule)
    z_T, target = e2ediff.couple("teacher", torch.zeros(8, 2), base_model=model, schedule=schedule, teacher_steps=50, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(z_T, torch.randn(8, 2, generator=torch.Generator().manual_seed(9)))
    torch.testing.assert_close(target, e2ediff.unrolled_sample(model, z_T, schedule, 50))


def test_independent_l2_collapses_to_the_mean_while_inversion_l2_keeps_the_modes():
    """The README's ring table at test size: Alg. 1 as written (independent pairs, L2) shrinks the ring of 8
    Gaussians toward its mean; the inversion coupling keeps the modes."""
    base = toy2d.pretrain(steps=1500, batch=256, hidden=64)
    base_distance = toy2d.score(base, 4, n=1000)
    settings = dict(num_steps=4, steps=250, lr=1e-3, dataset_size=2048, inversion_steps=25)
    independent = toy2d.finetune(base, coupling="independent", **settings)
    inversion = toy2d.finetune(base, coupling="inversion", **settings)
    d_independent, d_inversion = toy2d.score(independent, 4, n=1000), toy2d.score(inversion, 4, n=1000)
    radius_independent = toy2d.sample(independent, 4, n=1000).norm(dim=1).mean().item()
    radius_inversion = toy2d.sample(inversion, 4, n=1000).norm(dim=1).mean().item()
    assert radius_independent < 0.6 < 0.85 < radius_inversion  # data radius is 1.0
    assert d_independent > 5 * d_inversion
    assert d_inversion < base_distance  # and it improves on the base's own 4-step DDIM


# ---------------------------------------------------------------- 5. losses


def test_reconstruction_loss_terms_match_closed_forms():
    pred, target = torch.zeros(2, 1, 2, 2), torch.tensor([1.0, -3.0]).reshape(2, 1, 1, 1).expand(2, 1, 2, 2)
    terms = e2ediff.reconstruction_loss(pred, target, {"l1": 0.5, "l2": 2.0})
    torch.testing.assert_close(terms["l1"], torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(terms["l2"], torch.tensor([1.0, 9.0]))
    torch.testing.assert_close(terms["recon"], torch.tensor([0.5 + 2.0, 1.5 + 18.0]))
    assert "lpips" not in terms


def test_lpips_with_opted_in_random_backbone_gives_per_sample_values_and_gradients():
    lpips = perceptual.LPIPS(random_backbone=True, min_size=32)
    assert not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training and not lpips.net.training
    generator = torch.Generator().manual_seed(0)
    a = (torch.rand(3, 1, 8, 8, generator=generator) * 2 - 1).requires_grad_(True)
    b = torch.rand(3, 1, 8, 8, generator=generator) * 2 - 1
    distance = lpips(a, b)
    assert distance.shape == (3,) and torch.all(distance > 0)
    assert torch.allclose(lpips(b, b), torch.zeros(3), atol=1e-6)
    distance.sum().backward()
    assert a.grad.abs().sum() > 0
    terms = e2ediff.reconstruction_loss(a, b, {"l2": 1.0, "lpips": 0.5}, lpips=lpips)
    torch.testing.assert_close(terms["recon"], terms["l2"] + 0.5 * terms["lpips"])


def test_lpips_without_backbone_weights_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"alexnet-owt-7be5be79\.pth.*hub/checkpoints"):
        perceptual.LPIPS(net="alex")
    with pytest.raises(ValueError, match="an 'lpips' weight > 0 needs a perceptual distance"):
        e2ediff.reconstruction_loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), {"lpips": 1.0})


class TwoLayerFeatures(nn.Module):
    """features(x) -> [x itself, relu(x) * 2]: a fixed network whose LPIPS-style distance is known by hand."""

    def features(self, x):
        return [x, torch.relu(x) * 2]


def test_feature_distance_is_lpips_eq1_with_unit_weights():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 2, 2, generator=generator), torch.randn(3, 4, 2, 2, generator=generator)
    distance = perceptual.FeatureDistance(TwoLayerFeatures())(a, b)
    expected = torch.zeros(3)
    for fa, fb in zip(TwoLayerFeatures().features(a), TwoLayerFeatures().features(b)):
        unit = lambda f: f / (f.norm(dim=1, keepdim=True) + 1e-10)  # noqa: E731
        expected += ((unit(fa) - unit(fb)) ** 2).sum(1).mean((1, 2))
    torch.testing.assert_close(distance, expected)
    # unit-normalised over channels: scaling one position's feature vector changes nothing
    torch.testing.assert_close(perceptual.FeatureDistance(TwoLayerFeatures())(a, 3 * a), torch.zeros(3), atol=1e-6, rtol=0)


def test_feature_distance_is_frozen_and_passes_gradients_to_its_inputs():
    network = nn.Conv2d(1, 4, 3, padding=1)
    network.features = lambda x: [network(x)]
    distance = perceptual.FeatureDistance(network)
    distance.train()
    assert not network.training and not any(p.requires_grad for p in network.parameters())
    a = torch.randn(2, 1, 8, 8, requires_grad=True)
    distance(a, torch.randn(2, 1, 8, 8)).sum().backward()
    assert a.grad.abs().sum() > 0 and network.weight.grad is None


# ---------------------------------------------------------------- 6. adversarial


def test_gan_loss_signs_and_values():
    big, small = torch.full((2, 1, 3, 3), 5.0), torch.full((2, 1, 3, 3), -5.0)
    torch.testing.assert_close(e2ediff.discriminator_loss(big, small, "hinge"), torch.zeros(2))  # D is right: no loss
    torch.testing.assert_close(e2ediff.discriminator_loss(small, big, "hinge"), torch.full((2,), 12.0))
    torch.testing.assert_close(e2ediff.generator_adversarial_loss(big, "hinge"), torch.full((2,), -5.0))
    softplus5 = math.log1p(math.exp(5.0))
    torch.testing.assert_close(e2ediff.discriminator_loss(small, big, "non_saturating"), torch.full((2,), 2 * softplus5))
    torch.testing.assert_close(e2ediff.generator_adversarial_loss(small, "non_saturating"), torch.full((2,), softplus5))
    # the generator loss falls as the discriminator believes the fakes more
    assert e2ediff.generator_adversarial_loss(big).mean() < e2ediff.generator_adversarial_loss(small).mean()


def test_adaptive_weight_is_the_clamped_ratio_of_gradient_norms():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    recon = (torch.tensor([3.0, 4.0]) * w).sum()  # gradient (3, 4): norm 5
    gan = (torch.tensor([0.0, 0.5]) * w).sum()  # gradient (0, .5): norm .5
    weight = e2ediff.adaptive_gan_weight(recon, gan, w)
    assert weight.item() == pytest.approx(5.0 / (0.5 + 1e-4), rel=1e-6) and not weight.requires_grad
    flat = (torch.zeros(2) * w).sum()  # no GAN gradient: the ratio is 5 / 1e-4, clamped
    assert e2ediff.adaptive_gan_weight(recon, flat, w).item() == e2ediff.MAX_ADAPTIVE_GAN_WEIGHT


def test_no_discriminator_call_before_the_start_step_and_its_own_update_after():
    torch.manual_seed(0)
    schedule = e2ediff.make_schedule("linear", zero_terminal_snr=True)
    config = e2ediff.EndToEndConfig(num_steps=2, update="ddim", lpips_weight=0.0, gan_weight=0.5, gan_start_step=10,
                                    gan_adaptive=False, grad_checkpoint=False)
    model = TinyImageDenoiser()
    discriminator = e2ediff.PatchDiscriminator(in_channels=1, base_channels=8, num_layers=1)
    calls = []
    discriminator.register_forward_hook(lambda *args: calls.append(1))
    gan = e2ediff.GANLoss(discriminator, config)
    loss_fn = e2ediff.EndToEndLoss(model, schedule, config, gan=gan)
    optimizer, ema = torch.optim.SGD(model.parameters(), lr=0.1), e2ediff.EMA(model, config.ema_decay)
    batch = [{"target": torch.randn(2, 1, 8, 8), "z_T": torch.randn(2, 1, 8, 8)}]
    logs = e2ediff.train_step(loss_fn, optimizer, ema, batch, step=9, gan=gan)
    assert calls == [] and "gan" not in logs and "disc" not in logs
    weights = [p.detach().clone() for p in discriminator.parameters()]
    logs = e2ediff.train_step(loss_fn, optimizer, ema, batch, step=10, gan=gan)
    assert len(calls) == 3  # the generator's term (D frozen), then D on real and on fake
    assert logs["gan_weight"] == 0.5 and math.isfinite(logs["disc"])
    assert all(not torch.equal(w, p) for w, p in zip(weights, discriminator.parameters()))  # D took its step


def test_projection_discriminator_reads_the_label_and_refuses_a_missing_one():
    torch.manual_seed(0)
    discriminator = e2ediff.PatchDiscriminator(in_channels=1, base_channels=8, num_layers=1, num_classes=10)
    nn.init.normal_(discriminator.class_embed.weight, 0.0, 1.0)
    x = torch.randn(2, 1, 8, 8)
    logits = discriminator(x, torch.tensor([3, 3]))
    assert logits.shape == (2, 1, 2, 2)  # the unconditional PatchGAN's shape
    assert not torch.allclose(logits, discriminator(x, torch.tensor([4, 4])))
    with torch.no_grad():  # a zero class vector is the unconditional PatchGAN itself
        discriminator.class_embed.weight.zero_()
    torch.testing.assert_close(discriminator(x, torch.tensor([3, 4])), discriminator.main(x))
    with pytest.raises(ValueError, match="needs class labels"):
        discriminator(x)
    with pytest.raises(ValueError, match="takes none"):
        e2ediff.PatchDiscriminator(in_channels=1, base_channels=8, num_layers=1)(x, torch.tensor([3, 3]))


class RecordingDiscriminator(nn.Module):
    """A conditional 1x1 discriminator that records what each call saw."""

    def __init__(self):
        super().__init__()
        self.scale, self.seen = nn.Parameter(torch.ones(())), []

    def forward(self, x, cond):
        self.seen.append((x.detach().clone(), cond.clone()))
        return self.scale * x.mean((1, 2, 3), keepdim=True)


def test_discriminator_real_samples_are_the_data_with_every_coupling():
    torch.manual_seed(0)
    schedule = e2ediff.make_schedule("linear", zero_terminal_snr=True)
    data, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    for coupling in ("independent", "teacher"):
        config = e2ediff.EndToEndConfig(num_steps=2, update="ddim", lpips_weight=0.0, gan_weight=0.5, gan_adaptive=False,
                                        grad_checkpoint=False, coupling=coupling, teacher_steps=3, disc_conditional=True)
        model, discriminator = TinyImageDenoiser(), RecordingDiscriminator()
        gan = e2ediff.GANLoss(discriminator, config)
        loss_fn = e2ediff.EndToEndLoss(model, schedule, config, gan=gan)
        optimizer, ema = torch.optim.SGD(model.parameters(), lr=0.1), e2ediff.EMA(model, config.ema_decay)
        e2ediff.train_step(loss_fn, optimizer, ema, [{"target": data, "cond": labels}], step=0, gan=gan,
                           base_model=TinyImageDenoiser())
        (fake_for_g, cond_g), (real, cond_real), (fake, cond_fake) = discriminator.seen
        assert torch.equal(real, data), coupling  # never the teacher's sample
        assert torch.equal(fake, fake_for_g) and not torch.equal(fake, data)
        assert all(torch.equal(c, labels) for c in (cond_g, cond_real, cond_fake))


def test_cached_teacher_pairs_regress_onto_the_paired_target_while_the_discriminator_sees_the_data():
    torch.manual_seed(0)
    schedule = e2ediff.make_schedule("linear", zero_terminal_snr=True)
    data, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    z_T, teacher_sample = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    config = e2ediff.EndToEndConfig(num_steps=2, update="ddim", lpips_weight=0.0, gan_weight=0.5, gan_adaptive=False,
                                    grad_checkpoint=False, coupling="teacher", disc_conditional=True)
    model, discriminator = TinyImageDenoiser(), RecordingDiscriminator()
    gan = e2ediff.GANLoss(discriminator, config)
    loss_fn = e2ediff.EndToEndLoss(model, schedule, config, gan=gan)
    with torch.no_grad():
        sample = e2ediff.unrolled_sample(model, z_T, schedule, 2, update="ddim", cond=labels)
    optimizer, ema = torch.optim.SGD(model.parameters(), lr=0.1), e2ediff.EMA(model, config.ema_decay)
    logs = e2ediff.train_step(loss_fn, optimizer, ema, [{"target": data, "cond": labels, "z_T": z_T,
                                                         "paired_target": teacher_sample}], step=0, gan=gan)
    assert logs["l2"] == pytest.approx((sample - teacher_sample).pow(2).mean().item(), rel=1e-5)
    (_, _), (real, _), (_, _) = discriminator.seen
    assert torch.equal(real, data)


def test_r1_penalty_matches_closed_form_for_a_linear_discriminator():
    linear = nn.Linear(3, 1, bias=False)
    penalty, _ = e2ediff.r1_penalty(linear, torch.randn(4, 3))
    torch.testing.assert_close(penalty, linear.weight.pow(2).sum().expand(4))


def test_patch_discriminator_shapes_batch_independence_and_small_input_error():
    torch.manual_seed(0)
    discriminator = e2ediff.PatchDiscriminator(in_channels=3, base_channels=16, num_layers=3)
    x = torch.randn(4, 3, 32, 32)
    logits = discriminator(x)
    assert logits.shape == (4, 1, 2, 2)
    torch.testing.assert_close(discriminator(x[:1]), logits[:1], rtol=1e-5, atol=1e-5)  # no batch statistics
    with pytest.raises(ValueError, match="num_layers=3 needs .* H, W >= 24"):
        discriminator(torch.randn(1, 3, 8, 8))


# ---------------------------------------------------------------- 7. EMA, 8. diffusion loss


def frozen_toy_base(num_classes=None):
    """A tiny toy UNet as the frozen base (random weights: the tests check plumbing, not judgement)."""
    import toy_nets
    torch.manual_seed(0)
    return toy_nets.UNet(1, model_channels=8, channel_mult=(1, 2), num_classes=num_classes).eval().requires_grad_(False)


def basefeat_setup(disc_steps=1, num_classes=None, train_backbone=False):
    schedule = e2ediff.make_schedule("linear", zero_terminal_snr=True)
    config = e2ediff.EndToEndConfig(num_steps=2, update="ddim", lpips_weight=0.0, gan_weight=0.5, gan_adaptive=False,
                                    grad_checkpoint=False, disc_kind="basefeat", disc_steps=disc_steps,
                                    disc_train_backbone=train_backbone)
    base = frozen_toy_base(num_classes)
    cond = None if num_classes is None else torch.tensor([0])
    discriminator = critics.base_feature_discriminator(base, schedule, config, torch.zeros(1, 1, 8, 8), cond, num_classes)
    return schedule, config, base, discriminator


def test_base_feature_discriminator_trains_its_heads_only_and_the_base_stays_bit_identical():
    schedule, config, base, discriminator = basefeat_setup()
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    head_ids = {id(p) for p in discriminator.heads.parameters()}
    assert {id(p) for p in discriminator.parameters()} == head_ids and not head_ids & {id(p) for p in base.parameters()}
    assert all(key.startswith("heads.") for key in discriminator.state_dict())  # no copy of the base in a checkpoint
    model = TinyImageDenoiser()
    gan = e2ediff.GANLoss(discriminator, config)
    loss_fn = e2ediff.EndToEndLoss(model, schedule, config, gan=gan)
    optimizer, ema = torch.optim.SGD(model.parameters(), lr=0.1), e2ediff.EMA(model, config.ema_decay)
    heads = [p.detach().clone() for p in discriminator.parameters()]
    batch = [{"target": torch.randn(2, 1, 8, 8), "z_T": torch.randn(2, 1, 8, 8)}]
    for step in range(2):  # generator and discriminator steps
        logs = e2ediff.train_step(loss_fn, optimizer, ema, batch, step=step, gan=gan)
    assert math.isfinite(logs["disc"]) and math.isfinite(logs["gan"])
    assert all(not p.requires_grad and p.grad is None for p in base.parameters())
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(not torch.equal(h, p) for h, p in zip(heads, discriminator.parameters()))  # the heads took their steps


def test_trained_backbone_is_a_copy_that_the_critic_steps_move_while_the_base_stays_bit_identical():
    schedule, config, base, discriminator = basefeat_setup(train_backbone=True)
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    assert {key.split(".")[0] for key in discriminator.state_dict()} == {"heads", "backbone"}
    assert not {id(p) for p in discriminator.parameters()} & {id(p) for p in base.parameters()}
    backbone = [p.detach().clone() for p in discriminator.backbone.parameters()]
    model = TinyImageDenoiser()
    gan = e2ediff.GANLoss(discriminator, config)
    loss_fn = e2ediff.EndToEndLoss(model, schedule, config, gan=gan)
    optimizer, ema = torch.optim.SGD(model.parameters(), lr=0.1), e2ediff.EMA(model, config.ema_decay)
    fake = torch.randn(2, 1, 8, 8, requires_grad=True)
    gan.generator_loss(fake, torch.zeros(()), step=0)["gan_total"].backward()  # the generator's pass trains nothing
    assert fake.grad.abs().sum() > 0 and all(p.grad is None for p in discriminator.parameters())
    batch = [{"target": torch.randn(2, 1, 8, 8), "z_T": torch.randn(2, 1, 8, 8)}]
    for step in range(2):
        e2ediff.train_step(loss_fn, optimizer, ema, batch, step=step, gan=gan)
    assert any(not torch.equal(b, p) for b, p in zip(backbone, discriminator.backbone.parameters()))
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(not p.requires_grad and p.grad is None for p in base.parameters())


def test_base_feature_generator_loss_reaches_the_sample_through_the_frozen_base_and_not_the_heads():
    schedule, config, base, discriminator = basefeat_setup()
    gan = e2ediff.GANLoss(discriminator, config)
    fake = torch.randn(3, 1, 8, 8, requires_grad=True)
    gan.generator_loss(fake, torch.zeros(()), step=0)["gan_total"].backward()
    assert fake.grad is not None and (fake.grad.flatten(1).norm(dim=1) > 0).all()  # every sample gets a gradient
    assert all(p.grad is None for p in discriminator.parameters()) and all(p.requires_grad for p in discriminator.parameters())
    assert all(p.grad is None for p in base.parameters())


@pytest.mark.parametrize("disc_steps", [1, 3])
def test_disc_steps_k_makes_k_discriminator_updates_per_generator_step(disc_steps):
    schedule, config, base, discriminator = basefeat_setup(disc_steps)
    model = TinyImageDenoiser()
    gan = e2ediff.GANLoss(discriminator, config)
    loss_fn = e2ediff.EndToEndLoss(model, schedule, config, gan=gan)
    optimizer, ema = torch.optim.AdamW(model.parameters(), lr=1e-3), e2ediff.EMA(model, config.ema_decay)
    batches = [{"target": torch.randn(2, 1, 8, 8), "z_T": torch.randn(2, 1, 8, 8)} for _ in range(2)]  # accumulation
    for step in range(2):
        e2ediff.train_step(loss_fn, optimizer, ema, batches, step=step, gan=gan)
    assert {int(optimizer.state[p]["step"]) for p in model.parameters()} == {2}
    assert {int(gan.optimizer.state[p]["step"]) for p in discriminator.parameters()} == {2 * disc_steps}


def test_base_feature_hooks_find_the_toy_unet_blocks_and_the_projection_reads_the_label():
    base = frozen_toy_base(num_classes=10)
    assert critics.default_feature_layers(base) == ("down.0", "down.1", "down.2", "middle.0", "middle.1")
    _, _, base, discriminator = basefeat_setup(num_classes=10)
    assert [type(head["logit"]) for head in discriminator.heads] == [nn.Conv2d] * 5  # spatial conv heads
    for head in discriminator.heads:
        nn.init.normal_(head["embed"].weight)
    x = torch.randn(2, 1, 8, 8)
    discriminator.generator = torch.Generator().manual_seed(0)
    logits = discriminator(x, torch.tensor([1, 2]))
    assert logits.shape == (2, 8 * 8 + 4 * 4 * 4)  # one logit per position: down.0 at 8x8, the other four at 4x4
    discriminator.generator = torch.Generator().manual_seed(0)  # the same t and eps again
    relabelled = discriminator(x, torch.tensor([3, 2]))
    assert not torch.allclose(logits[0], relabelled[0]) and torch.equal(logits[1], relabelled[1])
    with pytest.raises(ValueError, match="class labels"):
        discriminator(x)


def test_base_feature_hooks_find_the_tiny_pixart_blocks(request):
    diffusers = pytest.importorskip("diffusers", reason="the t2i extras (requirements-t2i.txt) build PixArt")
    from diffusers_parts import DiffusersDenoiser
    folder = request.getfixturevalue("tiny_pipeline")("delta")  # tests/tiny_t2i.py's PixArt: 2 transformer blocks
    transformer = diffusers.PixArtTransformer2DModel.from_pretrained(str(folder / "transformer"))
    base = DiffusersDenoiser(transformer).eval().requires_grad_(False)
    layers = critics.default_feature_layers(base)
    assert layers == tuple(f"transformer.transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks)))
    schedule = e2ediff.make_schedule("linear")
    cond = (torch.randn(2, 5, transformer.config.caption_channels), torch.ones(2, 5, dtype=torch.long))
    latents = torch.randn(2, transformer.config.in_channels, 8, 8, requires_grad=True)
    discriminator = critics.BaseFeatureDiscriminator(base, schedule.alphas_cumprod, layers, latents[:1].detach(),
                                                     tuple(c[:1] for c in cond))
    assert [type(head["logit"]) for head in discriminator.heads] == [nn.Conv2d] * len(layers)  # tokens on their grid
    logits = discriminator(latents, cond)
    assert logits.shape == (2, len(layers) * (8 // transformer.config.patch_size) ** 2)  # one logit per token
    logits.sum().backward()
    assert latents.grad.abs().sum() > 0 and all(p.grad is None for p in base.parameters())


def test_base_feature_discriminator_refuses_a_trainable_base_and_the_config_a_meaningless_option():
    schedule = e2ediff.make_schedule("linear")
    with pytest.raises(ValueError, match="frozen base"):
        critics.BaseFeatureDiscriminator(frozen_toy_base().requires_grad_(True), schedule.alphas_cumprod, ("middle.0",),
                                         torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="not in the base"):
        critics.BaseFeatureDiscriminator(frozen_toy_base(), schedule.alphas_cumprod, ("nowhere",), torch.zeros(1, 1, 8, 8))
    with pytest.raises(train_utils.RuleError, match="disc-kind basefeat"):
        train_utils.validate(e2ediff.EndToEndConfig(disc_feature_layers="middle.0"))


def test_logit_normal_timesteps_lean_to_low_noise_by_default_and_uniform_covers_the_grid():
    _, _, _, discriminator = basefeat_setup()
    discriminator.generator = torch.Generator().manual_seed(0)
    t = discriminator.sample_timesteps(20_000, "cpu").float() / len(discriminator.alphas_cumprod)
    expected = torch.sigmoid(-3.0 + torch.randn(200_000, generator=torch.Generator().manual_seed(1))).mean()
    assert abs(t.mean() - expected) < 0.01 and t.median() < 0.06  # loc -3: median sigmoid(-3) = 0.047
    discriminator.t_distribution = "uniform"
    t = discriminator.sample_timesteps(20_000, "cpu")
    assert t.min() == 0 and t.max() == len(discriminator.alphas_cumprod) - 1


def test_ema_warmup_forgets_the_random_init_and_resumes_its_count():
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 0.0)  # the "random init"
    ema = e2ediff.EMA(model, decay=0.999, warmup=True)
    nn.init.constant_(model.weight, 1.0)  # the trained weights, held fixed
    init_share = 1.0
    for n in range(200):
        assert ema.current_decay() == pytest.approx(min(0.999, (1 + n) / (10 + n)))
        init_share *= ema.current_decay()
        ema.update(model)
    torch.testing.assert_close(ema.module.weight, torch.full((1, 1), 1.0 - init_share))
    assert init_share < 1e-12  # 9! 200! / 209!; without warm-up: 0.999^200 = 0.82 of the EMA would still be the init
    plain = e2ediff.EMA(nn.Linear(1, 1, bias=False), decay=0.999)
    assert plain.current_decay() == 0.999
    restored = e2ediff.EMA(nn.Linear(1, 1, bias=False), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert (restored.warmup, restored.num_updates, restored.current_decay()) == (True, 200, ema.current_decay())


def test_ema_arithmetic_buffers_and_state_dict():
    model = nn.BatchNorm1d(2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = e2ediff.EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.running_mean.fill_(7.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, torch.full((2,), 0.9 * 1 + 0.1 * 3))
    torch.testing.assert_close(ema.module.running_mean, torch.full((2,), 7.0))
    assert not ema.module.weight.requires_grad
    restored = e2ediff.EMA(nn.BatchNorm1d(2), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9
    torch.testing.assert_close(restored.module.weight, ema.module.weight)
    with pytest.raises(ValueError, match="decay must be in"):
        e2ediff.EMA(model, decay=1.5)


@pytest.mark.parametrize("prediction_type", e2ediff.PREDICTION_TYPES)
def test_diffusion_loss_is_zero_for_the_oracle_and_positive_otherwise(prediction_type):
    schedule = e2ediff.make_schedule("linear", zero_terminal_snr=prediction_type != "epsilon")
    x_star = torch.randn(1, 2, 3, 3).expand(16, 2, 3, 3)
    oracle = e2ediff.diffusion_loss(point_oracle(x_star, schedule, prediction_type), x_star, schedule, prediction_type, generator=torch.Generator().manual_seed(0))
    assert oracle.shape == (16,) and oracle.max().item() < 1e-6
    zero = e2ediff.diffusion_loss(lambda z, t, c: torch.zeros_like(z), x_star, schedule, prediction_type, generator=torch.Generator().manual_seed(0))
    assert zero.min().item() > 1e-3


# ---------------------------------------------------------------- 9. Algorithm 1


class TinyImageDenoiser(nn.Module):
    """A 1-channel conv denoiser with a time input: enough to train through the unrolled sampler."""

    def __init__(self):
        super().__init__()
        self.conv_in, self.conv_out = nn.Conv2d(2, 16, 3, padding=1), nn.Conv2d(16, 1, 3, padding=1)

    @property
    def last_layer(self):
        return self.conv_out.weight

    def forward(self, z, t, cond=None):
        time = (t.float() / 1000)[:, None, None, None].expand_as(z)
        return self.conv_out(torch.tanh(self.conv_in(torch.cat([z, time], dim=1))))


def test_train_step_is_algorithm_1_lines_6_to_15_written_out():
    """train_step against the algorithm written by hand: couple, unroll, L2, clip, AdamW, EMA."""
    schedule = e2ediff.make_schedule("linear", zero_terminal_snr=True)
    config = e2ediff.EndToEndConfig(num_steps=3, update="ddim", lpips_weight=0.0, grad_clip=0.05, ema_decay=0.9,
                                    grad_checkpoint=False)
    torch.manual_seed(0)
    by_hand, target = TinyImageDenoiser(), torch.randn(4, 1, 8, 8)
    model = copy.deepcopy(by_hand)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (by_hand, model)]
    emas = [e2ediff.EMA(m, config.ema_decay) for m in (by_hand, model)]

    torch.manual_seed(1)
    z_T = torch.randn_like(target)  # line 6, the independent coupling
    z0 = e2ediff.unrolled_sample(by_hand, z_T, schedule, 3, update="ddim")  # lines 7-12
    (z0 - target).pow(2).mean().backward()  # line 13, d = L2
    norm = torch.nn.utils.clip_grad_norm_(by_hand.parameters(), 0.05)
    optimizers[0].step()  # line 14
    emas[0].update(by_hand)  # line 15

    torch.manual_seed(1)
    loss_fn = e2ediff.EndToEndLoss(model, schedule, config)
    logs = e2ediff.train_step(loss_fn, optimizers[1], emas[1], [{"target": target}], step=0)
    assert logs["grad_norm"] == pytest.approx(norm.item(), rel=1e-6) and norm > 0.05  # clipping was active
    for a, b in zip(emas[0].module.parameters(), emas[1].module.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert logs["l2"] == pytest.approx(logs["loss"]) and logs["loss"] > 0


def test_gradient_accumulation_over_micro_batches_equals_one_batch():
    schedule = e2ediff.make_schedule("linear", zero_terminal_snr=True)
    config = e2ediff.EndToEndConfig(num_steps=2, update="ddim", lpips_weight=0.0, grad_clip=0.0, grad_checkpoint=True)
    torch.manual_seed(0)
    models = [TinyImageDenoiser()]
    models.append(copy.deepcopy(models[0]))
    target, z_T = torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8)
    whole = [{"target": target, "z_T": z_T}]
    halves = [{"target": target[:4], "z_T": z_T[:4]}, {"target": target[4:], "z_T": z_T[4:]}]
    for model, batches in zip(models, (whole, halves)):
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        e2ediff.train_step(e2ediff.EndToEndLoss(model, schedule, config), optimizer, e2ediff.EMA(model, 0.5), batches, 0)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(models[0].conv_out.weight, TinyImageDenoiser().conv_out.weight)


def test_teacher_coupling_trains_toward_the_base_models_sample_not_the_data():
    schedule = e2ediff.make_schedule("linear", zero_terminal_snr=True)
    config = e2ediff.EndToEndConfig(num_steps=1, update="ddim", coupling="teacher", teacher_steps=20, lpips_weight=0.0,
                                    grad_checkpoint=False)
    teacher = gaussian_oracle(0.3, 0.0001, schedule)  # its samples are all ~0.3
    torch.manual_seed(0)
    model = TinyImageDenoiser()
    loss_fn = e2ediff.EndToEndLoss(model, schedule, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = [{"target": torch.full((16, 1, 8, 8), -0.7)}]  # the data says -0.7; only its shape is used
    for step in range(200):
        e2ediff.train_step(loss_fn, optimizer, e2ediff.EMA(model, 0.0), data, step, base_model=teacher)
    with torch.no_grad():
        out = e2ediff.unrolled_sample(model, torch.randn(64, 1, 8, 8), schedule, 1)
    assert abs(out.mean().item() - 0.3) < 0.1


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("call,message", [
    (lambda: e2ediff.make_schedule("quadratic"), "unknown schedule 'quadratic'; valid choices: 'linear', 'scaled_linear', 'cosine'"),
    (lambda: e2ediff.sampling_timesteps(1000, 4, "middle"), "valid choices: 'trailing', 'leading', 'linspace'"),
    (lambda: e2ediff.sampling_timesteps(1000, 0), "num_steps must be in"),
    (lambda: e2ediff.unrolled_sample(lambda z, t, c: z, torch.randn(2, 2), e2ediff.make_schedule(), 0), "must be >= 1"),
    (lambda: e2ediff.unrolled_sample(lambda z, t, c: z, torch.randn(2, 2), e2ediff.make_schedule(), 2, update="euler"), "valid choices: 'ddim', 'lcm'"),
    (lambda: e2ediff.unrolled_sample(lambda z, t, c: z[:, :1], torch.randn(2, 2), e2ediff.make_schedule(), 2), r"model returned shape \(2, 1\)"),
    (lambda: e2ediff.unrolled_sample(lambda z, t, c: z, torch.randn(2, 2), e2ediff.make_schedule(), 2, guidance_scale=2.0), "needs `uncond`"),
    (lambda: e2ediff.unrolled_sample(lambda z, t, c: z, torch.randn(2, 2), e2ediff.make_schedule(), 2, backprop_steps=3), "backprop_steps must be in"),
    (lambda: e2ediff.unrolled_sample(lambda z, t, c: z, torch.randn(2, 2), e2ediff.make_schedule(), 2, prediction_type="x0"), "valid choices: 'epsilon', 'sample', 'v_prediction'"),
    (lambda: e2ediff.couple("reflow", torch.randn(2, 2)), "valid choices: 'independent', 'inversion', 'teacher'"),
    (lambda: e2ediff.couple("inversion", torch.randn(2, 2)), "needs the frozen base_model"),
    (lambda: e2ediff.reconstruction_loss(torch.randn(2, 2), torch.randn(2, 2), {"huber": 1.0}), "valid choices: 'l1', 'l2', 'lpips'"),
    (lambda: e2ediff.reconstruction_loss(torch.randn(2, 2), torch.randn(2, 3)), "shapes differ"),
    (lambda: e2ediff.discriminator_loss(torch.zeros(1, 1), torch.zeros(1, 1), "wasserstein"), "valid choices: 'hinge', 'non_saturating'"),
    (lambda: perceptual.LPIPS(net="resnet"), "valid choices: 'alex', 'vgg', 'squeeze'"),
    (lambda: train_utils.validate(e2ediff.EndToEndConfig(coupling="nearest")), "coupling: got 'nearest', need one of 'independent', 'inversion', 'teacher'"),
    (lambda: train_utils.validate(e2ediff.EndToEndConfig(l2_weight=0.0, lpips_weight=0.0)), "l2_weight: got 0.0, need a reconstruction weight"),
    (lambda: train_utils.validate(e2ediff.EndToEndConfig(num_steps=2, backprop_steps=3)), r"backprop_steps: got 3, need backprop_steps <= num_steps"),
    (lambda: train_utils.validate(e2ediff.EndToEndConfig(spacing="lcm", original_steps=2)), r"original_steps: got 2, need num_steps <= original_steps"),
    (lambda: train_utils.validate(e2ediff.EndToEndConfig(l1_weight=-1.0)), r"l1_weight: got -1.0, need a finite number >= 0"),
    (lambda: train_utils.validate(e2ediff.EndToEndConfig(eta=float("nan"))), r"eta: got nan, need a finite number in \[0, 1\]"),
    (lambda: e2ediff.EndToEndLoss(nn.Identity(), e2ediff.make_schedule(), e2ediff.EndToEndConfig()), "needs a perceptual distance"),
])
def test_bad_input_raises_value_error_naming_the_valid_choices(call, message):
    with pytest.raises(ValueError, match=message):
        call()
