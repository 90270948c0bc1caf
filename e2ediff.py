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

    train_step() runs lines 6-15 for one optimiser step; EndToEndConfig holds every option, the paper's
    values as defaults. Read the module top to bottom: its nine sections follow the paper's order, from
    the noise schedule to Algorithm 1. The base-feature critic lives in critics.py, the perceptual
    distances in perceptual.py, the activation checkpointing of the sampler's steps in selective_checkpoint.py.

Two readings the paper leaves open (README.md says why, with the measurements):
    - Alg. 1 line 6 draws z_T independently of z0 (`coupling="independent"`): under L1/L2 the optimum ignores
      z_T and outputs the mean (samples collapse); `inversion` (the frozen base's DDIM inversion of z0) and
      `teacher` (the target is the base's many-step sample from z_T) make it well posed. The GAN term's real
      samples are data under every coupling.
    - Alg. 1 line 9's noise term: we read it as the base's (an LCM's) update, x0 re-noised with fresh noise
      (`update="lcm"`); deterministic DDIM (`update="ddim"`) is the alternative.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from selective_checkpoint import CHECKPOINT_POLICIES, checkpointed

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
"""model(z_t (B, ...), t (B,) long in [0, N), cond) -> output shaped like z_t."""


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (DDP keeps it as .module), or the module itself."""
    return getattr(module, "module", module)


def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(map(repr, choices))}")


# --- 1. Noise schedule (variance preserving: z_t = alpha_t x0 + sigma_t eps, alpha_t^2 + sigma_t^2 = 1) ---

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


# --- 2. Parameterisations: what the network outputs, and how to read x0 and eps from it -----------

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


# --- 3. The unrolled, differentiable few-step sampler (Alg. 1 lines 7-12) -------------------------

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


def _ddim_split(abar_t: float, abar_prev: float, eta: float) -> tuple[float, float]:
    """A DDIM step's split of sigma_{t-1} (Song et al. 2021, Eq. 16): (the predicted eps's coefficient
    sqrt(sigma_{t-1}^2 - noise^2), the fresh noise's std eta (sigma_{t-1} / sigma_t) sqrt(1 - abar_t / abar_{t-1})).
    The coefficient is computed in float64 as a sum of non-negative terms, since the subtraction cancels
    badly in float32 (eta = 1 under zero terminal SNR: 0 in exact arithmetic, ~1e-4 in float32)."""
    var_t, var_prev = 1.0 - abar_t, 1.0 - abar_prev
    if var_t <= 0.0:
        return 0.0, 0.0
    noise = eta * math.sqrt(var_prev / var_t * max(0.0, 1.0 - abar_t / abar_prev))
    direction = math.sqrt(var_prev / var_t * max(0.0, (1 - eta**2) * var_t + eta**2 * abar_t * var_prev / abar_prev))
    return direction, noise


def ddim_step(z, x0, eps, t, abar_t, abar_prev, *, eta=0.0, last=False, generator=None) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12 and 16): z_prev = alpha_prev x0 + direction eps, plus fresh noise when
    eta > 0 (not on the last step); eta = 0 is the deterministic ODE step."""
    direction, noise_scale = _ddim_split(float(abar_t), float(abar_prev), eta)
    z_prev = abar_prev.sqrt() * x0 + direction * eps
    return z_prev + noise_scale * _randn_like(z, generator) if eta > 0 and not last else z_prev


def lcm_step(z, x0, eps, t, abar_t, abar_prev, *, eta=0.0, last=False, generator=None) -> torch.Tensor:
    """LCM multistep (Luo et al. 2023, Alg. 3; diffusers' LCMScheduler.step): f = c_skip z + c_out x0_hat, the
    consistency boundary condition, then z_prev = alpha_prev f + sigma_prev xi with fresh noise xi (none on
    the last step). Our reading of Alg. 1 line 9."""
    c_skip, c_out = consistency_scalings(t)
    f = c_skip * z + c_out * x0
    return abar_prev.sqrt() * f + ((1 - abar_prev).sqrt() * _randn_like(z, generator) if not last else 0)


UPDATE_STEPS = {"ddim": ddim_step, "lcm": lcm_step}  # one function per update rule; unrolled_sample loops
UPDATES = tuple(UPDATE_STEPS)


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

    :param model: denoiser, model(z_t, t, cond) -> output; z_T: (B, ...) noise (or a coupling's z_T);
        num_steps: T >= 1 network evaluations (doubled under guidance).
    :param update: "ddim" (ddim_step) or "lcm" (lcm_step: the paper's base's update, our reading of line 9).
    :param spacing, original_steps: which timesteps (`sampling_timesteps`).
    :param cond, uncond, guidance_scale: passed to the model; guidance_scale != 1: classifier-free guidance.
    :param generator: the fresh noise of "lcm" and of eta > 0 (injectable for tests).
    :param checkpoint: recompute each step's activations in backward (same gradients). False = store them
        (memory ~ T steps); "full" (True) = recompute the step (memory ~ one step, one more forward per
        step); "selective" = keep the matmul, convolution and attention outputs of all T steps, recompute
        the ops between them (selective_checkpoint.SELECTIVE_SAVE_OPS).
    :param backprop_steps: K = gradients through the last K steps only (DRaFT-K); None = all.
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
    checkpoint = "full" if checkpoint is True else checkpoint
    if checkpoint is not False:
        check_choice("checkpoint", checkpoint, CHECKPOINT_POLICIES)

    def evaluate(z, t):
        """One (guided) network evaluation, its activations recomputed in backward when checkpointing."""
        if checkpoint and torch.is_grad_enabled():
            output = checkpointed(guided_output, model, z, t, cond, uncond, guidance_scale, policy=checkpoint)
        else:
            output = guided_output(model, z, t, cond, uncond, guidance_scale)
        if output.shape != z.shape:
            raise ValueError(f"model returned shape {tuple(output.shape)} for input of shape {tuple(z.shape)}")
        return output.to(z.dtype)  # the sampler's arithmetic stays in z's dtype under autocast

    timesteps = sampling_timesteps(schedule.num_train_timesteps, num_steps, spacing, original_steps).tolist()
    alphas_cumprod, step = schedule.alphas_cumprod.to(z_T.device), UPDATE_STEPS[update]
    first_graph_step = 0 if backprop_steps is None else num_steps - backprop_steps
    z, batch = z_T, z_T.shape[0]
    for i, t in enumerate(timesteps):
        last = i + 1 == num_steps
        abar_t = alphas_cumprod[t]
        abar_prev = torch.ones_like(abar_t) if last else alphas_cumprod[timesteps[i + 1]]  # the last lands on x0
        # truncated backprop (DRaFT-K): the steps before the last K run without a graph, so get no gradient
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= first_graph_step):
            output = evaluate(z, torch.full((batch,), t, device=z.device, dtype=torch.long))
            x0, eps = split_prediction(output, z, abar_t.sqrt().expand(batch), (1 - abar_t).sqrt().expand(batch),
                                       prediction_type)
            z = step(z, x0, eps, t, abar_t, abar_prev, eta=eta, last=last, generator=generator)
    return z


# --- 4. Couplings: which noise z_T the sampler starts from for which target z0 (Alg. 1 line 6) ----

COUPLINGS = ("independent", "inversion", "teacher")


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
            x0_hat, eps = split_prediction(model(z, t_batch, cond).to(z.dtype), z, abar_t.sqrt().expand(len(z)),
                                           (1 - abar_t).sqrt().expand(len(z)), prediction_type)
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


# --- 5. Reconstruction losses d(z0, z0_hat) (Alg. 1 line 13, Eq. 7) -------------------------------

LOSS_TERMS = ("l1", "l2", "lpips")
LPIPS_NETS = ("alex", "vgg", "squeeze")  # the lpips package's backbones (perceptual.LPIPS)


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
    :param lpips: the perceptual distance, (B, ...) x2 -> (B,): perceptual.LPIPS, or perceptual.FeatureDistance.
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
            raise ValueError("an 'lpips' weight > 0 needs a perceptual distance (perceptual.LPIPS or perceptual.FeatureDistance)")
        a = pred if pred_image is None else pred_image
        b = target if target_image is None else target_image
        terms["lpips"] = lpips(a, b)
    terms["recon"] = sum(weights[name] * value for name, value in terms.items())
    return terms


# --- 6. Adversarial loss (Eq. 8: L_total = L_recon + lambda_GAN L_GAN) ----------------------------

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
            raise ValueError(f"PatchDiscriminator with num_layers={self.num_layers} needs (B, C, H, W) inputs with H, W >= "
                             f"{self.min_side(self.num_layers)}; got {tuple(x.shape)} (use fewer layers for small images)")
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


class GANLoss:
    """The adversarial term of Eq. 8, its discriminator and the discriminator's AdamW.

    Before `gan_start_step` nothing touches the discriminator; before `critic_warmup_steps` it trains alone,
    on the frozen student's samples, so that L_GAN starts from a critic that sees; train_step updates it
    `disc_steps` times per generator step. `discriminator`: a PatchDiscriminator on images, or a critic that
    `reads_latents` (critics.BaseFeatureDiscriminator: the denoiser's z0 and the base's `cond`). DDP-wrapped
    or not: the generator pass uses the bare module."""

    def __init__(self, discriminator: nn.Module, config: EndToEndConfig):
        self.discriminator, self.kind, self.weight = discriminator, config.gan_kind, config.gan_weight
        self.start_step, self.adaptive, self.r1_weight = config.gan_start_step, config.gan_adaptive, config.r1_weight
        self.conditional = config.disc_conditional
        self.steps = config.disc_steps  # discriminator updates per generator step
        self.warmup_steps = config.critic_warmup_steps  # critic-only steps first
        # a base-feature discriminator reads the denoiser's own space (latents) and needs the base's condition
        self.on_latents = getattr(unwrap(discriminator), "reads_latents", False)
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


# --- 7. EMA of the weights (Alg. 1 line 15) -------------------------------------------------------

class EMA:
    """Exponential moving average of a model's parameters (buffers copied), a frozen deep copy:
    theta_EMA <- tau_n theta_EMA + (1 - tau_n) theta after the n-th update.

    tau_n = `decay` (the paper's 0.95): right from a trained model, as in fine-tuning (Alg. 1 line 1).
    `warmup=True`: tau_n = min(decay, (1 + n) / (10 + n)) (diffusers' EMAModel default), for pretraining
    from a random init, whose weight would otherwise decay only as decay^n (0.999^1500 = 22 %).
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


# --- 8. The standard diffusion loss (Ho et al. 2020), to pretrain the base model ------------------

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


# --- 9. Algorithm 1: the end-to-end training step (lines 6-15, Eq. 7-8, and the discriminator's update) ---

def option(default, why: str, choices: tuple | None = None, valid: str = ""):
    """A config field with a one-line "why", and what it may hold: `choices`, or `valid`, a range that
    reads as it is written: "> 0", ">= 1", "[0, 1]", "[0, 1)" (each element of a tuple), "non-empty".
    Floats must also be finite. The scripts turn each field into a flag with that help."""
    return field(default=default, metadata={"help": why, **({"choices": choices} if choices else {}),
                                            **({"valid": valid} if valid else {})})


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
    lpips_net: str = option("alex", "LPIPS backbone (AlexNet: the LPIPS authors' default)", LPIPS_NETS)
    lpips_random_backbone: bool = option(False, "offline smoke runs only: random backbone, real heads")
    # the adversarial term (Eq. 8) and its discriminator
    gan_weight: float = option(0.0, "lambda_GAN; 0 = no discriminator (Table 2: +GAN costs FID, 25.74 vs 25.27)",
                              valid=">= 0")
    gan_kind: str = option("hinge", "GAN objective (taming-transformers' hinge)", GAN_KINDS)
    gan_start_step: int = option(0, "step at which the GAN term and the discriminator's updates start", valid=">= 0")
    gan_adaptive: bool = option(True, "scale lambda_GAN by the ratio of gradient norms (taming-transformers); under DDP each "
                                "rank takes it on its own micro-batch, so the step is not one process's on the global batch")
    r1_weight: float = option(0.0, "R1 penalty on the discriminator's real inputs; 0 = off", valid=">= 0")
    disc_lr: float = option(1e-4, "discriminator AdamW lr, betas (0.5, 0.9) as taming; not given in the paper",
                           valid="> 0")
    disc_channels: int = option(64, "PatchGAN width (taming's NLayerDiscriminator)", valid=">= 1")
    disc_layers: int = option(3, "PatchGAN strided layers (taming's default)", valid=">= 1")
    disc_conditional: bool = option(False, "projection discriminator on class labels (Miyato & Koyama 2018): it "
                                    "judges p(x | c), not p(x); class-conditional toy only")
    disc_kind: str = option("patch", "patch = the paper's PatchGAN on images, from scratch; basefeat = trainable heads on the "
                            "frozen base's features of re-noised inputs in its own space (LADD, DMD2)", DISC_KINDS)
    disc_feature_layers: str = option("auto", "basefeat: comma-separated names in the base's named_modules(); auto = the "
                                      "UNet's down and middle blocks, or 4 evenly spaced PixArt blocks", valid="non-empty")
    disc_t_distribution: str = option("logit_normal", "basefeat: t of the re-noised input; logit_normal (LADD): t/N = "
                                      "sigmoid(loc + scale n); uniform: every timestep alike", FEATURE_TIME_DISTRIBUTIONS)
    disc_t_loc: float = option(-3.0, "basefeat, logit_normal: location; -3 = near-clean (median t/N ~ 0.05): the critic's "
                               "held-out AUC falls with t (digits, 150 steps: 0.96 at -3, 0.65 at -1, chance at +1)")
    disc_t_scale: float = option(1.0, "basefeat, logit_normal: scale of the logit", valid="> 0")
    disc_train_backbone: bool = option(False, "basefeat: also train a copy of the base under the heads (DMD2; one more "
                                       "model and its AdamW state in memory); default: the frozen base, heads only (LADD)")
    disc_steps: int = option(1, "discriminator updates per generator step (DMD2: 5), on the step's detached samples",
                             valid=">= 1")
    critic_warmup_steps: int = option(0, "the first N steps train the discriminator alone on the frozen student's samples; "
                                      "not in the paper, whose critic starts cold (a PatchGAN needs ~100 steps)", valid=">= 0")
    # the update (Alg. 1 lines 14-15)
    grad_clip: float = option(1.0, "gradient-norm clip; not in the paper: diffusers' scripts' default; 0 = off",
                              valid=">= 0")
    ema_decay: float = option(0.95, "tau of Alg. 1 line 15 (paper); no warm-up: the EMA starts as the pretrained "
                              "model, so averaging from step 0 is right (EMA)", valid="[0, 1]")
    # memory
    grad_checkpoint: bool = option(True, "recompute each sampler step in backward: same gradients, ~1/T the memory")
    checkpoint_policy: str = option("full", "what --grad-checkpoint recomputes: full = the whole step (least memory); "
                                    "selective = all but matmul, conv and attention outputs (kept)", CHECKPOINT_POLICIES)
    backprop_steps: int = option(0, "0 = backprop through all T steps (paper); K = only the last K (DRaFT-K)",
                            valid=">= 0")

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

    A module so that DDP can wrap it (one forward per step, the activation checkpointing inside it); only
    `denoiser` is a submodule: LPIPS, the decoder and the discriminator stay outside DDP's view.

    :param denoiser: the trained model, denoiser(z_t, t, cond) -> output (see `Denoiser`).
    :param decode: latents -> images for LPIPS and the discriminator (a VAE decoder); None in pixel space.
    """

    def __init__(self, denoiser: nn.Module, schedule: NoiseSchedule, config: EndToEndConfig,
                 prediction_type: str = "v_prediction", *, lpips: nn.Module | None = None, gan: GANLoss | None = None,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None, guidance_scale: float = 1.0):
        super().__init__()
        check_prediction_type(prediction_type, schedule)
        if config.lpips_weight > 0 and lpips is None:
            raise ValueError("an lpips_weight > 0 needs a perceptual distance (perceptual.LPIPS or perceptual.FeatureDistance)")
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


def coupled_pair(batch: dict, loss: EndToEndLoss, base_model: Denoiser | None, generator: torch.Generator | None):
    """Alg. 1 line 6, one micro-batch: (z_T, target), coupled now or cached ("z_T"; "paired_target" if not the data)."""
    if batch.get("z_T") is not None:
        paired = batch.get("paired_target")
        return batch["z_T"], batch["target"] if paired is None else paired
    return couple(loss.config.coupling, batch["target"], base_model=base_model, schedule=loss.schedule,
                  cond=batch.get("cond"), prediction_type=loss.sampler_options["prediction_type"],
                  inversion_steps=loss.config.inversion_steps, teacher_steps=loss.config.teacher_steps, generator=generator)


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
    """Alg. 1 lines 6-15 for one optimiser step, with the discriminator's update (during the critic's
    warm-up, that alone). Returns the logs averaged over the micro-batches, and the gradient norm.

    :param loss_fn: an `EndToEndLoss`, or DDP wrapping one.
    :param micro_batches: G dicts (an iterable; G > 1: gradient accumulation), each with "target" (B, ...) = z0
        of line 4 (the data), optional "cond", "uncond" (line 5), "images" (the target's pixels, in a latent
        space) and a cached coupling (`coupled_pair`).
    :param accumulation: G, when `micro_batches` has no len(). base_model: the frozen model of the couplings.
    :param no_sync: module -> DDP's no_sync context, on every micro-batch but the last (None: one process).
    :param autocast: () -> the forward passes' mixed-precision context; generator: the couplings' noise.
    """
    inner = unwrap(loss_fn)
    config = inner.config
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
        data, cond = batch["target"], batch.get("cond")  # data: the discriminator's real z0, whatever the target
        with autocast():
            z_T, target = coupled_pair(batch, inner, base_model, generator)  # Alg. 1 line 6
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
    if not warming:  # the critic's warm-up updates neither the generator nor its EMA
        grad_norm = torch.nn.utils.clip_grad_norm_(inner.denoiser.parameters(), config.grad_clip or float("inf"))
        optimizer.step()  # Alg. 1 line 14
        optimizer.zero_grad(set_to_none=True)
    if gan_on:
        for update in range(gan.steps):
            if update:  # DMD2's extra critic updates, on this step's data and detached samples
                for batch in critic_batches:
                    critic_backward(*batch)
            gan.optimizer.step()
            gan.optimizer.zero_grad(set_to_none=True)
    if warming:
        return {**totals, "critic_warmup": 1.0}
    ema.update(inner.denoiser)  # Alg. 1 line 15
    return {**totals, "grad_norm": float(grad_norm)}

