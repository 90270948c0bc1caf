"""toy2d — the 2D laboratory: a ring of 8 Gaussians, an MLP denoiser, and the energy distance.

Small enough to train in seconds on a CPU, big enough to show the method's failure modes: the tests,
the notebook and benchmarks/quality.py import it (it holds no method code of its own — the schedule,
sampler, couplings, losses and EMA all come from e2ediff).

    python toy2d.py        # pretrain a base, fine-tune end-to-end with each coupling, print the table and
                           # write it to benchmarks/results/toy2d.json (the README's "Which coupling" table)
    python toy2d.py --out /tmp/toy2d.json    # the same table, written elsewhere
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn

import e2ediff
from toy_nets import energy_distance  # noqa: F401  (toy2d.energy_distance: the ring's metric)
from train_utils import descend


def ring_of_gaussians(n: int, generator: torch.Generator | None = None, modes: int = 8, radius: float = 1.0, std: float = 0.05) -> torch.Tensor:
    """n points from `modes` isotropic Gaussians evenly spaced on a circle. (n, 2)."""
    angle = torch.randint(0, modes, (n,), generator=generator).float() * (2 * math.pi / modes)
    centres = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centres + std * torch.randn(n, 2, generator=generator)


class MLPDenoiser(nn.Module):
    """model(z (B, 2), t (B,), cond=None) -> (B, 2): an MLP on [z, sinusoidal embedding of t]."""

    def __init__(self, hidden: int = 128, time_features: int = 16, num_train_timesteps: int = 1000):
        super().__init__()
        self.time_features, self.num_train_timesteps = time_features, num_train_timesteps
        self.net = nn.Sequential(
            nn.Linear(2 + time_features, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    @property
    def last_layer(self) -> torch.Tensor:
        return self.net[-1].weight

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        half = self.time_features // 2
        frequencies = torch.exp(-math.log(1000.0) * torch.arange(half, device=z.device) / half)
        angles = (t.float() / self.num_train_timesteps * 1000.0)[:, None] * frequencies[None]
        return self.net(torch.cat([z, angles.sin(), angles.cos()], dim=1))


class MLPDiscriminator(nn.Module):
    """The 2D stand-in for the PatchGAN: one logit per point, (B, 2) -> (B, 1)."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def default_schedule() -> e2ediff.NoiseSchedule:
    """Linear betas rescaled to zero terminal SNR (Lin et al. 2024): x_T is pure noise."""
    return e2ediff.make_schedule("linear", zero_terminal_snr=True)


