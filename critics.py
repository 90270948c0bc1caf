"""critics — discriminators beyond the paper's PatchGAN, and a gauge of any critic's health.

The paper's adversarial term (Eq. 8) uses a PatchGAN on images (e2ediff.PatchDiscriminator). This module adds
what the toy's study (benchmarks/README.md, "The adversarial term, acting") needed to make that term act:

- BaseFeatureDiscriminator: trainable conv heads on the frozen base's features of re-noised inputs (LADD,
  SANA-Sprint, DMD2), at low t; e2ediff.GANLoss uses it like a PatchGAN (`--disc-kind basefeat`).
- critic_auc: a critic's held-out real-vs-fake AUC, the number that says whether it learns (its loss does not),
  and auc_standard_error, how far it moves with the held-out batch; student_auc: that AUC against the current
  student's samples, as both scripts log it.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn

from e2ediff import FEATURE_TIME_DISTRIBUTIONS, EndToEndConfig, NoiseSchedule, _expand, _randn_like, check_choice, unwrap


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

    reads_latents = True  # GANLoss hands it the sampler's z0 (the denoiser's space), not the decoded image

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


def auc_standard_error(auc: float, n_real: int, n_fake: int) -> float:
    """The standard error of an AUC measured on n_real real and n_fake fake samples (Hanley & McNeil 1982, Radiology
    143:29, their Eq. 2): how far the same critic's AUC would move on another held-out batch of that size. Their
    model is exponential scores; for normal ones it is a few per cent high (tests/test_critic.py). Near 0.8 with 256
    of each it is 0.020; a critic's curve measured on one fixed batch shares that error at every point."""
    q_real, q_fake = auc / (2 - auc), 2 * auc ** 2 / (1 + auc)
    variance = auc * (1 - auc) + (n_real - 1) * (q_real - auc ** 2) + (n_fake - 1) * (q_fake - auc ** 2)
    return math.sqrt(variance / (n_real * n_fake))


def student_auc(loss_fn: nn.Module, gan, real: torch.Tensor, z_T: torch.Tensor, cond: Any = None, uncond: Any = None,
                seed: int = 0) -> float:
    """critic_auc of `gan`'s critic: `real` (as it reads them) against the current student's samples from the fixed
    noise z_T for `cond` (loss_fn: an EndToEndLoss, or DDP around one). Every draw, the sampler's fresh noise
    included, comes from `seed`, and torch's RNGs are restored after: measuring it changes no training step."""
    with torch.random.fork_rng(devices=[z_T.device] if z_T.device.type == "cuda" else []):
        torch.manual_seed(seed)
        fake = unwrap(loss_fn).critic_sample(z_T, cond, uncond)
    labels = gan.labels(cond)  # () or (cond,): for the real batch, then for the fake one
    return critic_auc(unwrap(gan.discriminator), real, fake, *labels, *labels, seed=seed)
