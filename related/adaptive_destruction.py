"""adaptive_destruction — few-step, data-free diffusion samplers with a learned destruction process.

Reference implementation of "Adaptive Destruction Processes for Diffusion Samplers" (Gritsaev, Morozov,
Tamogashev, Tiapkin, Samsonov, Naumov, Vetrov, Malkin, 2025, arXiv 2506.01541). No official code exists;
the formulas follow the closest public code (GFNOrg/gfn-diffusion, mmacosha/d2e-stochastic-dynamics).

A diffusion sampler learns to sample an unnormalised density R(x) = exp(-E(x)) with no data: a T-step
Gaussian chain x_0 = 0 -> x_1 -> ... -> x_T (the generation process p_F) is trained so that its path
distribution matches R(x_T) times a destruction (noising) process p_B that runs x_T -> ... -> x_0 = 0.
The usual destruction is fixed (a Brownian bridge to 0); the paper learns it too, as unconstrained
Gaussian kernels, and trains both jointly. Read top to bottom:

    1. targets          GMM25, Funnel (d = 10), Many-Well (d = 32), ring8 (toy2d's ring): log R, exact
                        samples, true log Z
    2. kernels          Gaussian log-density; the Brownian bridge (the fixed destruction)
    3. the sampler      one MLP backbone with a time embedding, a generation head and a destruction head
    4. objectives       trajectory balance (learned log Z), VarGrad (batch log Z), TLM (destruction only)
    5. replay buffer    terminal states ranked by reward
    6. metrics          ELBO, EUBO, importance-sampled log Z, W1 to exact samples (POT), modes covered
    7. training         SamplerConfig, train()

The stabilisers, and which we use (the pilot in the issue: naive unconstrained destruction -> NaN):
    - shared backbone: the destruction head reads the generation network's features (detached);
    - separate optimisers: the destruction head has its own Adam, at `destruction_lr_ratio` x the lr
      of the generation (the relative learning rate);
    - target network: the generation's loss sees an EMA copy of the destruction head (e2ediff.EMA),
      so it never chases a destruction that moved in the same step;
    - replay buffer: every other step replays terminal states ranked by reward and draws their paths
      from the (target) destruction process; gradients are clipped in both optimisers;
    - and one of ours: the destruction's loss is centred (VarGrad's batch log Z, whatever the generation's
      objective), so that it never absorbs the error of TB's learned log Z by shrinking or inflating its
      variances (a pilot, Many-Well d = 32, T = 5, 1000 iterations, seed 0: ELBO 4.3 uncentred, 137 centred).
    Each can be switched off by a flag (--target-decay 0, --destruction-lr-ratio 1, --no-replay,
    --destruction-objective same); related/benchmarks/destruction.py measures that ablation. In both arms the
    training paths carry extra exploration noise for the first half of the run (gfn-diffusion's).

    python related/adaptive_destruction.py --target gmm25 --num-steps 5 --destruction learned   # one run, ~15 s
    python related/adaptive_destruction.py --target funnel --num-steps 20 --destruction fixed --objective vargrad
    python related/adaptive_destruction.py --help                                               # every option
    python related/benchmarks/destruction.py                     # fixed vs learned, T = 5, 10, 20, 3 seeds

Needs POT (`pip install POT`) for the W1 distance to exact samples.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable


import torch
import torch.nn as nn

import e2ediff
import toy2d
from train_utils import UsageError, descend, exit_with, parse_config, validate

LOG_2PI = math.log(2 * math.pi)


# --------------------------------------------------------------------------------------------------
# 1. Targets: unnormalised log-density log R(x) = -E(x), exact samples, and the true log Z
# --------------------------------------------------------------------------------------------------


@dataclass
class Target:
    """An energy to sample. log_reward(x (B, d)) -> (B,); sample(n, generator) -> (n, d) exact samples."""

    name: str
    dim: int
    log_reward: Callable[[torch.Tensor], torch.Tensor]
    sample: Callable[[int, torch.Generator], torch.Tensor]
    log_Z: float
    noise_scale: float  # sigma^2 of the sampler's Brownian motion: about the target's spread
    means: torch.Tensor | None = None  # (K, d) mixture means, for "modes covered"
    mode_std: float = 0.0


def mixture_log_density(x: torch.Tensor, means: torch.Tensor, std: float) -> torch.Tensor:
    """log of (1/K) sum_k N(x; mean_k, std^2 I), normalised. x (B, d), means (K, d) -> (B,)."""
    squared = torch.cdist(x, means.to(x)).pow(2)  # (B, K)
    log_component = -0.5 * squared / std**2 - x.shape[1] * (math.log(std) + 0.5 * LOG_2PI)
    return torch.logsumexp(log_component, dim=1) - math.log(means.shape[0])


def gmm25() -> Target:
    """25 Gaussians, means on {-10, -5, 0, 5, 10}^2, variance 0.3 (gfn-diffusion's 25gmm), log Z = 0."""
    grid = torch.tensor([-10.0, -5.0, 0.0, 5.0, 10.0])
    means = torch.cartesian_prod(grid, grid)
    std = math.sqrt(0.3)

    def sample(n, generator):
        index = torch.randint(0, means.shape[0], (n,), generator=generator)
        return means[index] + std * torch.randn(n, 2, generator=generator)

    return Target("gmm25", 2, lambda x: mixture_log_density(x, means, std), sample, 0.0, 5.0, means, std)


RING = dict(modes=8, radius=1.0, std=0.05)  # toy2d.ring_of_gaussians' defaults, named once here


def ring8() -> Target:
    """toy2d's ring of 8 Gaussians (radius 1, std 0.05); exact samples from toy2d.ring_of_gaussians, log Z = 0."""
    angle = torch.arange(RING["modes"]) * (2 * math.pi / RING["modes"])
    means = RING["radius"] * torch.stack([angle.cos(), angle.sin()], dim=1)
    return Target("ring8", 2, lambda x: mixture_log_density(x, means, RING["std"]),
                  lambda n, generator: toy2d.ring_of_gaussians(n, generator, **RING), 0.0, 1.0, means, RING["std"])


def funnel(dim: int = 10) -> Target:
    """Neal's funnel: x_0 ~ N(0, 3^2), x_i | x_0 ~ N(0, e^{x_0}) for i = 1..d-1; normalised, log Z = 0."""

    def log_reward(x):
        head, rest = x[:, 0], x[:, 1:]
        log_head = -0.5 * head.pow(2) / 9.0 - math.log(3.0) - 0.5 * LOG_2PI
        log_rest = -0.5 * rest.pow(2).sum(1) * torch.exp(-head) - 0.5 * (dim - 1) * (head + LOG_2PI)
        return log_head + log_rest

    def sample(n, generator):
        head = 3.0 * torch.randn(n, 1, generator=generator)
        return torch.cat([head, torch.exp(0.5 * head) * torch.randn(n, dim - 1, generator=generator)], dim=1)

    return Target("funnel", dim, log_reward, sample, 0.0, 1.0)


# Many-Well, one pair (x1, x2): log R = -x1^4 + 6 x1^2 + x1/2 - x2^2/2. Its x1-integral (gfn-diffusion):
MANY_WELL_Z1 = 11784.50927


def many_well_x1_log_density(x1: torch.Tensor) -> torch.Tensor:
    return -x1.pow(4) + 6 * x1.pow(2) + 0.5 * x1


def many_well(dim: int = 32) -> Target:
    """Many-Well: d/2 independent double-well pairs, 2^(d/2) modes; log Z = (d/2)(log Z1 + log(2 pi)/2).
    Exact samples: x2 ~ N(0, 1); x1 by inverting its CDF, tabulated on a fine grid over [-4, 4]
    (the density there is below e^-30 of its peak outside)."""
    if dim % 2:
        raise ValueError(f"Many-Well needs an even dimension, got {dim}")
    grid = torch.linspace(-4.0, 4.0, 40001, dtype=torch.float64)
    density = torch.exp(many_well_x1_log_density(grid) - many_well_x1_log_density(grid).max())
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum((density[1:] + density[:-1]) / 2, 0)])
    cdf = cdf / cdf[-1]

    def log_reward(x):
        x1, x2 = x[:, 0::2], x[:, 1::2]
        return (many_well_x1_log_density(x1) - 0.5 * x2.pow(2)).sum(1)

    def sample(n, generator):
        u = torch.rand(n, dim // 2, generator=generator, dtype=torch.float64)
        index = torch.searchsorted(cdf, u).clamp(1, grid.numel() - 1)  # linear interpolation of the inverse CDF
        low, high = cdf[index - 1], cdf[index]
        x1 = grid[index - 1] + (u - low) / (high - low).clamp_min(1e-300) * (grid[1] - grid[0])
        x2 = torch.randn(n, dim // 2, generator=generator, dtype=torch.float64)
        return torch.stack([x1, x2], dim=2).reshape(n, dim).float()

    return Target("many_well", dim, log_reward, sample, (dim // 2) * (math.log(MANY_WELL_Z1) + 0.5 * LOG_2PI), 1.0)


TARGETS = {"gmm25": gmm25, "funnel": funnel, "many_well": many_well, "ring8": ring8}


def make_target(name: str) -> Target:
    e2ediff.check_choice("target", name, tuple(TARGETS))
    return TARGETS[name]()


# --------------------------------------------------------------------------------------------------
# 2. Gaussian kernels. Time t_i = i / T, dt = 1 / T; x_0 = 0 always.
# --------------------------------------------------------------------------------------------------


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, diag(exp(log_var))), summed over the last axis. (..., d) -> (...)."""
    return -0.5 * ((x - mean).pow(2) * torch.exp(-log_var) + log_var + LOG_2PI).sum(-1)


def brownian_bridge(x_next: torch.Tensor, step: torch.Tensor, num_steps: int, noise_scale: float):
    """The fixed destruction: p_B(x_i | x_{i+1}) of Brownian motion W_t (variance sigma^2 t) pinned at
    W_0 = 0, i >= 1: N(x_{i+1} i / (i+1), sigma^2 dt i / (i+1)) (gfn-diffusion). step = i, (...,) -> mean,
    log_var shaped like x_next."""
    fraction = (step / (step + 1)).unsqueeze(-1)
    return x_next * fraction, torch.log(noise_scale / num_steps * fraction).expand_as(x_next)


# --------------------------------------------------------------------------------------------------
# 3. The sampler: p_F and p_B from one MLP backbone with a time embedding
# --------------------------------------------------------------------------------------------------


class DiffusionSampler(nn.Module):
    """features(x, t) from one backbone; the generation head gives p_F(x_{i+1} | x_i) =
    N(x_i + s mu, s^2 exp(4 tanh l)), s = sigma sqrt(dt) (gfn-diffusion's bounded log-variance, in both
    arms; the drift in units of the step's noise std, where gfn-diffusion has dt mu);
    the destruction head ("learned") adds an unconstrained correction to the Brownian bridge:
    p_B(x_i | x_{i+1}) = N(bridge mean + s a, bridge variance * exp(b)), a and b unbounded (the paper's
    unconstrained Gaussian; zero-initialised, so training starts from the fixed destruction)."""

    def __init__(self, dim: int, num_steps: int, noise_scale: float, destruction: str, hidden: int = 64,
                 time_features: int = 16):
        super().__init__()
        e2ediff.check_choice("destruction", destruction, DESTRUCTIONS)
        self.dim, self.num_steps, self.noise_scale, self.destruction = dim, num_steps, noise_scale, destruction
        self.step_std = math.sqrt(noise_scale / num_steps)  # sigma sqrt(dt): the unit of both drifts, O(1) outputs at any T
        self.register_buffer("frequencies", 2 * math.pi * torch.arange(1, time_features // 2 + 1).float())
        self.backbone = nn.Sequential(nn.Linear(dim + time_features, hidden), nn.SiLU(),
                                      nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.generation_head = nn.Linear(hidden, 2 * dim)
        self.destruction_head = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2 * dim))
        self.log_Z = nn.Parameter(torch.zeros(()))  # trajectory balance's learned log Z
        for head in (self.generation_head, self.destruction_head[-1]):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def features(self, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Backbone features of states x (..., d) at steps (...,) (time t = step / T). -> (..., hidden)."""
        angles = (step.float() / self.num_steps).unsqueeze(-1) * self.frequencies
        return self.backbone(torch.cat([x, angles.sin(), angles.cos()], dim=-1))

    def generation(self, features, x, step):
        """p_F(x_{i+1} | x_i = x): mean, log_var, (..., d)."""
        drift, log_var = self.generation_head(features).chunk(2, dim=-1)
        return x + self.step_std * drift, 2 * math.log(self.step_std) + 4 * torch.tanh(log_var)

    def destruction_kernel(self, features, x_next, step, head: nn.Module | None = None):
        """p_B(x_i | x_{i+1} = x_next) for i = step >= 1: mean, log_var, (..., d). `head` swaps in another
        destruction head (the target network); features are detached: the backbone is the generation's."""
        mean, log_var = brownian_bridge(x_next, step, self.num_steps, self.noise_scale)
        if self.destruction == "fixed":
            return mean, log_var
        shift, log_scale = (head or self.destruction_head)(features.detach()).chunk(2, dim=-1)
        # a numerical guard, not a constraint: e^8 ~ 3000x the bridge's variance either way (far-off states,
        # e.g. the funnel's exact tail in the EUBO, otherwise overflow float32)
        return mean + self.step_std * shift, log_var + log_scale.clamp(-LOG_SCALE_GUARD, LOG_SCALE_GUARD)


DESTRUCTIONS = ("fixed", "learned")
LOG_SCALE_GUARD = 8.0


def _step_tensor(step: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full(like.shape[:-1], step, dtype=torch.long, device=like.device)


def _gaussian_sample(mean, log_var, generator):
    return mean + torch.exp(0.5 * log_var) * torch.randn(mean.shape, generator=generator, device=mean.device)


def sample_generation(sampler: DiffusionSampler, n: int, generator: torch.Generator | None = None,
                      exploration: float = 0.0) -> torch.Tensor:
    """n paths x_0 = 0 -> x_T of p_F. Returns (T+1, n, d); callers that only sample wrap it in no_grad.
    exploration > 0 draws off-policy paths: variance + (exploration sigma sqrt(dt))^2 (gfn-diffusion's
    exploratory sampling; the objectives are off-policy, so training on these paths stays valid)."""
    x = torch.zeros(n, sampler.dim, device=sampler.log_Z.device)
    path = [x]
    for i in range(sampler.num_steps):
        step = _step_tensor(i, x)
        mean, log_var = sampler.generation(sampler.features(x, step), x, step)
        if exploration > 0:
            log_var = torch.logaddexp(log_var, torch.tensor(2 * math.log(exploration * sampler.step_std)))
        x = _gaussian_sample(mean, log_var, generator)
        path.append(x)
    return torch.stack(path)


def sample_destruction(sampler: DiffusionSampler, x_T: torch.Tensor, generator: torch.Generator | None = None,
                       head: nn.Module | None = None) -> torch.Tensor:
    """Paths x_T -> x_0 = 0 of p_B (with destruction head `head`, default the sampler's). (T+1, n, d)."""
    path = [x_T]
    x = x_T
    for i in range(sampler.num_steps - 1, 0, -1):  # draws x_i given x_{i+1}
        step = _step_tensor(i, x)
        x = _gaussian_sample(*sampler.destruction_kernel(sampler.features(x, step + 1), x, step, head), generator)
        path.append(x)
    path.append(torch.zeros_like(x_T))
    return torch.stack(path[::-1])


def path_log_probs(sampler: DiffusionSampler, path: torch.Tensor, target_head: nn.Module | None = None) -> dict:
    """sum_i log p_F(x_{i+1} | x_i) and sum_{i>=1} log p_B(x_i | x_{i+1}) of paths (T+1, B, d), with one
    backbone pass over every state. With `target_head`, also log_pB under it ("log_pB_target"). -> (B,) each."""
    steps = torch.arange(sampler.num_steps + 1, device=path.device)[:, None].expand(path.shape[:2])
    features = sampler.features(path, steps)  # (T+1, B, hidden)
    mean, log_var = sampler.generation(features[:-1], path[:-1], steps[:-1])
    out = {"log_pF": gaussian_log_prob(path[1:], mean, log_var).sum(0)}
    heads = {"log_pB": None, **({"log_pB_target": target_head} if target_head is not None else {})}
    for name, head in heads.items():  # x_i given x_{i+1}, i = 1..T-1: features of states 2..T
        mean, log_var = sampler.destruction_kernel(features[2:], path[2:], steps[1:-1], head)
        out[name] = gaussian_log_prob(path[1:-1], mean, log_var).sum(0)
    return out


# --------------------------------------------------------------------------------------------------
# 4. Objectives: each returns a per-path loss (B,); the caller reduces
# --------------------------------------------------------------------------------------------------


def log_weight(log_reward, log_pB, log_pF) -> torch.Tensor:
    """log R(x_T) + sum log p_B - sum log p_F: the path's importance weight; its mean over p_F paths is the ELBO."""
    return log_reward + log_pB - log_pF


def trajectory_balance(log_Z, log_pF, log_pB, log_reward) -> torch.Tensor:
    """TB (Malkin et al. 2022): (log Z + sum log p_F - sum log p_B - log R)^2 with a learned log Z."""
    return (log_Z - log_weight(log_reward, log_pB, log_pF)).pow(2)


def vargrad(log_Z, log_pF, log_pB, log_reward) -> torch.Tensor:
    """VarGrad (Richter et al. 2020): TB with log Z replaced by the batch mean of the log-weights
    (detached: the gradient of the batch variance is the same). `log_Z` is ignored."""
    weights = log_weight(log_reward, log_pB, log_pF)
    return (weights - weights.mean().detach()).pow(2)


OBJECTIVES = {"tb": trajectory_balance, "vargrad": vargrad}


def trajectory_likelihood(log_pB) -> torch.Tensor:
    """TLM (d2e-stochastic-dynamics): the destruction alone maximises -sum log p_B on p_F's paths."""
    return -log_pB


# --------------------------------------------------------------------------------------------------
# 5. Replay buffer of terminal states, sampled by reward rank (gfn-diffusion's prioritised buffer)
# --------------------------------------------------------------------------------------------------


class ReplayBuffer:
    """The last `capacity` terminal states x_T with log R. sample() draws with probability proportional
    to 1 / (k N + rank) (rank 0 = highest reward; k = 0.01 as gfn-diffusion), so good states return often."""

    def __init__(self, capacity: int, rank_weight: float = 0.01):
        self.capacity, self.rank_weight = capacity, rank_weight
        self.states, self.log_rewards = None, None

    def add(self, states: torch.Tensor, log_rewards: torch.Tensor) -> None:
        keep = torch.isfinite(log_rewards)
        states, log_rewards = states[keep].detach(), log_rewards[keep].detach()
        if self.states is not None:
            states, log_rewards = torch.cat([self.states, states]), torch.cat([self.log_rewards, log_rewards])
        self.states, self.log_rewards = states[-self.capacity:], log_rewards[-self.capacity:]

    def __len__(self) -> int:
        return 0 if self.states is None else self.states.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        rank = torch.empty(len(self)).index_put_((torch.argsort(self.log_rewards, descending=True),),
                                                 torch.arange(len(self)).float())
        weights = 1.0 / (self.rank_weight * len(self) + rank)
        return self.states[torch.multinomial(weights, n, replacement=True, generator=generator)]


# --------------------------------------------------------------------------------------------------
# 6. Metrics
# --------------------------------------------------------------------------------------------------


def logmeanexp(x: torch.Tensor) -> float:
    return float(torch.logsumexp(x.double(), 0) - math.log(x.numel()))


@torch.no_grad()
def bounds(sampler: DiffusionSampler, target: Target, n: int, generator: torch.Generator) -> dict:
    """ELBO = E_{p_F}[log w] <= log Z, log Z_hat = log mean_{p_F} w (importance sampling), and
    EUBO = E over exact x_T ~ target and paths from p_B of log w >= log Z. The gap EUBO - ELBO is
    KL(P_F || P_B) + KL(P_B || P_F) of the two path measures: 0 only for a perfect sampler."""
    forward = sample_generation(sampler, n, generator)
    weights = log_weight(target.log_reward(forward[-1]), **_log_pB_pF(sampler, forward))
    backward = sample_destruction(sampler, target.sample(n, generator).to(forward.device), generator)
    eubo = log_weight(target.log_reward(backward[-1]), **_log_pB_pF(sampler, backward)).mean()
    elbo, log_Z_hat = float(weights.mean()), logmeanexp(weights)
    return {"elbo": elbo, "eubo": float(eubo), "gap": float(eubo) - elbo, "log_Z_hat": log_Z_hat,
            "log_Z_error": log_Z_hat - target.log_Z, "samples": forward[-1]}


def _log_pB_pF(sampler, path) -> dict:
    log_probs = path_log_probs(sampler, path)
    return {"log_pB": log_probs["log_pB"], "log_pF": log_probs["log_pF"]}


def wasserstein_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """W1 between two equal-size samples: exact optimal transport with a Euclidean cost (POT's network
    simplex, ot.emd2). Not Sinkhorn: log-domain Sinkhorn at reg 0.05 took 20-240 s per 1000-point pair
    on this project's CPU, the exact solver 0.1-0.4 s, and it has no entropic bias."""
    import ot

    cost = torch.cdist(x.double(), y.double()).numpy()
    return float(ot.emd2(ot.unif(x.shape[0]), ot.unif(y.shape[0]), cost, numItermax=1_000_000))


def modes_covered(samples: torch.Tensor, means: torch.Tensor, std: float) -> int:
    """Mixture components that hold at least a quarter of their fair share (n / 4K) of the samples
    lying within 4 std of their nearest mean."""
    distance, nearest = torch.cdist(samples, means).min(1)
    counts = torch.bincount(nearest[distance < 4 * std], minlength=means.shape[0])
    return int((counts >= samples.shape[0] / (4 * means.shape[0])).sum())


def evaluate(sampler: DiffusionSampler, target: Target, n: int, seed: int, distance_samples: int = 0) -> dict:
    """bounds() on n paths each way; with distance_samples > 0 also the W1 distance of that many
    samples to fresh exact ones, and modes covered (mixtures). Fixed seed: every model sees the same noise."""
    generator = torch.Generator().manual_seed(seed)
    metrics = bounds(sampler, target, n, generator)
    samples = metrics.pop("samples")
    if distance_samples:
        exact = target.sample(distance_samples, generator)
        metrics["w1"] = wasserstein_distance(samples[:distance_samples], exact)
        if target.means is not None:
            metrics["modes"] = modes_covered(samples, target.means, target.mode_std)
    return metrics


# --------------------------------------------------------------------------------------------------
# 7. Training: generation and destruction jointly, on-policy and from the replay buffer
# --------------------------------------------------------------------------------------------------

option = e2ediff.option


@dataclass
class SamplerConfig:
    """Every option of one run; the defaults are what related/benchmarks/destruction.py runs."""

    target: str = option("gmm25", "the energy to sample", tuple(TARGETS))
    num_steps: int = option(5, "T: the paper's claim is about few steps (5 vs 20)",
                            valid=">= 2")
    destruction: str = option("learned", "fixed = Brownian bridge (baseline); learned = the paper's", DESTRUCTIONS)
    objective: str = option("tb", "tb: learned log Z; vargrad: batch log Z", tuple(OBJECTIVES))
    destruction_objective: str = option("vargrad", "vargrad: the batch-centred balance residual (never sees log Z); "
                                        "same: the generation's objective (TB: with its learned log Z); tlm: -log p_B "
                                        "on p_F paths (the paper's reviewers: unstable with many steps)",
                                        ("vargrad", "same", "tlm"))
    iterations: int = option(600, "optimiser steps (gfn-diffusion: 25k; 600 fits the benchmark in 30 min on a CPU)",
                             valid=">= 1")
    batch_size: int = option(256, "paths per step (gfn-diffusion: 300)", valid=">= 2")
    hidden: int = option(64, "backbone width (the issue's pilot: 3 x 64)", valid=">= 1")
    lr: float = option(3e-3, "Adam lr of the generation (gfn-diffusion: 1e-3; chosen on the fixed baseline, "
                       "3e-3 converges faster in our short runs)", valid="> 0")
    log_Z_lr: float = option(1e-1, "Adam lr of TB's log Z (gfn-diffusion's flow lr: log Z must move fast)", valid="> 0")
    destruction_lr_ratio: float = option(0.1, "destruction lr / generation lr: the destruction moves slower",
                                          valid="> 0")
    target_decay: float = option(0.99, "EMA decay of the destruction's target network; 0 = no target network",
                                  valid="[0, 1)")
    exploration: float = option(1.0, "extra std of the training paths, in units of sigma sqrt(dt), decayed linearly "
                                "to 0 at half the run (gfn-diffusion's exploratory sampling): mode coverage", valid=">= 0")
    replay: bool = option(True, "every other step replays buffered x_T with paths from p_B (off-policy)")
    replay_capacity: int = option(10000, "terminal states kept in the replay buffer", valid=">= 1")
    grad_clip: float = option(1.0, "gradient-norm clip of both optimisers; 0 = off", valid=">= 0")
    eval_every: int = option(60, "iterations between the convergence curve's points (ten per run)", valid=">= 1")
    eval_samples: int = option(500, "paths each way per curve point: the curve costs a tenth of the run", valid=">= 2")
    final_samples: int = option(4000, "paths each way in the final evaluation (log Z_hat, ELBO, EUBO)",
                                valid=">= 2")
    distance_samples: int = option(1000, "samples in the final W1 distance to exact samples; 0 = skip it",
                                   valid=">= 0")
    seed: int = option(0, "initialisation and training noise")

    def __post_init__(self):
        validate(self)


def train(config: SamplerConfig, log: Callable[[str], None] | None = None) -> tuple[DiffusionSampler, dict]:
    """Train one sampler. Returns it and a record: the config, the curve (iteration, elbo, eubo, gap,
    log_Z_hat, seconds), the final metrics, and `diverged` (a non-finite loss stopped the run)."""
    target = make_target(config.target)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    sampler = DiffusionSampler(target.dim, config.num_steps, target.noise_scale, config.destruction, config.hidden)
    learned = config.destruction == "learned"
    objective = OBJECTIVES[config.objective]
    generation_optimizer = torch.optim.Adam([
        {"params": [*sampler.backbone.parameters(), *sampler.generation_head.parameters()], "lr": config.lr},
        {"params": [sampler.log_Z], "lr": config.log_Z_lr}])
    destruction_optimizer = torch.optim.Adam(sampler.destruction_head.parameters(), config.lr * config.destruction_lr_ratio)
    target_network = e2ediff.EMA(sampler.destruction_head, config.target_decay) if learned else None
    buffer = ReplayBuffer(config.replay_capacity)
    record = {"config": asdict(config), "curve": [], "diverged": False}
    start = time.time()
    for iteration in range(config.iterations + 1):
        if iteration % config.eval_every == 0 or iteration == config.iterations:
            point = evaluate(sampler, target, config.eval_samples, seed=10_000 + config.seed)
            record["curve"].append({"iteration": iteration, **point, "seconds": time.time() - start})
            if log:
                log(f"{config.target} T={config.num_steps} {config.destruction} it {iteration}: elbo {point['elbo']:.3f} "
                    f"eubo {point['eubo']:.3f} log Z_hat {point['log_Z_hat']:.3f}")
        if iteration == config.iterations:
            break
        on_policy = not (config.replay and iteration % 2 == 1 and len(buffer) >= config.batch_size)
        with torch.no_grad():  # paths are data; their log-probabilities are recomputed with gradients below
            if on_policy:
                exploration = config.exploration * max(0.0, 1 - 2 * iteration / config.iterations)
                path = sample_generation(sampler, config.batch_size, generator, exploration)
            else:
                head = target_network.module if learned else None
                path = sample_destruction(sampler, buffer.sample(config.batch_size, generator), generator, head)
        log_reward = target.log_reward(path[-1])
        if on_policy:
            buffer.add(path[-1], log_reward)
        log_probs = path_log_probs(sampler, path, target_network.module if learned else None)
        log_pB_for_generation = log_probs["log_pB_target"] if learned else log_probs["log_pB"]
        generation_loss = objective(sampler.log_Z, log_probs["log_pF"], log_pB_for_generation, log_reward).mean()
        if not torch.isfinite(generation_loss):
            record["diverged"] = True
            break
        descend(generation_optimizer, generation_loss, config.grad_clip)
        if learned and (on_policy or config.destruction_objective != "tlm"):
            if config.destruction_objective == "tlm":
                destruction_loss = trajectory_likelihood(log_probs["log_pB"]).mean()
            else:  # "vargrad" is centred: an error in TB's log Z would otherwise be absorbed by p_B's variances
                balance = vargrad if config.destruction_objective == "vargrad" else objective
                destruction_loss = balance(sampler.log_Z.detach(), log_probs["log_pF"].detach(), log_probs["log_pB"],
                                           log_reward).mean()
            if not torch.isfinite(destruction_loss):
                record["diverged"] = True
                break
            descend(destruction_optimizer, destruction_loss, config.grad_clip)
            target_network.update(sampler.destruction_head)
    record["seconds"] = time.time() - start
    if record["diverged"]:
        record["final"] = {key: float("nan") for key in ("elbo", "eubo", "gap", "log_Z_hat", "log_Z_error", "w1")}
    else:
        record["final"] = evaluate(sampler, target, config.final_samples, seed=20_000 + config.seed,
                                   distance_samples=config.distance_samples)
    return sampler, record


if __name__ == "__main__":
    torch.set_num_threads(1)  # small MLPs: one thread is fastest, and leaves the other core free
    try:
        run_config = parse_config(SamplerConfig, description=__doc__)
    except UsageError as usage_error:
        exit_with(usage_error)
    _, result = train(run_config, log=print)
    print(json.dumps({"final": result["final"], "diverged": result["diverged"], "seconds": round(result["seconds"], 1)}))