def pretrain(steps: int = 2000, batch: int = 256, lr: float = 2e-3, seed: int = 0, hidden: int = 128) -> MLPDenoiser:
    """The base model: standard v-prediction diffusion training on fresh ring samples."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model, schedule = MLPDenoiser(hidden), default_schedule()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    lr_decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        loss = e2ediff.diffusion_loss(model, ring_of_gaussians(batch, generator), schedule, "v_prediction", generator=generator).mean()
        descend(optimizer, loss)
        lr_decay.step()
    return model.eval().requires_grad_(False)


# The ring's departures from the paper's recipe (EndToEndConfig's defaults), each with its reason.
RING_METHOD = dict(
    coupling="inversion",  # a well-posed regression: Alg. 1's independent pairs under L2 collapse
    inversion_steps=50,  # the ring's inversions are cheap: follow the ODE closely
    update="ddim",  # the base is a plain diffusion model: its own sampler is DDIM
    lpips_weight=0.0,  # points, not images
    gan_adaptive=False,  # a fixed lambda_GAN: a GAN-only run has no reconstruction loss to compare with
    gan_weight=0.0,  # no GAN unless asked (0.1 with L2, 1 alone: benchmarks/quality.py)
    gan_kind="non_saturating", r1_weight=0.1,  # a seed-0 pilot, GAN alone at 4 NFE: 0.0104 with R1, 0.0128 without
    disc_lr=1e-3,  # 10x the generator's default lr: the MLP discriminator must keep up
    grad_clip=0.0, ema_decay=0.0,  # short fine-tunes: no clipping, no averaging (EMA = the model)
    grad_checkpoint=False,  # an MLP on 2D points: memory is no concern
)


def finetune(base: MLPDenoiser, steps: int = 500, batch_size: int = 256, lr: float = 1e-4, dataset_size: int = 4096,
             seed: int = 0, **method) -> MLPDenoiser:
    """Alg. 1 on a copy of `base`, over a fixed training set of ring points. `method` overrides
    RING_METHOD's EndToEndConfig fields (num_steps, coupling, l2_weight, gan_weight, ...). For
    "inversion" each point's z_T is computed once by the frozen base (which never changes, so the
    cache is exact). Returns the EMA model."""
    config = e2ediff.EndToEndConfig(**{**RING_METHOD, **method})
    generator = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    schedule = default_schedule()
    data = ring_of_gaussians(dataset_size, generator)
    cached_noise = None
    if config.coupling == "inversion":
        cached_noise = e2ediff.ddim_invert(base, data, schedule, config.inversion_steps)
    model = MLPDenoiser(base.net[0].out_features)
    model.load_state_dict(base.state_dict())  # Alg. 1 line 1
    model.train().requires_grad_(True)
    ema = e2ediff.EMA(model, decay=config.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    gan = e2ediff.GANLoss(MLPDiscriminator(), config) if config.gan_weight > 0 else None
    loss_fn = e2ediff.EndToEndLoss(model, schedule, config, gan=gan)
    for step in range(steps):
        index = torch.randint(0, dataset_size, (batch_size,), generator=generator)
        batch = {"target": data[index], "z_T": None if cached_noise is None else cached_noise[index]}
        e2ediff.train_step(loss_fn, optimizer, ema, [batch], step, base_model=base, gan=gan, generator=generator)
    return ema.module.eval().requires_grad_(False)


def sample(model: MLPDenoiser, num_steps: int, n: int = 2000, seed: int = 123) -> torch.Tensor:
    """n samples with the deterministic DDIM/unrolled sampler from fresh noise. (n, 2)."""
    z_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return e2ediff.unrolled_sample(model, z_T, default_schedule(), num_steps)


def score(model: MLPDenoiser, num_steps: int, n: int = 2000, seed: int = 123) -> float:
    """Energy distance between n samples and n fresh ring points (lower is better)."""
    reference = ring_of_gaussians(n, torch.Generator().manual_seed(seed + 1))
    return energy_distance(sample(model, num_steps, n, seed), reference)


RING_ROWS = {  # the README's "Which coupling" table: name -> finetune() overrides
    "independent, L2": dict(coupling="independent"),
    "inversion, L2": dict(coupling="inversion"),
    "independent, GAN only": dict(coupling="independent", l2_weight=0.0, gan_weight=1.0),
}


def main(argv=None) -> dict:
    """Pretrain a base, fine-tune it per RING_ROWS at 1 and 4 NFE; print the table, write it to --out."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "benchmarks" / "results" / "toy2d.json",
                        help="where the table's JSON goes (default: the committed one, which README.md renders)")
    out = parser.parse_args(argv).out
    if not out.parent.is_dir():  # refused now, not after the minute of training
        parser.error(f"--out: got '{out}', whose folder does not exist")
    start = time.time()
    base = pretrain()
    print(f"base pretrained in {time.time() - start:.1f}s; energy distance to fresh data (lower is better)")
    rows = {"base, DDIM": {k: score(base, k) for k in (1, 4, 50)}}
    rows |= {f"E2E, {name}": {k: score(finetune(base, num_steps=k, **kwargs), k) for k in (1, 4)}
             for name, kwargs in RING_ROWS.items()}
    print("| sampler | 1 NFE | 4 NFE |\n|---|---|---|")
    for name, scores in rows.items():
        print(f"| {name} | {scores[1]:.4f} | {scores[4]:.4f} |")
    record = {"rows": rows, "ring_method": RING_METHOD, "wall_seconds": time.time() - start}
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"total {record['wall_seconds']:.1f}s; wrote {out}")
    return record


if __name__ == "__main__":
    main()
