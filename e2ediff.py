"""e2ediff — end-to-end diffusion training, in one readable module.

Reference implementation of "E2EDiff / E2ED^2: Direct Mapping from Noise to Data for Enhanced
Diffusion Models" (Tan et al., arXiv 2412.21044). Algorithm 1 of the paper, line by line:

    line   Alg. 1                                              here
    1      theta <- theta_pre, theta_EMA <- theta              the script copies its base; EMA(model)
    3-5    sample (x0, c); z0 = E(x0); e_c = T(c)              the script (data, VAE, text encoder)
    6      z_T ~ N(0, I)                                        couple(): independent / inversion / teacher
    7-12   for t = T..1: z_t <- G(z_t + noise, e_c, t)          unrolled_sample(), differentiable end to end
    13     L_recon = d(z0, z0_hat)                   (Eq. 7)    reconstruction_loss(): L1, L2, LPIPS
           L_total = L_recon + lambda_GAN L_GAN      (Eq. 8)    GANLoss.generator_loss(); both in EndToEndLoss
    14     theta <- theta - eta grad L                          train_step(): clip, optimiser step
    15     theta_EMA <- tau theta_EMA + (1 - tau) theta         EMA.update()
           (the discriminator's update, not in Alg. 1)         GANLoss.discriminator_loss() in train_step()

    train_step() runs lines 6-15 for one optimiser step; EndToEndConfig holds every option, with the
    paper's values as defaults. Both scripts, toy2d.py, the benchmarks and the notebook call them.

Read it top to bottom, in the paper's order:

    1. noise schedule          (VP schedules, zero terminal SNR, sampler spacings, "leakage" of x_T)
    2. parameterisations       (epsilon / x0 / v and the conversions between them)
    3. unrolled sampler        (Alg. 1 lines 7-12)
    4. couplings               (Alg. 1 line 6: which noise z_T is paired with which target z0)
    5. reconstruction losses   (Eq. 7: L1, L2, LPIPS — or LPIPS's distance in any backbone — and their hybrid)
    6. adversarial loss        (Eq. 8: PatchGAN, or heads on the frozen base's features (LADD), projection
                                on class labels, hinge / non-saturating, adaptive or fixed weight, R1, start
                                step, critic steps; its real samples are data)
    7. EMA                     (Alg. 1 line 15)
    8. standard diffusion loss (to pretrain the base model the method starts from)
    9. Algorithm 1             (EndToEndConfig, EndToEndLoss, train_step)

Which coupling is the paper's, and which to use
    Algorithm 1 draws z_T ~ N(0, I) independently of the data sample z0 and regresses the sampler's
    output onto z0 — the `independent` coupling. Under an L1/L2 loss this regression is ill-posed:
    the loss-optimal sampler ignores z_T and outputs the (conditional) mean of the data, so samples
    collapse (measured in the tests and in benchmarks/quality.py). The paper escapes this only by
    starting from a strong few-step model and training with a tiny learning rate (1e-6), i.e. by
    barely moving. Use `inversion` (z_T is the frozen base model's deterministic DDIM inversion of
    z0, so every target has its own noise: a well-posed regression) or `teacher` (the target is the
    base model's many-step sample from z_T). A distribution-level loss (the GAN term) also works
    with `independent` pairs, and it is the only term that can take the student past its base: L1/L2
    targets from inversion or a teacher are the base's own ODE, so the discriminator's real samples are
    always data, whatever the coupling makes the regression target.

Reading of Alg. 1 line 9
    The noise term of line 9 is ambiguous. We read it as the update of the paper's base model
    (PixArt-delta, an LCM): predict x0, then re-noise it to the next timestep with fresh noise —
    `update="lcm"`. Deterministic DDIM (`update="ddim"`, eta = 0) and stochastic DDIM (eta > 0)
    are the standard alternatives.

Demo (the module's own smoke run):  python e2ediff.py
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
"""model(z_t (B, ...), t (B,) long in [0, N), cond) -> output shaped like z_t."""


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (DDP keeps it as .module), or the module itself."""
    return getattr(module, "module", module)


def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(map(repr, choices))}")


# --------------------------------------------------------------------------------------------------
# 1. Noise schedule (variance preserving: z_t = alpha_t x0 + sigma_t eps, alpha_t^2 + sigma_t^2 = 1)
# --------------------------------------------------------------------------------------------------

SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = ("trailing", "leading", "linspace", "lcm")


@dataclass
class NoiseSchedule:
    """A discrete VP schedule over N training timesteps t = 0 .. N-1 (float32 buffers)."""

    betas: torch.Tensor  # (N,)  beta_t
    alphas_cumprod: torch.Tensor  # (N,)  \bar\alpha_t = \prod_{s<=t} (1 - beta_s)

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_t = sqrt(\\bar\\alpha_t), the signal scale at timestep t."""
        return self.alphas_cumprod.to(t.device)[t].sqrt()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma_t = sqrt(1 - \\bar\\alpha_t), the noise scale at timestep t."""
        return (1 - self.alphas_cumprod.to(t.device)[t]).sqrt()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = \\bar\\alpha_t / (1 - \\bar\\alpha_t) (Kingma et al. 2021)."""
        abar = self.alphas_cumprod.to(t.device)[t]
        return abar / (1 - abar)

    def to(self, device) -> "NoiseSchedule":
        return NoiseSchedule(self.betas.to(device), self.alphas_cumprod.to(device))


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024 (arXiv 2305.08891), Alg. 1: shift and scale sqrt(abar) so its last value is 0
    and its first is unchanged, then rebuild the betas. float64 in, float64 out."""
    alphas_bar_sqrt = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)  # last -> 0, first kept
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def make_schedule(
    kind: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
    zero_terminal_snr: bool = False,
) -> NoiseSchedule:
    """Build a schedule in float64 and store it as float32.

    :param kind: "linear" (DDPM: 1e-4 .. 0.02), "scaled_linear" (Stable Diffusion / PixArt: linear
        in sqrt(beta), 0.00085 .. 0.012) or "cosine" (Nichol & Dhariwal 2021, betas capped at 0.999).
    :param zero_terminal_snr: apply the Lin et al. 2024 rescale so that \\bar\\alpha_{N-1} = 0,
        i.e. x_T is pure noise and carries no information about the data.
    """
    check_choice("schedule", kind, SCHEDULES)
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    n = num_train_timesteps
    if kind == "linear":
        betas = torch.linspace(beta_start or 1e-4, beta_end or 0.02, n, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace((beta_start or 0.00085) ** 0.5, (beta_end or 0.012) ** 0.5, n, dtype=torch.float64) ** 2
    else:  # cosine: \bar\alpha(t) = cos^2(((t/N + s) / (1 + s)) * pi/2), s = 0.008
        steps = torch.arange(n + 1, dtype=torch.float64) / n
        alphas_bar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - alphas_bar[1:] / alphas_bar[:-1]).clamp(max=0.999)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    assert torch.all((betas > 0) & (betas <= 1)), "betas must lie in (0, 1]"
    assert torch.all(alphas_cumprod[1:] <= alphas_cumprod[:-1]), "abar must be non-increasing"
    return NoiseSchedule(betas.float(), alphas_cumprod.float())


def sampling_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "trailing",
                       original_steps: int = 50) -> torch.Tensor:
    """The T timesteps a T-step sampler visits, descending (diffusers' conventions; Lin et al. 2024
    Table 2). For N = 1000, T = 4: trailing 999 749 499 249; leading (offset 1) 751 501 251 1;
    linspace 999 666 333 0; lcm 999 759 499 259. Only "leading" does not start at t = N - 1.

    "lcm" is the grid a latent consistency model was distilled on (Luo et al. 2023): `original_steps`
    timesteps k-1, 2k-1, ..., N-1 with k = N // original_steps, and T of them taken at evenly spaced
    indices from the top, exactly as diffusers' LCMScheduler.set_timesteps(T) with its
    original_inference_steps (50 for PixArt-delta, LCM-LoRA, LCM-Dreamshaper)."""
    check_choice("spacing", spacing, SPACINGS)
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    n = num_train_timesteps
    if spacing == "trailing":
        steps = np.round(np.arange(n, 0, -n / num_steps)) - 1
    elif spacing == "leading":
        steps = np.arange(num_steps)[::-1] * (n // num_steps) + 1  # diffusers' steps_offset = 1
    elif spacing == "lcm":
        if not num_steps <= original_steps <= n:
            raise ValueError(f"the lcm spacing needs num_steps <= original_steps <= {n}, got {num_steps}, {original_steps}")
        grid = (np.arange(1, original_steps + 1) * (n // original_steps) - 1)[::-1]  # the distillation grid
        steps = grid[np.floor(np.linspace(0, original_steps, num_steps, endpoint=False)).astype(np.int64)]
    else:
        steps = np.linspace(0, n - 1, num_steps).round()[::-1]
    return torch.from_numpy(steps.astype(np.int64).copy())


def start_leakage(schedule: NoiseSchedule, num_steps: int, spacing: str = "trailing") -> float:
    """How much signal the sampler's start point still carries: sqrt(\\bar\\alpha) at its first
    timestep. > 0 means a model trained on x_t was never trained on the pure noise it is sampled
    from — the paper's "information leakage in x_T". 0 with zero terminal SNR and trailing spacing."""
    t_first = sampling_timesteps(schedule.num_train_timesteps, num_steps, spacing)[0]
    return float(schedule.alphas_cumprod[t_first].sqrt())


# --------------------------------------------------------------------------------------------------
# 2. Parameterisations: what the network outputs, and how to read x0 and eps from it
# --------------------------------------------------------------------------------------------------

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")  # diffusers' names


def _expand(coefficient: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) so it broadcasts against a (B, C, H, W) tensor."""
    return coefficient.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def split_prediction(output, z_t, alpha, sigma, prediction_type: str):
    """Read (x0, eps) from a network output, given z_t = alpha x0 + sigma eps.

    alpha, sigma: (B,) or broadcastable tensors. v-prediction: v = alpha eps - sigma x0
    (Salimans & Ho 2022), so x0 = alpha z_t - sigma v and eps = sigma z_t + alpha v.
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    alpha, sigma = _expand(alpha, z_t), _expand(sigma, z_t)
    if prediction_type == "epsilon":
        eps = output
        x0 = (z_t - sigma * eps) / alpha  # undefined where alpha = 0: see check_prediction_type
    elif prediction_type == "sample":
        x0 = output
        eps = (z_t - alpha * x0) / sigma
    else:
        x0 = alpha * z_t - sigma * output
        eps = sigma * z_t + alpha * output
    return x0, eps


def prediction_target(x0, eps, alpha, sigma, prediction_type: str) -> torch.Tensor:
    """What the network should output for a given (x0, eps): the regression target of training."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    return _expand(alpha, x0) * eps - _expand(sigma, x0) * x0


def check_prediction_type(prediction_type: str, schedule: NoiseSchedule) -> None:
    """Refuse epsilon-prediction under zero terminal SNR: at t = T, z_T = eps, so a perfect
    epsilon-predictor says nothing about x0 (x0 = (z - sigma eps) / alpha divides by 0)."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon" and schedule.zero_terminal_snr:
        raise ValueError(
            "prediction_type 'epsilon' cannot recover x0 at the last timestep of a zero-terminal-SNR "
            "schedule (alpha_T = 0); use 'v_prediction' or 'sample' (Lin et al. 2024, Sec. 3.2)"
        )


# --------------------------------------------------------------------------------------------------
# 3. The unrolled, differentiable few-step sampler (Alg. 1 lines 7-12)
# --------------------------------------------------------------------------------------------------

UPDATES = ("ddim", "lcm")


def consistency_scalings(t, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """(c_skip, c_out) of a consistency model's boundary condition (Song et al. 2023, Eq. 7; Luo et al.
    2023, Eq. 5): f(z_t, t) = c_skip(t) z_t + c_out(t) x0_hat(z_t, t) is the identity at t = 0.
    diffusers' LCMScheduler values (t scaled by 10, sigma_data 0.5): c_skip < 1e-5 from t = 19 on.

    :param t: a timestep (int) or a float tensor of them; returns two of the same kind."""
    scaled = t * timestep_scaling
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2) ** 0.5


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def guided_output(model, z, t, cond, uncond, guidance_scale: float) -> torch.Tensor:
    """One network evaluation, with classifier-free guidance (Ho & Salimans 2022) when scale != 1."""
    output = model(z, t, cond)
    if guidance_scale != 1.0:
        output_uncond = model(z, t, uncond)
        output = output_uncond + guidance_scale * (output - output_uncond)
    return output


CHECKPOINT_POLICIES = ("full", "selective")
_ATEN = torch.ops.aten
# What selective checkpointing keeps: the outputs of the ops that cost FLOPs (matmuls, convolutions,
# fused attention). Everything between them (norms, activations, elementwise arithmetic) is recomputed
# from those outputs in the backward pass — memory-bound work, a small share of a step's time.
SELECTIVE_SAVE_OPS = frozenset({
    _ATEN.mm.default, _ATEN.addmm.default, _ATEN.bmm.default, _ATEN.baddbmm.default, _ATEN.convolution.default,
    _ATEN._scaled_dot_product_flash_attention.default, _ATEN._scaled_dot_product_efficient_attention.default,
    _ATEN._scaled_dot_product_cudnn_attention.default, _ATEN._scaled_dot_product_flash_attention_for_cpu.default,
})


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective activation checkpointing (PyTorch's create_selective_checkpoint_contexts): keep the
    outputs of SELECTIVE_SAVE_OPS, recompute every other op in the backward pass."""
    return CheckpointPolicy.MUST_SAVE if op in SELECTIVE_SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def unrolled_sample(
    model: Denoiser,
    z_T: torch.Tensor,
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    prediction_type: str = "v_prediction",
    update: str = "ddim",
    eta: float = 0.0,
    spacing: str = "trailing",
    original_steps: int = 50,
    cond: Any = None,
    uncond: Any = None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    checkpoint: bool | str = False,
    backprop_steps: int | None = None,
) -> torch.Tensor:
    """Run a T-step sampler from z_T and return its output z0 — keeping the whole chain in the
    autograd graph, so a loss on z0 trains every step (the heart of E2EDiff).

    :param model: denoiser, model(z_t, t, cond) -> output (see `Denoiser`).
    :param z_T: (B, ...) starting noise (pure Gaussian noise, or a coupling's z_T).
    :param num_steps: T >= 1 network evaluations (NFE, doubled under guidance).
    :param update: "ddim" — Song et al. 2021 Eq. 12, deterministic for eta = 0, ancestral-like for
        eta > 0; "lcm" — predict x0 (through the consistency boundary condition), re-noise it to the
        next timestep with fresh noise (the LCM multistep sampler of the paper's base model, as
        diffusers' LCMScheduler.step; our reading of Alg. 1 line 9).
    :param spacing, original_steps: which timesteps (see `sampling_timesteps`; original_steps is the
        LCM grid of spacing "lcm").
    :param cond, uncond, guidance_scale: conditioning passed through to the model; with
        guidance_scale != 1 the model is also called with `uncond` (classifier-free guidance).
    :param generator: source of the fresh noise of "lcm" and eta > 0 (injectable for tests).
    :param checkpoint: recompute each step's activations in the backward pass instead of storing
        them (same gradients). False = store them all (plain backprop: activation memory ~ T steps);
        "full" (or True) = recompute the whole step (memory ~ one step, one extra forward per step);
        "selective" = keep the outputs of the matmuls, convolutions and attention of all T steps and
        recompute only the ops between them (SELECTIVE_SAVE_OPS; less recompute than "full", less
        memory than plain).
    :param backprop_steps: K — gradients flow only through the last K steps (DRaFT-K); earlier steps
        run without a graph. None = all steps.
    :returns: z0 (B, ...).
    """
    check_choice("update", update, UPDATES)
    check_prediction_type(prediction_type, schedule)
    if not torch.is_tensor(z_T) or z_T.dim() < 2 or not z_T.is_floating_point():
        raise ValueError(f"z_T must be a float tensor of shape (B, ...); got {getattr(z_T, 'shape', type(z_T))}")
    if num_steps < 1:
        raise ValueError(f"num_steps (T) must be >= 1, got {num_steps}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if backprop_steps is not None and not 1 <= backprop_steps <= num_steps:
        raise ValueError(f"backprop_steps must be in [1, num_steps={num_steps}] or None, got {backprop_steps}")
    if guidance_scale != 1.0 and uncond is None:
        raise ValueError("guidance_scale != 1 needs `uncond` (the null conditioning)")
    if checkpoint is True:
        checkpoint = "full"
    if checkpoint is not False:
        check_choice("checkpoint", checkpoint, CHECKPOINT_POLICIES)
    # "selective": the checkpoint keeps the outputs that selective_policy marks MUST_SAVE
    selective = partial(create_selective_checkpoint_contexts, selective_policy)
    policy = {"context_fn": selective} if checkpoint == "selective" else {}

    timesteps = sampling_timesteps(schedule.num_train_timesteps, num_steps, spacing, original_steps).tolist()
    alphas_cumprod = schedule.alphas_cumprod.to(z_T.device)
    first_graph_step = 0 if backprop_steps is None else num_steps - backprop_steps
    batch = z_T.shape[0]
    z = z_T
    for i, t in enumerate(timesteps):
        abar_t = alphas_cumprod[t]
        abar_prev = alphas_cumprod[timesteps[i + 1]] if i + 1 < num_steps else torch.ones_like(abar_t)  # final step lands on x0
        t_batch = torch.full((batch,), t, device=z.device, dtype=torch.long)
        # truncated backprop: the steps before the last K run without a graph, so they get no gradient
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= first_graph_step):
            if checkpoint and torch.is_grad_enabled():
                output = activation_checkpoint(guided_output, model, z, t_batch, cond, uncond, guidance_scale,
                                               use_reentrant=False, **policy)
            else:
                output = guided_output(model, z, t_batch, cond, uncond, guidance_scale)
            if i == 0 and output.shape != z.shape:
                raise ValueError(f"model returned shape {tuple(output.shape)} for input of shape {tuple(z.shape)}")
            output = output.to(z.dtype)  # the sampler's arithmetic stays in z's dtype under autocast
            alpha_t, sigma_t = abar_t.sqrt(), (1 - abar_t).sqrt()
            x0, eps = split_prediction(output, z, alpha_t.expand(batch), sigma_t.expand(batch), prediction_type)
            alpha_prev, sigma_prev = abar_prev.sqrt(), (1 - abar_prev).sqrt()
            if update == "lcm":
                # LCM multistep (Luo et al. 2023, Alg. 3): f = c_skip z + c_out x0_hat, then
                # z_{t-1} = alpha_{t-1} f + sigma_{t-1} xi
                c_skip, c_out = consistency_scalings(t)
                x0 = c_skip * z + c_out * x0
                z = alpha_prev * x0 + (sigma_prev * _randn_like(z, generator) if i + 1 < num_steps else 0)
            else:
                # DDIM (Song et al. 2021, Eq. 12 and 16); eta = 0 is the deterministic ODE step
                direction, noise_scale = _ddim_split(float(abar_t), float(abar_prev), eta)
                z = alpha_prev * x0 + direction * eps
                if eta > 0 and i + 1 < num_steps:
                    z = z + noise_scale * _randn_like(z, generator)
    return z


# --------------------------------------------------------------------------------------------------
# 4. Couplings: which noise z_T the sampler starts from for which target z0 (Alg. 1 line 6)
# --------------------------------------------------------------------------------------------------

COUPLINGS = ("independent", "inversion", "teacher")


def _ddim_split(abar_t: float, abar_prev: float, eta: float) -> tuple[float, float]:
    """How a DDIM step splits sigma_{t-1}: (the coefficient of the predicted eps, the std of the fresh
    noise), Song et al. 2021 Eq. 16: noise = eta (sigma_{t-1} / sigma_t) sqrt(1 - abar_t / abar_{t-1}),
    direction = sqrt(sigma_{t-1}^2 - noise^2). The direction is computed in float64 in the form
        (sigma_{t-1} / sigma_t) sqrt((1 - eta^2) sigma_t^2 + eta^2 abar_t sigma_{t-1}^2 / abar_{t-1}),
    a sum of non-negative terms: the subtraction cancels badly in float32 (eta = 1, abar_t = 0 under zero
    terminal SNR: 0 in exact arithmetic, ~1e-4 in float32)."""
    var_t, var_prev = 1.0 - abar_t, 1.0 - abar_prev
    if var_t <= 0.0:
        return 0.0, 0.0
    noise = eta * math.sqrt(var_prev / var_t * max(0.0, 1.0 - abar_t / abar_prev))
    direction = math.sqrt(var_prev / var_t * max(0.0, (1 - eta**2) * var_t + eta**2 * abar_t * var_prev / abar_prev))
    return direction, noise


def ddim_invert(
    model: Denoiser,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    prediction_type: str = "v_prediction",
    cond: Any = None,
) -> torch.Tensor:
    """Deterministic DDIM inversion (Song et al. 2021, Sec. 4.3; Dhariwal & Nichol 2021): run the
    probability-flow ODE forwards from x0 (at t = 0) through the trailing grid up to t = N - 1.
    Returns the z_T that the frozen model's DDIM sampler maps back to (approximately) x0. No grad."""
    check_prediction_type(prediction_type, schedule)
    grid = [0] + sampling_timesteps(schedule.num_train_timesteps, num_steps, "trailing").flip(0).tolist()
    alphas_cumprod = schedule.alphas_cumprod.to(x0.device)
    z = x0
    with torch.no_grad():
        for t, t_next in zip(grid[:-1], grid[1:]):
            t_batch = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
            abar_t, abar_next = alphas_cumprod[t], alphas_cumprod[t_next]
            x0_hat, eps = split_prediction(model(z, t_batch, cond).to(z.dtype), z, abar_t.sqrt().expand(len(z)), (1 - abar_t).sqrt().expand(len(z)), prediction_type)
            z = abar_next.sqrt() * x0_hat + (1 - abar_next).sqrt() * eps  # DDIM step, run backwards
    return z


def couple(
    coupling: str,
    target: torch.Tensor,
    *,
    base_model: Denoiser | None = None,
    schedule: NoiseSchedule | None = None,
    prediction_type: str = "v_prediction",
    cond: Any = None,
    inversion_steps: int = 25,
    teacher_steps: int = 50,
    generator: torch.Generator | None = None,
):
    """Pair noise with targets for end-to-end training. Returns (z_T, target).

    - "independent": z_T ~ N(0, I) independent of target (Alg. 1 as written; collapses under L1/L2).
    - "inversion":   z_T = DDIM inversion of target by the frozen base (a deterministic pairing).
    - "teacher":     z_T ~ N(0, I), target replaced by the frozen base's `teacher_steps`-step DDIM
                     sample from z_T (distillation; only target's shape is used).
    """
    check_choice("coupling", coupling, COUPLINGS)
    if coupling != "independent" and (base_model is None or schedule is None):
        raise ValueError(f"coupling {coupling!r} needs the frozen base_model and its schedule")
    if coupling == "inversion":
        return ddim_invert(base_model, target, schedule, inversion_steps, prediction_type=prediction_type, cond=cond), target
    z_T = _randn_like(target, generator)
    if coupling == "teacher":
        with torch.no_grad():
            target = unrolled_sample(base_model, z_T, schedule, teacher_steps, prediction_type=prediction_type, cond=cond)
    return z_T, target


# --------------------------------------------------------------------------------------------------
# 5. Reconstruction losses d(z0, z0_hat) (Alg. 1 line 13, Eq. 7)
# --------------------------------------------------------------------------------------------------

LOSS_TERMS = ("l1", "l2", "lpips")
LPIPS_BACKBONE_FILES = {  # what torchvision downloads into $TORCH_HOME/hub/checkpoints
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018) through the `lpips` package, as a frozen per-sample loss.

    Inputs are images in [-1, 1], (B, C, H, W) with C in {1, 3}; 1-channel images are repeated to 3
    and images smaller than `min_size` are upsampled (AlexNet needs >= 32 px). The network stays in
    eval mode, never requires grad, and so never enters an optimiser — gradients flow to the inputs.

    :param random_backbone: use a randomly initialised backbone with the real linear heads, for offline
        smoke runs (tests; the notebook and benchmarks say so when they fall back to it): an untrained
        backbone is not a perceptual metric.
    """

    def __init__(self, net: str = "alex", random_backbone: bool = False, min_size: int = 64):
        super().__init__()
        check_choice("LPIPS net", net, tuple(LPIPS_BACKBONE_FILES))
        import lpips  # imported here so the module works without it when LPIPS is not used

        if not random_backbone:
            path = os.path.join(torch.hub.get_dir(), "checkpoints", LPIPS_BACKBONE_FILES[net])
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"LPIPS needs the torchvision {net} backbone weights '{LPIPS_BACKBONE_FILES[net]}' at {path} "
                    f"($TORCH_HOME/hub/checkpoints; TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')}). "
                    f"Fetch it once with network access (e.g. `python -c \"import lpips; lpips.LPIPS(net='{net}')\"`) "
                    "or copy the file there. (random_backbone=True, --lpips-random-backbone: offline smoke runs only.)"
                )
        with warnings.catch_warnings():  # lpips 0.1.4 still calls torchvision's deprecated `pretrained=`
            warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
            self.net = lpips.LPIPS(net=net, pnet_rand=random_backbone, verbose=False)
        self.min_size = min_size
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always eval: LPIPS is a fixed metric

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) x2 in [-1, 1] -> (B,) perceptual distance."""
        if a.shape != b.shape or a.dim() != 4 or a.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS wants two (B, 1|3, H, W) images of one shape; got {tuple(a.shape)} and {tuple(b.shape)}")
        if a.shape[1] == 1:
            a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
        if min(a.shape[-2:]) < self.min_size:
            scale = self.min_size / min(a.shape[-2:])
            a = F.interpolate(a, scale_factor=scale, mode="bilinear", align_corners=False)
            b = F.interpolate(b, scale_factor=scale, mode="bilinear", align_corners=False)
        return self.net(a.float(), b.float()).flatten()


class FeatureDistance(nn.Module):
    """LPIPS's distance (Zhang et al. 2018, Eq. 1) in the features of any frozen network, with every
    layer and channel weighted 1 (the lpips package's `lpips=False` baseline): at each layer l,
    unit-normalise the feature vector of each position over channels, take the squared difference,
    sum over channels, average over positions; sum over layers. For a backbone of one's own (the toy
    trains one on its data), where no trained linear heads exist.

    :param network: a module whose `features(x)` returns a list of (B, C_l, H_l, W_l) activations; frozen
        here (eval, no grad), and gradients flow to the inputs. Inputs are what it was trained on (the
        toy's: images in [-1, 1]).
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FeatureDistance":
        return super().train(False)  # always eval: a fixed metric

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(B, ...) x2 -> (B,) distance."""
        if a.shape != b.shape:
            raise ValueError(f"FeatureDistance wants two inputs of one shape; got {tuple(a.shape)} and {tuple(b.shape)}")
        distance = a.new_zeros(a.shape[0])
        for feature_a, feature_b in zip(self.network.features(a), self.network.features(b), strict=True):
            unit_a = feature_a / (feature_a.norm(dim=1, keepdim=True) + 1e-10)  # (B, C_l, H_l, W_l)
            unit_b = feature_b / (feature_b.norm(dim=1, keepdim=True) + 1e-10)
            distance = distance + (unit_a - unit_b).pow(2).sum(1).flatten(1).mean(1)
        return distance


def reconstruction_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: dict[str, float] | None = None,
    lpips: nn.Module | None = None,
    pred_image: torch.Tensor | None = None,
    target_image: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The hybrid distance of Eq. 7: lambda_1 L1 + lambda_2 L2 + lambda_LPIPS LPIPS, per sample.

    :param pred, target: (B, ...) sampler output and target (images, or latents).
    :param weights: {"l1": ., "l2": ., "lpips": .}; terms with weight 0 are not computed.
    :param lpips: the perceptual distance, (B, ...) x2 -> (B,): an `LPIPS`, or a `FeatureDistance`.
    :param pred_image, target_image: where LPIPS should see images other than pred/target (decoded
        latents, real pixels); default pred/target themselves.
    :returns: {"l1": (B,), "l2": (B,), "lpips": (B,) — those with weight > 0 — and "recon": (B,)}.
    """
    weights = {"l2": 1.0} if weights is None else weights
    for name in weights:
        check_choice("loss term", name, LOSS_TERMS)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"at least one loss weight must be > 0, got {weights}")
    terms = {}
    if weights.get("l1", 0) > 0:
        terms["l1"] = (pred - target).abs().flatten(1).mean(1)
    if weights.get("l2", 0) > 0:
        terms["l2"] = (pred - target).pow(2).flatten(1).mean(1)
    if weights.get("lpips", 0) > 0:
        if lpips is None:
            raise ValueError("an 'lpips' weight > 0 needs a perceptual distance (e2ediff.LPIPS or e2ediff.FeatureDistance)")
        a = pred if pred_image is None else pred_image
        b = target if target_image is None else target_image
        terms["lpips"] = lpips(a, b)
    terms["recon"] = sum(weights[name] * value for name, value in terms.items())
    return terms


# --------------------------------------------------------------------------------------------------
# 6. Adversarial loss (Eq. 8: L_total = L_recon + lambda_GAN L_GAN)
# --------------------------------------------------------------------------------------------------

GAN_KINDS = ("hinge", "non_saturating")


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017; taming-transformers' NLayerDiscriminator): 4x4 convs, LeakyReLU
    0.2, N(0, 0.02) init, one logit per patch. GroupNorm instead of BatchNorm, so its output does
    not depend on the batch (and DDP ranks need no synced statistics)."""

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, num_classes: int | None = None):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers

        def block(c_in, c_out, stride):
            return [nn.Conv2d(c_in, c_out, 4, stride, 1, bias=False), nn.GroupNorm(math.gcd(32, c_out), c_out), nn.LeakyReLU(0.2)]

        layers = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = base_channels
        for n in range(1, num_layers):
            layers += block(channels, base_channels * min(2**n, 8), stride=2)
            channels = base_channels * min(2**n, 8)
        layers += block(channels, base_channels * min(2**num_layers, 8), stride=1)
        layers += [nn.Conv2d(base_channels * min(2**num_layers, 8), 1, 4, 1, 1)]
        self.main = nn.Sequential(*layers)
        # projection (Miyato & Koyama 2018): logit += <embed(c), features>, one class vector per label
        # (label num_classes: the "no class" token of classifier-free guidance)
        self.class_embed = nn.Embedding(num_classes + 1, base_channels * min(2**num_layers, 8)) if num_classes else None
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, 0.02)

    @staticmethod
    def min_side(num_layers: int) -> int:
        """Smallest H, W for which a patch logit comes out of `num_layers` layers: each strided 4x4 conv
        (pad 1) maps h to floor(h / 2), each of the two last (stride 1) to h - 1, so floor(h / 2^n) - 2 >= 1."""
        return 3 * 2**num_layers

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W), and the class labels (B,) of a conditional discriminator -> (B, 1, h, w) patch logits."""
        if x.dim() != 4 or min(x.shape[-2:]) < self.min_side(self.num_layers):
            raise ValueError(
                f"PatchDiscriminator with num_layers={self.num_layers} needs (B, C, H, W) inputs with H, W >= "
                f"{self.min_side(self.num_layers)}; got {tuple(x.shape)} (use fewer layers for small images)"
            )
        if (cond is None) != (self.class_embed is None):
            raise ValueError("a conditional PatchDiscriminator (num_classes) needs class labels, an unconditional one takes none")
        if self.class_embed is None:
            return self.main(x)
        features = self.main[:-1](x)  # (B, C', h + 1, w + 1)
        projection = (self.class_embed(cond)[:, :, None, None] * features).sum(1, keepdim=True)
        # averaged over the same 4x4 window (stride 1, pad 1) that the last conv reads: one term per patch logit
        return self.main[-1](features) + F.avg_pool2d(projection, 4, stride=1, padding=1, count_include_pad=False)


DISC_KINDS = ("patch", "basefeat")
FEATURE_TIME_DISTRIBUTIONS = ("logit_normal", "uniform")


def default_feature_layers(base: nn.Module, count: int = 4) -> tuple[str, ...]:
    """Names in base.named_modules() whose outputs a BaseFeatureDiscriminator reads, found by the
    blocks' container names: a transformer (diffusers' PixArt: `transformer_blocks`, a ModuleList, also
    under a wrapper as `transformer.transformer_blocks`) gives `count` evenly spaced blocks, the last
    one included; the toy UNet (toy_nets.UNet: `down`, `middle`, `up`) every `down` block, one per
    resolution (the finest holds the detail a critic needs: see BaseFeatureDiscriminator), and its `middle`
    blocks. Anything else: pass the names yourself."""
    containers = dict(base.named_modules())
    for name, module in containers.items():
        if name.split(".")[-1] == "transformer_blocks" and isinstance(module, nn.ModuleList):
            chosen = np.unique(np.linspace(0, len(module) - 1, min(count, len(module))).round().astype(int))
            return tuple(f"{name}.{i}" for i in chosen)
    if isinstance(containers.get("down"), nn.ModuleList) and isinstance(containers.get("middle"), nn.ModuleList):
        return (*(f"down.{i}" for i in range(len(containers["down"]))),
                *(f"middle.{i}" for i in range(len(containers["middle"]))))
    raise ValueError(f"no default feature layers for a {type(base).__name__} (neither `transformer_blocks` nor "
                     "`down` and `middle`): name them (feature_layers, from base.named_modules())")


class BaseFeatureDiscriminator(nn.Module):
    """A discriminator that sees with the frozen base's eyes (LADD, Sauer et al. 2024; SANA-Sprint;
    DMD2's head on diffusion features): re-noise the input to x_t = alpha_t x + sigma_t eps (Eq. 1's
    forward process), run the FROZEN base denoiser on it (the `Denoiser` protocol, base(x_t, t, cond)),
    and read the outputs of the blocks named in `feature_layers` through forward hooks. A small trainable
    conv head per block keeps the feature map's spatial layout (LADD's and SANA-Sprint's heads): 3x3 conv
    to `head_channels`, GroupNorm, LeakyReLU 0.2, 3x3 conv to one logit per position, a PatchGAN on the
    base's features. Token features (B, N, D) of a transformer are laid back on their (h, w) patch grid
    first. Output: every head's logits, flattened and concatenated, (B, K): discriminator_loss and
    generator_adversarial_loss average them, so each position of each block counts once. (A head that
    pools or normalises each sample over its positions first discards what a probe reads: measured on
    digits, a linear probe's real-vs-fake AUC of 0.96 on the raw features fell to 0.74 through such a head.)

    t: `logit_normal` (LADD) draws t / N = sigmoid(loc + scale n), n ~ N(0, 1); `uniform` draws t from
    all N timesteps. The default loc is low, -3 (median t ~ 47 of 1000: near-clean inputs, the noise a
    regulariser): re-noising washes out the detail a few-step student gets wrong, so the critic's sight falls
    with t. Measured on digits (held-out AUC after 150 critic steps against a small base's 4-step samples, the
    default blocks of a toy UNet): loc +1 (median t ~ 730) stayed at chance, -1 reached 0.65, -2 0.75, -3 0.86,
    -4 0.91 — with the last down and the middle blocks; with every down block too, -3 reached 0.96 (SANA-Sprint's
    critic uses -0.6 on 1024-px latents, where noise hides less). Real and fake inputs get their own t and eps
    (drawn from `generator`, or the global RNG).

    The base is frozen and hidden: kept in a dict, not as a submodule, so parameters(), state_dict(),
    requires_grad_(), train() and DDP see the heads only (the optimiser updates the heads, a checkpoint
    holds the heads, not a copy of the base); the caller puts the base on the heads' device. Gradients do
    flow through the base to the input x, so the generator's adversarial loss reaches its sample. The hooks
    record only during this module's forward: the same base may also run the couplings.
    With `train_backbone` (DMD2's critic sits on a diffusion network that is itself trained), the heads read
    a trainable deep copy of the base instead, registered as `backbone`: the optimiser then updates it with
    the heads and a checkpoint holds it; `base` itself stays frozen and untouched.

    :param base: the frozen denoiser (every parameter requires_grad=False), in eval mode.
    :param feature_layers: names of its submodules to read (see `default_feature_layers`).
    :param example: an input like the ones to judge (1, C, H, W) and `example_cond` its condition for the
        base: one probing forward finds each block's feature shape, to size its head.
    :param num_classes: class-label projection (Miyato & Koyama 2018) on every head: logit += <embed(c),
        hidden feature> per position; the condition `cond` then must be the labels (label num_classes: no class).
    :param train_backbone: read a trainable copy of the base, trained with the heads (see above).
    :param head_channels: width of each head's hidden conv.
    """

    def __init__(self, base: nn.Module, alphas_cumprod: torch.Tensor, feature_layers: Iterable[str],
                 example: torch.Tensor, example_cond: Any = None, *, num_classes: int | None = None,
                 t_distribution: str = "logit_normal", t_loc: float = -3.0, t_scale: float = 1.0,
                 generator: torch.Generator | None = None, train_backbone: bool = False, head_channels: int = 64):
        super().__init__()
        check_choice("timestep distribution", t_distribution, FEATURE_TIME_DISTRIBUTIONS)
        if any(p.requires_grad for p in base.parameters()):
            raise ValueError("a BaseFeatureDiscriminator needs a frozen base: base.requires_grad_(False) (a copy of "
                             "the pretrained denoiser, not the model being trained)")
        self.feature_layers = tuple(feature_layers)
        network = copy.deepcopy(base).requires_grad_(True) if train_backbone else base
        modules = dict(network.eval().named_modules())
        missing = [name for name in self.feature_layers if name not in modules]
        if missing or not self.feature_layers:
            raise ValueError(f"feature layers {missing or '()'} not in the base; e.g. {default_feature_layers(base)}")
        self.train_backbone = train_backbone
        if train_backbone:  # registered: parameters() and state_dict() hold the trainable copy with the heads
            self.backbone = network
        else:
            self.frozen = {"base": network}  # a dict: not registered, so not a parameter, buffer or state_dict entry
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().float().clone(), persistent=False)
        self.t_distribution, self.t_loc, self.t_scale, self.generator = t_distribution, t_loc, t_scale, generator
        self.features, self.recording = {}, False
        for name in self.feature_layers:
            modules[name].register_forward_hook(self._hook(name))
        with torch.no_grad():
            maps = [self._as_map(f, example) for f in self._base_features(example, example_cond)]
        width = head_channels
        self.heads = nn.ModuleList()
        for feature in maps:
            channels = feature.shape[1]
            hidden = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(math.gcd(32, width), width),
                                   nn.LeakyReLU(0.2))
            embed = nn.Embedding(num_classes + 1, width) if num_classes else None
            self.heads.append(nn.ModuleDict({"hidden": hidden, "logit": nn.Conv2d(width, 1, 3, padding=1),
                                             **({"embed": embed} if embed else {})}))
        self.num_classes = num_classes

    @staticmethod
    def _as_map(feature: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A block's output as a feature map (B, C, h, w): 4-D as it is; transformer tokens (B, N, D) laid on
        their patch grid, h / w = H / W of the input x (patches in row-major order, as PixArt's)."""
        if feature.dim() == 4:
            return feature
        if feature.dim() != 3:
            raise ValueError(f"feature of shape {tuple(feature.shape)}: need (B, C, H, W) or (B, N, D)")
        tokens, height, width = feature.shape[1], x.shape[-2], x.shape[-1]
        h = round(math.sqrt(tokens * height / width))
        if h * (tokens // h) != tokens:
            raise ValueError(f"{tokens} tokens do not tile an input of {height}x{width}")
        return feature.transpose(1, 2).reshape(len(feature), -1, h, tokens // h)

    def _hook(self, name: str):
        def record(module, inputs, output):
            if self.recording:
                self.features[name] = output[0] if isinstance(output, (tuple, list)) else output
        return record

    def _base_features(self, x_t: torch.Tensor, cond: Any, t: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The base's block outputs at (x_t, t), in `feature_layers` order."""
        if t is None:
            t = torch.full((len(x_t),), len(self.alphas_cumprod) - 1, device=x_t.device, dtype=torch.long)
        self.features, self.recording = {}, True
        try:
            (self.backbone if self.train_backbone else self.frozen["base"])(x_t, t, cond)
        finally:
            self.recording = False
        features, self.features = [self.features[name] for name in self.feature_layers], {}
        return features

    def sample_timesteps(self, batch: int, device) -> torch.Tensor:
        """(B,) long t in [0, N) from the stated distribution."""
        num_timesteps, source = len(self.alphas_cumprod), self.generator.device if self.generator else device
        if self.t_distribution == "uniform":
            return torch.randint(0, num_timesteps, (batch,), device=source, generator=self.generator).to(device)
        n = torch.randn(batch, device=source, generator=self.generator)
        u = torch.sigmoid(self.t_loc + self.t_scale * n)  # LADD's logit-normal
        return (u * num_timesteps).long().clamp(0, num_timesteps - 1).to(device)

    def forward(self, x: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """x (B, C, H, W) in the base's input space, cond the base's condition (the class labels when
        num_classes) -> (B, K) logits, every head's positions concatenated."""
        if self.num_classes and cond is None:
            raise ValueError("a conditional BaseFeatureDiscriminator (num_classes) needs class labels")
        t = self.sample_timesteps(len(x), x.device)
        abar = self.alphas_cumprod[t].to(x.dtype)
        noise = _randn_like(x, self.generator)
        x_t = _expand(abar.sqrt(), x) * x + _expand((1 - abar).sqrt(), x) * noise  # x_t = alpha_t x + sigma_t eps
        logits = []
        for feature, parts in zip(self._base_features(x_t, cond, t), self.heads):
            h = parts["hidden"](self._as_map(feature, x).float())  # (B, width, h, w)
            logit = parts["logit"](h)  # (B, 1, h, w): one logit per position
            if "embed" in parts:  # projection: <embed(c), h> per position, scaled as a mean over channels
                logit = logit + (parts["embed"](cond)[:, :, None, None] * h).mean(1, keepdim=True)
            logits.append(logit.flatten(1))
        return torch.cat(logits, dim=1)


def base_feature_discriminator(base: nn.Module, schedule: NoiseSchedule, config: EndToEndConfig, example: torch.Tensor,
                               example_cond: Any = None, num_classes: int | None = None) -> BaseFeatureDiscriminator:
    """The BaseFeatureDiscriminator that `config`'s disc_* options describe, on the frozen `base`."""
    layers = default_feature_layers(base) if config.disc_feature_layers == "auto" else \
        tuple(name.strip() for name in config.disc_feature_layers.split(","))
    return BaseFeatureDiscriminator(base, schedule.alphas_cumprod, layers, example, example_cond, num_classes=num_classes,
                                    t_distribution=config.disc_t_distribution, t_loc=config.disc_t_loc,
                                    t_scale=config.disc_t_scale, train_backbone=config.disc_train_backbone)


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Per-sample discriminator loss. hinge: relu(1 - D(x)) + relu(1 + D(G)) (Lim & Ye 2017);
    non_saturating: softplus(-D(x)) + softplus(D(G)) (Goodfellow et al. 2014)."""
    check_choice("GAN loss", kind, GAN_KINDS)
    if kind == "hinge":
        loss = F.relu(1 - logits_real).flatten(1).mean(1) + F.relu(1 + logits_fake).flatten(1).mean(1)
    else:
        loss = F.softplus(-logits_real).flatten(1).mean(1) + F.softplus(logits_fake).flatten(1).mean(1)
    return loss


def generator_adversarial_loss(logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Per-sample generator loss: hinge -D(G) ; non_saturating softplus(-D(G))."""
    check_choice("GAN loss", kind, GAN_KINDS)
    return (-logits_fake if kind == "hinge" else F.softplus(-logits_fake)).flatten(1).mean(1)


MAX_ADAPTIVE_GAN_WEIGHT = 1e4  # taming-transformers' clamp


def adaptive_gan_weight(recon_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """Esser et al. 2021 (taming-transformers) Eq. 7: ||grad_L recon|| / (||grad_L gan|| + 1e-4),
    the gradients taken w.r.t. the generator's last layer L; clamped to [0, 1e4], detached. Under DDP these
    gradients are this rank's (autograd.grad is not all-reduced): each rank weighs its GAN term differently,
    so DDP then differs from one process on the global batch, which a fixed weight does not."""
    recon_grad = torch.autograd.grad(recon_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (recon_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, MAX_ADAPTIVE_GAN_WEIGHT).detach()


def r1_penalty(discriminator: nn.Module, real: torch.Tensor, *cond) -> tuple[torch.Tensor, torch.Tensor]:
    """R1 (Mescheder et al. 2018): ||grad_x D(x)||^2 on real data, per sample. Returns (penalty, logits).
    `cond`: the labels of a conditional discriminator (none for an unconditional one)."""
    real = real.detach().requires_grad_(True)
    logits = discriminator(real, *cond)
    (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1), logits


@torch.no_grad()
def critic_auc(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor, *cond, seed: int = 0) -> float:
    """The critic's health: the area under the ROC curve of its mean logit per sample, real (label 1) against
    fake (label 0), on a held-out batch; 0.5 = it cannot tell them apart, 1 = it always can. Its loss is a poor
    gauge (with R1 it stays near 2 ln 2 while the AUC is 0.96). A base-feature critic's re-noising is drawn
    from `seed` (the caller's random state is left as it was), so the same weights give the same AUC.
    `cond`: the labels (or the base's condition) for the real and then the fake batch, when the critic reads them."""
    from torchmetrics.functional.classification import binary_auroc
    with torch.random.fork_rng(devices=[real.device] if real.device.type == "cuda" else []):
        torch.manual_seed(seed)
        scores = torch.cat([discriminator(batch, *labels).flatten(1).float().mean(1)
                            for batch, labels in ((real, cond[:1]), (fake, cond[1:]))])
    labels = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))]).long().to(scores.device)
    return float(binary_auroc(scores, labels))


class GANLoss:
    """The adversarial term of Eq. 8, its discriminator and the discriminator's AdamW, with a start step.

    Before `start_step` nothing touches the discriminator (no forward, no autograd.grad), so the
    unrolled graph is not held for it: the steps before it are a warm-up on the reconstruction loss
    alone. The steps before `config.critic_warmup_steps` are the other warm-up: the critic's alone
    (train_step updates only the discriminator, on the frozen student's samples), so that L_GAN reaches
    the generator from a critic that already tells its samples from data. `discriminator` is a
    PatchDiscriminator on images, or a BaseFeatureDiscriminator on the denoiser's own inputs (latents: EndToEndLoss then hands it the sampler's output z0, not the decoded
    image, and train_step the data's z0), which gets the condition `cond` for its base; train_step
    updates it `config.disc_steps` times per generator step. `discriminator` may be DDP-wrapped: the
    generator pass uses the bare module (no
    discriminator gradients are wanted there), the discriminator step the wrapper. With
    `config.disc_conditional` both passes hand the discriminator the class labels `cond`.
    """

    def __init__(self, discriminator: nn.Module, config: EndToEndConfig):
        self.discriminator, self.kind, self.weight = discriminator, config.gan_kind, config.gan_weight
        self.start_step, self.adaptive, self.r1_weight = config.gan_start_step, config.gan_adaptive, config.r1_weight
        self.conditional = config.disc_conditional
        self.steps = config.disc_steps  # discriminator updates per generator step
        self.warmup_steps = config.critic_warmup_steps  # critic-only steps first
        # a base-feature discriminator reads the denoiser's own space (latents) and needs the base's condition
        self.on_latents = isinstance(unwrap(discriminator), BaseFeatureDiscriminator)
        self.optimizer = torch.optim.AdamW(discriminator.parameters(), lr=config.disc_lr, betas=(0.5, 0.9))

    def active(self, step: int) -> bool:
        return step >= self.start_step

    def warming_up(self, step: int) -> bool:
        """Whether `step` trains the critic alone (the generator frozen)."""
        return step < self.warmup_steps

    def labels(self, cond) -> tuple:
        """The discriminator's extra arguments: (cond,) when it is conditional or reads the base (whose
        condition it is), () otherwise."""
        if self.conditional and cond is None:
            raise ValueError("disc_conditional needs class labels (cond) for the discriminator")
        return (cond,) if self.conditional or self.on_latents else ()

    def generator_loss(self, fake: torch.Tensor, recon_loss: torch.Tensor, step: int, last_layer: torch.Tensor | None = None,
                       cond: Any = None) -> dict:
        """{"gan": scalar generator loss, "gan_weight": its weight (adaptive x weight), "gan_total": product}."""
        bare = unwrap(self.discriminator)
        bare.requires_grad_(False)  # no discriminator grads from the generator's loss
        try:
            gan = generator_adversarial_loss(bare(fake, *self.labels(cond)), self.kind).mean()
        finally:
            bare.requires_grad_(True)
        weight = fake.new_tensor(self.weight)
        if self.adaptive:
            if last_layer is None:
                raise ValueError("the adaptive GAN weight needs the generator's last layer (a `last_layer` property)")
            weight = weight * adaptive_gan_weight(recon_loss, gan, last_layer)
        return {"gan": gan, "gan_weight": weight, "gan_total": weight * gan}

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor, step: int, cond: Any = None) -> dict:
        """{"disc": scalar loss to minimise, "r1": mean penalty, "logits_real", "logits_fake": means}.
        `real` are data samples, `fake` the sampler's outputs for the same labels `cond`."""
        labels = self.labels(cond)
        if self.r1_weight > 0:
            penalty, logits_real = r1_penalty(self.discriminator, real, *labels)
        else:
            penalty, logits_real = real.new_zeros(()), self.discriminator(real.detach(), *labels)
        logits_fake = self.discriminator(fake.detach(), *labels)
        loss = discriminator_loss(logits_real, logits_fake, self.kind).mean() + 0.5 * self.r1_weight * penalty.mean()
        return {"disc": loss, "r1": penalty.mean().detach(), "logits_real": logits_real.mean().detach(), "logits_fake": logits_fake.mean().detach()}


# --------------------------------------------------------------------------------------------------
# 7. EMA of the weights (Alg. 1 line 15)
# --------------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied): a frozen deep copy
    updated with theta_EMA <- tau_n theta_EMA + (1 - tau_n) theta after the n-th update (n = 0, 1, ...).

    Without warm-up tau_n = `decay` (the paper's 0.95): right when the copy starts from a trained model, as
    in fine-tuning (Alg. 1 line 1), whose EMA then averages ~1 / (1 - tau) recent steps from step 0.
    With `warmup=True`, tau_n = min(decay, (1 + n) / (10 + n)) (TensorFlow's ExponentialMovingAverage with
    num_updates; diffusers' EMAModel default): for pretraining from a random init. Without it the init's
    weight decays only as decay^n (0.999^1500 = 22 % after 1,500 steps: a crippled base); with it, it is
    gone within ten steps (its share, prod_k (1 + k) / (10 + k) = 9! n! / (n + 9)!, is 1e-5 after 10
    updates), and tau reaches 0.95 at n = 170, 0.99 at n = 890, 0.999 at n = 8,990.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay, self.warmup, self.num_updates = float(decay), bool(warmup), 0
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """tau_n of the next update."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        model = unwrap(model)
        weight = 1.0 - self.current_decay()
        for ema_param, param in zip(self.module.parameters(), model.parameters(), strict=True):
            ema_param.lerp_(param.detach().to(ema_param.dtype), weight)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])  # checkpoints from before the warm-up existed hold neither key below
        self.warmup, self.num_updates = bool(state.get("warmup", False)), int(state.get("num_updates", 0))
        self.module.load_state_dict(state["module"])


# --------------------------------------------------------------------------------------------------
# 8. The standard diffusion loss (Ho et al. 2020), to pretrain the base model
# --------------------------------------------------------------------------------------------------


def diffusion_loss(model: Denoiser, x0: torch.Tensor, schedule: NoiseSchedule, prediction_type: str = "v_prediction",
                   cond: Any = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random timestep per sample: z_t = alpha_t x0 + sigma_t eps, regress the parameterisation's
    target. Returns the per-sample MSE, (B,)."""
    check_prediction_type(prediction_type, schedule)
    gen_device = generator.device if generator is not None else x0.device
    t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=generator, device=gen_device).to(x0.device)
    eps = _randn_like(x0, generator)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    z_t = _expand(alpha, x0) * x0 + _expand(sigma, x0) * eps
    target = prediction_target(x0, eps, alpha, sigma, prediction_type)
    output = model(z_t, t, cond)
    if output.shape != target.shape:
        raise ValueError(f"model returned shape {tuple(output.shape)} for input of shape {tuple(z_t.shape)}")
    return (output.float() - target.float()).pow(2).flatten(1).mean(1)


# --------------------------------------------------------------------------------------------------
# 9. Algorithm 1: the end-to-end training step (lines 6-15, Eq. 7-8, and the discriminator's update)
# --------------------------------------------------------------------------------------------------


def option(default, why: str, choices: tuple | None = None, valid: str = ""):
    """A config field with a one-line "why", and what it may hold: `choices`, or `valid`, a range that
    reads as it is written: "> 0", ">= 1", "[0, 1]", "[0, 1)" (each element of a tuple), "non-empty".
    Floats must also be finite. The scripts turn each field into a flag with that help."""
    return field(default=default, metadata={"help": why, **({"choices": choices} if choices else {}),
                                            **({"valid": valid} if valid else {})})


class OptionError(ValueError):
    """A config field holds a value it cannot take. `name` is the field, so that a command line can
    name its flag: "--finetune-lr: got nan, need a finite number > 0"."""

    def __init__(self, name: str, value: Any, need: str):
        self.name, self.value, self.need = name, value, need
        super().__init__(f"{name}: got {value!r}, need {need}")


def _within(value, valid: str) -> bool:
    """Whether a number satisfies a `valid` range of option()."""
    if valid.startswith(">="):
        return value >= float(valid[2:])
    if valid.startswith(">"):
        return value > float(valid[1:])
    low, high = (float(bound) for bound in valid[1:-1].split(","))
    return (low <= value if valid[0] == "[" else low < value) and (value <= high if valid[-1] == "]" else value < high)


def check_options(config) -> None:
    """OptionError for the first field of `config` whose value its option() declaration rules out:
    not one of its choices, not finite, outside its `valid` range, an empty tuple or string."""
    for f in fields(config):
        value, valid = getattr(config, f.name), f.metadata.get("valid", "")
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            raise OptionError(f.name, value, "one of " + ", ".join(map(repr, f.metadata["choices"])))
        if valid == "non-empty" or isinstance(value, tuple) and not value:
            if not value:
                raise OptionError(f.name, value, "a non-empty value")
            continue
        numbers = value if isinstance(value, tuple) else (value,)
        if isinstance(value, bool) or not all(isinstance(n, (int, float)) for n in numbers):
            continue
        need = ("comma-separated integers, each" if isinstance(value, tuple) else
                "a finite number" if isinstance(f.default, float) else "an integer")
        need += "" if not valid else f" {valid}" if valid[0] == ">" else f" in {valid}"
        if not all(math.isfinite(n) and (not valid or _within(n, valid)) for n in numbers):
            raise OptionError(f.name, value, need)


@dataclass(frozen=True)
class Rule:
    """A constraint across options: a combination that a later part of a run would reject with a
    ValueError (the sampler's grid, a network's input size, a missing condition), checked instead when
    the config is made, before a model is built or a file written. `holds(config)` says whether the
    config keeps it; `breaking` is one combination of values that breaks it (tests/test_bad_inputs.py
    runs each rule's `breaking` through each script, so a new rule gets its bad-input case for free)."""

    fields: tuple[str, ...]  # the options involved, the one to change first
    need: str  # what they must satisfy together, as a user reads it
    holds: Callable[[Any], bool]
    breaking: dict[str, Any]


class RuleError(OptionError):
    """A config breaks a Rule; the scripts name every flag of it: "--a 5 with --b 4: need ..."."""

    def __init__(self, rule: Rule, config):
        self.rule, self.config = rule, config
        super().__init__(rule.fields[0], getattr(config, rule.fields[0], None), rule.need)


def check_rules(config, rules: tuple[Rule, ...]) -> None:
    """RuleError for the first rule in `rules` that `config` breaks."""
    for rule in rules:
        if not rule.holds(config):
            raise RuleError(rule, config)


def _needs_reconstruction(config) -> bool:
    return max(config.loss_weights.values()) > 0 or (config.gan_weight > 0 and not config.gan_adaptive)


# check_prediction_type (section 2) as a Rule, for the scripts' configs, which hold both fields
PREDICTION_RULE = Rule(("prediction_type", "zero_terminal_snr"), "--prediction-type v_prediction or sample with zero "
                       "terminal SNR (epsilon cannot recover x0 where alpha_T = 0)",
                       lambda c: not (c.prediction_type == "epsilon" and c.zero_terminal_snr),
                       {"prediction_type": "epsilon", "zero_terminal_snr": True})

END_TO_END_RULES = (
    Rule(("backprop_steps", "num_steps"), "backprop_steps <= num_steps (the last K of the T sampler steps)",
         lambda c: c.backprop_steps <= c.num_steps, {"backprop_steps": 4, "num_steps": 2}),
    Rule(("l2_weight", "l1_weight", "lpips_weight", "gan_weight", "gan_adaptive"),
         "a reconstruction weight > 0 (l1, l2 or lpips), or a GAN weight with --no-gan-adaptive (the adaptive "
         "weight is a ratio to the reconstruction loss)", _needs_reconstruction,
         {"l1_weight": 0.0, "l2_weight": 0.0, "lpips_weight": 0.0}),
    Rule(("original_steps", "num_steps", "spacing"), "num_steps <= original_steps with spacing lcm (T steps are "
         "picked from the LCM's grid of original_steps)",
         lambda c: c.spacing != "lcm" or c.num_steps <= c.original_steps,
         {"spacing": "lcm", "original_steps": 2, "num_steps": 4}),
    Rule(("checkpoint_policy", "grad_checkpoint"), "grad_checkpoint on with checkpoint_policy selective (the policy "
         "says what a checkpointed step keeps)", lambda c: c.grad_checkpoint or c.checkpoint_policy == "full",
         {"checkpoint_policy": "selective", "grad_checkpoint": False}),
    Rule(("disc_feature_layers", "disc_kind"), "--disc-feature-layers auto unless --disc-kind basefeat (only its heads "
         "read the base's blocks)", lambda c: c.disc_kind == "basefeat" or c.disc_feature_layers == "auto",
         {"disc_feature_layers": "middle.0", "disc_kind": "patch"}),
    Rule(("disc_t_distribution", "disc_kind"), "--disc-t-distribution logit_normal unless --disc-kind basefeat (only it "
         "re-noises its inputs)", lambda c: c.disc_kind == "basefeat" or c.disc_t_distribution == "logit_normal",
         {"disc_t_distribution": "uniform", "disc_kind": "patch"}),
    Rule(("critic_warmup_steps", "gan_weight"), "--critic-warmup-steps 0 without a GAN term (--gan-weight > 0): it "
         "warms up the discriminator", lambda c: c.critic_warmup_steps == 0 or c.gan_weight > 0,
         {"critic_warmup_steps": 10, "gan_weight": 0.0}),
    Rule(("disc_train_backbone", "disc_kind"), "--no-disc-train-backbone unless --disc-kind basefeat (only it has a "
         "backbone: the base)", lambda c: c.disc_kind == "basefeat" or not c.disc_train_backbone,
         {"disc_train_backbone": True, "disc_kind": "patch"}),
)


@dataclass
class EndToEndConfig:
    """Every option of the end-to-end method. The defaults are the paper's recipe (PixArt-delta, Sec. 4.1
    and Table 2); train_toy.py and train_t2i.py embed this config, change the defaults that the toy
    needs, and turn each field into a flag of the same name."""

    # the unrolled sampler (Alg. 1 lines 7-12)
    num_steps: int = option(4, "T: PixArt-delta is distilled to 4 LCM steps, and the paper trains at 4 NFE",
                            valid=">= 1")
    update: str = option("lcm", "the base's update: predict x0, re-noise it (our reading of Alg. 1 line 9)", UPDATES)
    eta: float = option(0.0, "DDIM stochasticity, with --update ddim only; 0 = the deterministic ODE step",
                         valid="[0, 1]")
    spacing: str = option("trailing", "trailing timesteps start at t = N-1, from pure noise: no leakage; lcm = an LCM's "
                          "distillation grid; auto = the script picks the base's own (train_t2i)", SPACINGS + ("auto",))
    original_steps: int = option(50, "the LCM grid's size with --spacing lcm: LCMScheduler's original_inference_steps",
                                 valid=">= 1")
    # the coupling (Alg. 1 line 6)
    coupling: str = option("independent", "Alg. 1 as written; inversion or teacher make L1/L2 well-posed", COUPLINGS)
    inversion_steps: int = option(25, "DDIM-inversion steps of the frozen base (--coupling inversion)", valid=">= 1")
    teacher_steps: int = option(50, "frozen-base DDIM steps that make each target (--coupling teacher)", valid=">= 1")
    # the reconstruction loss (Alg. 1 line 13, Eq. 7)
    l1_weight: float = option(0.0, "lambda_L1; Table 2: L2 does slightly better", valid=">= 0")
    l2_weight: float = option(1.0, "lambda_L2 (Table 2: L2 + LPIPS is the paper's best, FID 25.27)", valid=">= 0")
    lpips_weight: float = option(1.0, "lambda_LPIPS on images (Table 2's best); the paper gives no relative weight",
                                valid=">= 0")
    lpips_net: str = option("alex", "LPIPS backbone (AlexNet: the LPIPS authors' default)", tuple(LPIPS_BACKBONE_FILES))
    lpips_random_backbone: bool = option(False, "offline smoke runs only: random backbone, real heads")
    # the adversarial term (Eq. 8) and its discriminator
    gan_weight: float = option(0.0, "lambda_GAN; 0 = no discriminator (Table 2: +GAN costs FID, 25.74 vs 25.27)",
                              valid=">= 0")
    gan_kind: str = option("hinge", "GAN objective (taming-transformers' hinge)", GAN_KINDS)
    gan_start_step: int = option(0, "step at which the GAN term and the discriminator's updates start", valid=">= 0")
    gan_adaptive: bool = option(True, "scale lambda_GAN by the ratio of gradient norms (taming-transformers); under "
                                "DDP each rank takes the ratio on its own micro-batch, so the ranks' weights differ and "
                                "the step is not one process's on the global batch (--no-gan-adaptive: it is)")
    r1_weight: float = option(0.0, "R1 penalty on the discriminator's real inputs; 0 = off", valid=">= 0")
    disc_lr: float = option(1e-4, "discriminator AdamW lr, betas (0.5, 0.9) as taming; not given in the paper",
                           valid="> 0")
    disc_channels: int = option(64, "PatchGAN width (taming's NLayerDiscriminator)", valid=">= 1")
    disc_layers: int = option(3, "PatchGAN strided layers (taming's default)", valid=">= 1")
    disc_conditional: bool = option(False, "projection discriminator on class labels (Miyato & Koyama 2018): it "
                                    "judges p(x | c), not p(x); class-conditional toy only")
    disc_kind: str = option("patch", "patch = the paper's PatchGAN on images, trained from scratch; basefeat = trainable "
                            "heads on the frozen base's features of re-noised inputs in its own space (LADD, DMD2)",
                            DISC_KINDS)
    disc_feature_layers: str = option("auto", "basefeat: comma-separated names in the base's named_modules() to read; "
                                      "auto = the UNet's down and middle blocks, or 4 evenly spaced PixArt blocks",
                                      valid="non-empty")
    disc_t_distribution: str = option("logit_normal", "basefeat: t of the re-noised input; logit_normal (LADD) "
                                      "t/N = sigmoid(loc + scale n), uniform = every timestep alike",
                                      FEATURE_TIME_DISTRIBUTIONS)
    disc_t_loc: float = option(-3.0, "basefeat, logit_normal: location; -3 = near-clean (median t/N ~ 0.05): the "
                               "critic's held-out AUC falls with t (digits, 150 steps: 0.96 at -3, 0.65 at -1, chance at "
                               "+1; see BaseFeatureDiscriminator)")
    disc_t_scale: float = option(1.0, "basefeat, logit_normal: scale of the logit", valid="> 0")
    disc_train_backbone: bool = option(False, "basefeat: also train a copy of the base under the heads (DMD2's critic "
                                       "is a trained diffusion network; one more model and its AdamW state in memory); "
                                       "default: the frozen base, heads only (LADD)")
    disc_steps: int = option(1, "discriminator updates per generator step (DMD2: 5), on the step's detached samples",
                             valid=">= 1")
    critic_warmup_steps: int = option(0, "the first N steps train the discriminator alone (the generator frozen, fakes "
                                      "from it), so L_GAN starts from a critic that sees; not in the paper, whose critic "
                                      "starts cold (a PatchGAN needs ~100 critic steps to separate digits)", valid=">= 0")
    # the update (Alg. 1 lines 14-15)
    grad_clip: float = option(1.0, "gradient-norm clip; not in the paper: diffusers' scripts' default; 0 = off",
                              valid=">= 0")
    ema_decay: float = option(0.95, "tau of Alg. 1 line 15 (paper); no warm-up: the EMA starts as the pretrained "
                              "model, so averaging from step 0 is right (EMA)", valid="[0, 1]")
    # memory
    grad_checkpoint: bool = option(True, "recompute each sampler step in backward: same gradients, ~1/T the memory")
    checkpoint_policy: str = option("full", "what --grad-checkpoint recomputes: full = the whole step (least memory); "
                                    "selective = all but the matmul, convolution and attention outputs, which are kept "
                                    "for all T steps (less recompute, more memory)", CHECKPOINT_POLICIES)
    backprop_steps: int = option(0, "0 = backprop through all T steps (paper); K = only the last K (DRaFT-K)",
                            valid=">= 0")

    def __post_init__(self):
        check_options(self)
        check_rules(self, END_TO_END_RULES)

    @property
    def loss_weights(self) -> dict[str, float]:
        return {"l1": self.l1_weight, "l2": self.l2_weight, "lpips": self.lpips_weight}

    def sampler_options(self, prediction_type: str) -> dict:
        """The unrolled_sample keyword arguments these options fix."""
        if self.spacing == "auto":
            raise ValueError("spacing 'auto' is for the scripts to resolve (train_t2i: the base's own grid)")
        return dict(prediction_type=prediction_type, update=self.update, eta=self.eta, spacing=self.spacing,
                    original_steps=self.original_steps, checkpoint=self.grad_checkpoint and self.checkpoint_policy,
                    backprop_steps=self.backprop_steps or None)


class EndToEndLoss(nn.Module):
    """Alg. 1 lines 7-13 and Eq. 8 for one batch: unroll the T-step sampler from z_T, with gradients,
    and put the loss on its output: L_total = d(z0, z0_hat) + lambda_GAN L_GAN.

    A module so that DDP can wrap it: DDP then sees one forward per step, and the per-step activation
    checkpointing runs inside that forward. Only `denoiser` is a submodule; the frozen LPIPS network, the
    decoder and the discriminator stay outside DDP's view.

    :param denoiser: the trained model, denoiser(z_t, t, cond) -> output (see `Denoiser`).
    :param decode: latents -> images for LPIPS and the discriminator (a VAE decoder); None in pixel space.
    """

    def __init__(self, denoiser: nn.Module, schedule: NoiseSchedule, config: EndToEndConfig,
                 prediction_type: str = "v_prediction", *, lpips: nn.Module | None = None, gan: GANLoss | None = None,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None, guidance_scale: float = 1.0):
        super().__init__()
        check_prediction_type(prediction_type, schedule)
        if config.lpips_weight > 0 and lpips is None:
            raise ValueError("an lpips_weight > 0 needs a perceptual distance (e2ediff.LPIPS or e2ediff.FeatureDistance)")
        self.denoiser, self.schedule, self.config = denoiser, schedule, config
        self.sampler_options = dict(config.sampler_options(prediction_type), guidance_scale=guidance_scale)
        self.helpers = {"lpips": lpips, "gan": gan, "decode": decode}  # a dict: not registered as submodules

    def as_image(self, z: torch.Tensor) -> torch.Tensor:
        """z as an image, without gradients: decoded, or z itself in pixel space."""
        decode = self.helpers["decode"]
        if decode is None:
            return z
        with torch.no_grad():
            return decode(z)

    @torch.no_grad()
    def critic_sample(self, z_T: torch.Tensor, cond: Any = None, uncond: Any = None) -> torch.Tensor:
        """The sampler's output from z_T as the discriminator reads it (an image, or z0 for a base-feature
        critic), without gradients: the critic warm-up's fakes and the held-out AUC's."""
        z0 = unrolled_sample(self.denoiser, z_T, self.schedule, self.config.num_steps, cond=cond, uncond=uncond,
                             **{**self.sampler_options, "checkpoint": False, "backprop_steps": None})
        gan = self.helpers["gan"]
        return z0 if gan is not None and gan.on_latents else self.as_image(z0)

    def forward(self, z_T: torch.Tensor, target: torch.Tensor, step: int, cond: Any = None, uncond: Any = None,
                target_image: torch.Tensor | None = None) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
        """:returns: loss (scalar), logs (detached scalars), and the output and the target as the
        discriminator's step reads them (B, C, H, W): images, decoded, or z0 and the target themselves
        when there is no decoder (or neither LPIPS nor the GAN needs images, or the GAN reads latents)."""
        lpips, gan, decode = self.helpers["lpips"], self.helpers["gan"], self.helpers["decode"]
        z0 = unrolled_sample(self.denoiser, z_T, self.schedule, self.config.num_steps, cond=cond, uncond=uncond,
                             **self.sampler_options)  # Alg. 1 lines 7-12
        gan_on = gan is not None and gan.active(step)
        on_latents = gan_on and gan.on_latents  # a base-feature discriminator reads z0 itself
        image = decode(z0) if decode is not None and (lpips is not None or gan_on and not on_latents) else z0
        if image is z0:
            target_image = target
        elif target_image is None:
            target_image = self.as_image(target)
        loss, logs = z0.new_zeros(()), {}
        if max(self.config.loss_weights.values()) > 0:  # Alg. 1 line 13, Eq. 7
            terms = reconstruction_loss(z0, target, self.config.loss_weights, lpips, image, target_image)
            loss = terms["recon"].mean()
            logs = {name: value.mean().detach() for name, value in terms.items()}
        if gan_on:  # Eq. 8
            adversarial = gan.generator_loss(z0 if on_latents else image, loss, step,
                                             getattr(self.denoiser, "last_layer", None), cond)
            loss = loss + adversarial["gan_total"]
            logs.update({name: value.detach() for name, value in adversarial.items()})
        logs["loss"] = loss.detach()
        if on_latents:
            return loss, logs, z0, target
        return loss, logs, image, target_image


def train_step(
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA,
    micro_batches: Iterable[dict],
    step: int,
    *,
    accumulation: int | None = None,
    base_model: Denoiser | None = None,
    gan: GANLoss | None = None,
    no_sync: Callable[[nn.Module], Any] | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Alg. 1 lines 6-15 for one optimiser step, with the discriminator's update. Returns the logs,
    averaged over the micro-batches, and the gradient norm before clipping.

    :param loss_fn: an `EndToEndLoss`, or DDP wrapping one.
    :param micro_batches: G dicts (G > 1: gradient accumulation), each with "target" (B, ...) = z0 of
        Alg. 1 line 4, and optional "cond", "uncond" (line 5), "images" (the target's pixels when the
        sampler works in a latent space), "z_T" (a cached coupling, e.g. the inversion of "target") and
        "paired_target" (with "z_T", when the cached coupling's target is not the data: a teacher's sample
        from z_T; "target" stays the data, the discriminator's real samples).
        A list, or any iterable (a generator that encodes each micro-batch only when it is needed).
    :param accumulation: G, when `micro_batches` has no len().
    :param base_model: the frozen pretrained model that the inversion and teacher couplings run.
    :param no_sync: module -> context in which its gradients are not all-reduced (DDP's no_sync); used
        on every micro-batch but the last. None in a single process.
    :param autocast: () -> the mixed-precision context for the forward passes.
    :param generator: source of the couplings' noise z_T (injectable for reproducible runs).
    """
    inner = unwrap(loss_fn)
    config, schedule = inner.config, inner.schedule
    prediction_type = inner.sampler_options["prediction_type"]
    count = len(micro_batches) if accumulation is None else accumulation
    warming = gan is not None and gan.warming_up(step)  # the critic's warm-up: it alone trains this step
    gan_on, totals, seen, critic_batches = gan is not None and (warming or gan.active(step)), {}, 0, []

    def critic_backward(real, fake, cond, sync):
        """The discriminator's loss on one micro-batch, backpropagated (DDP syncs on the last); returns it."""
        with (contextlib.nullcontext() if sync else no_sync(gan.discriminator)), autocast():
            disc = gan.discriminator_loss(real, fake, step, cond)["disc"]
            (disc / count).backward()
        return disc.detach()
    for batch in micro_batches:
        sync = seen == count - 1 or no_sync is None  # DDP all-reduces the gradients once, after the last
        target, cond = batch["target"], batch.get("cond")
        data = target  # z0 of the data: the discriminator's real samples, whatever the coupling makes the target
        if batch.get("z_T") is not None:  # a cached coupling
            z_T = batch["z_T"]
            if batch.get("paired_target") is not None:
                target = batch["paired_target"]
        else:  # Alg. 1 line 6: the coupling pairs noise z_T with the target
            with autocast():
                z_T, target = couple(config.coupling, target, base_model=base_model, schedule=schedule, cond=cond,
                                     prediction_type=prediction_type, inversion_steps=config.inversion_steps,
                                     teacher_steps=config.teacher_steps, generator=generator)
        # a teacher's target is the base's sample, not the data: its image is decoded from it
        target_image = batch.get("images") if config.coupling != "teacher" else None
        if warming:  # the generator frozen: no loss, no graph; its samples are the critic's fakes
            logs, fake, real = {}, inner.critic_sample(z_T, cond, batch.get("uncond")), None
        else:
            with (contextlib.nullcontext() if sync else no_sync(loss_fn)), autocast():
                loss, logs, fake, real = loss_fn(z_T, target, step, cond, batch.get("uncond"), target_image)  # 7-13
                (loss / count).backward()
        if gan_on:  # the discriminator's own step: data (as images) vs the sampler's detached outputs
            if gan.on_latents:  # a base-feature discriminator: the data's z0 vs the sampler's z0
                real = data
            elif batch.get("images") is not None:
                real = batch["images"]
            elif config.coupling == "teacher" or real is None:  # a teacher's sample is no data: show the data
                real = inner.as_image(data)
            logs["disc"] = critic_backward(real, fake.detach(), cond, sync)
            if gan.steps > 1:  # kept for the extra updates below
                critic_batches.append((real, fake.detach(), cond, sync))
        for name, value in logs.items():
            totals[name] = totals.get(name, 0.0) + float(value) / count
        seen += 1
    if seen != count:
        raise ValueError(f"expected {count} micro-batches (accumulation), got {seen}")
    if warming:  # no generator update and no EMA update: the student is what the critic warms up against
        for update in range(gan.steps):
            if update:  # DMD2's extra critic updates, on this step's data and samples
                for batch in critic_batches:
                    critic_backward(*batch)
            gan.optimizer.step()
            gan.optimizer.zero_grad(set_to_none=True)
        return {**totals, "critic_warmup": 1.0}
    parameters = inner.denoiser.parameters()
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip or float("inf"))
    optimizer.step()  # Alg. 1 line 14
    optimizer.zero_grad(set_to_none=True)
    if gan_on:
        gan.optimizer.step()
        gan.optimizer.zero_grad(set_to_none=True)
        for _ in range(gan.steps - 1):  # DMD2's extra critic updates, on this step's data and detached samples
            for batch in critic_batches:
                critic_backward(*batch)
            gan.optimizer.step()
            gan.optimizer.zero_grad(set_to_none=True)
    ema.update(inner.denoiser)  # Alg. 1 line 15
    return {**totals, "grad_norm": float(grad_norm)}


if __name__ == "__main__":
    # A 10-second tour: the leakage numbers, then one unrolled end-to-end step on random data.
    for zero_snr in (False, True):
        schedule = make_schedule("scaled_linear", zero_terminal_snr=zero_snr)
        row = ", ".join(f"{s}: {start_leakage(schedule, 4, s):.4f}" for s in SPACINGS)
        print(f"scaled_linear zero_terminal_snr={zero_snr!s:5}  sqrt(abar) at the 4-step sampler's start -> {row}")
    torch.manual_seed(0)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 64), nn.SiLU(), nn.Linear(64, 2))

        def forward(self, z, t, cond=None):
            return self.net(torch.cat([z, (t.float() / 1000)[:, None]], dim=1))

    model, config = Toy(), EndToEndConfig(update="ddim", lpips_weight=0.0)
    loss_fn = EndToEndLoss(model, make_schedule("linear", zero_terminal_snr=True), config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    logs = train_step(loss_fn, optimizer, EMA(model, config.ema_decay), [{"target": torch.randn(64, 2)}], step=0)
    print(f"one 4-step end-to-end step: loss {logs['loss']:.4f}, gradient norm {logs['grad_norm']:.4f}")
