"""dsd — Diffusion as Self-Distillation (Wang & Zhang, arXiv 2511.14716) at toy scale: one network that
encodes, decodes and denoises, trained end to end on scikit-learn's 8x8 digits (offline, CPU).

    python related/dsd.py                          # one seed: the three trainings, the ablation, the end-to-end
                                           # fine-tune, indicators and few-step quality (~2 min, 1 CPU thread)
    python related/dsd.py --seed 1 --steps 1000    # another seed, a shorter run; --help lists every flag and why
    python related/benchmarks/dsd.py               # 3 seeds, mean ± std, plot: benchmarks/results/dsd.{json,png}
    python -m pytest -q related/tests/test_dsd.py  # the tests (< 60 s on 2 CPU cores)

What runs, side by side, with the same network, data, steps and learning rate:
  - naive joint:  z = E(x); L = |D(z) - x|^2 + L_v, the standard v-prediction loss on z with the gradient
                  flowing into the encoder through the noisy input *and* the regression target (the paper's);
  - DSD:          L = |D(z) - x|^2 + |x0_hat(z_t, t) - sg(z)|^2: stop-gradient on the target latent, the
                  velocity loss recast as denoising the latent, the gradient reaching the encoder only through
                  z_t = alpha_t z + sigma_t eps (the self-distillation reading: online branch vs fixed target);
  - two-stage:    the standard latent-diffusion recipe: an autoencoder (a copy of the network, encoder and
                  decoder roles) trained on |D(E(x)) - x|^2, frozen, then a second copy trained as the latent
                  denoiser with L_v — twice the parameters;
  - ablation:     the DSD objective without the latent LayerNorm (see "ours" below);
  - equal updates: DSD trained twice as many steps, as many optimiser updates as two-stage's two stages;
  - DSD + E2E:    the DSD network fine-tuned end to end through its own 4-step sampler *and* its own decoder
                  (e2ediff's Algorithm 1 in latent space, L2 on the decoded images, inversion coupling).

Which parts are the paper's and which are our reading (the paper has no code; its method section was not
available to us beyond summaries, see related/README.md):
  - paper: one network for the three roles; naive joint training collapses the latents because L_v holds the
    conditional variance Var(z | z_t), which shrinks with the latent scale ("latent variance suppression");
    the fix reads diffusion as self-distillation: stop-gradient on the target latent and a loss that recasts
    velocity prediction as denoising the latent.
  - ours: that denoising loss as x0-prediction of sg(z), read from the v-output, uniform over timesteps,
    weighted 1 against reconstruction; the MLP with a role input (the paper uses a ViT); the latent is
    LayerNorm-ed (no affine) in every training — without it the stop-gradient objective inflates the
    latents without bound (the issue's pilot saw std 143; our explanation: the gradient through z_t rewards
    a larger signal-to-noise ratio), with it the same force spreads the latents apart instead. ViTs usually
    end in a LayerNorm, but the paper's latent normalisation is unknown to us. The end-to-end fine-tune is
    this project's addition.

Collapse indicators, logged during training on 512 fixed training images: per-dimension latent std (mean
over the latent dimensions), effective rank of the centred latents (Roy & Vetterli 2007), reconstruction
MSE. Sample quality: DDIM through e2ediff.unrolled_sample in latent space at 1, 2, 4 (and 50) NFE, decoded;
CFD (toy_nets.ClassifierFrechetDistance, the toy's metric, against the test split) and the energy distance
of the 64 pixels (toy2d.energy_distance, also against the test split).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass


import torch
import torch.nn as nn
import torch.nn.functional as F

import e2ediff
import toy2d
import toy_data
from e2ediff import option
from toy_nets import ClassifierFrechetDistance, timestep_embedding
from train_utils import UsageError, descend, exit_with, parse_config

ROLES = ("encode", "decode", "denoise")
TRAININGS = ("naive", "dsd", "two_stage")
PREDICTION_TYPE = "v_prediction"  # what the denoiser role outputs (zero terminal SNR needs v or x0)


@dataclass
class Config:
    seed: int = option(0, "seeds initialisation, data order, training noise, sampling noise")
    # the network
    latent_dim: int = option(8, "8 numbers per 64-pixel digit: small enough that collapse shows, large enough to reconstruct")
    hidden: int = option(256, "MLP width: ~0.17M parameters, ~15 ms per joint step on one CPU thread")
    depth: int = option(3, "hidden layers of the shared MLP")
    latent_norm: bool = option(True, "LayerNorm (no affine) on the encoder's latent; off: DSD's latents blow up (our reading)")
    # training (the same for every training)
    steps: int = option(3000, "optimiser steps per training; the two-stage baseline gets this many for each stage")
    batch_size: int = option(128, "digits per step")
    lr: float = option(1e-3, "AdamW; high is fine for a small MLP")
    diffusion_weight: float = option(1.0, "weight of the diffusion / self-distillation term against reconstruction")
    log_every: int = option(100, "steps between collapse-indicator rows")
    # end-to-end fine-tuning of the DSD network (Algorithm 1 in latent space, loss on decoded images)
    finetune_steps: int = option(400, "a short fine-tune, as long as the toy quickstart's")
    finetune_lr: float = option(1e-4, "small: the network starts from a trained DSD model")
    finetune_batch_size: int = option(64, "train_toy's fine-tuning batch")
    finetune_nfe: int = option(4, "T of the unrolled sampler being trained (the headline compares at 4 NFE)")
    inversion_steps: int = option(25, "DDIM-inversion steps that pair each digit's latent with its noise")
    # evaluation
    nfe: tuple[int, ...] = option((1, 2, 4, 50), "DDIM steps to sample with; 50 is the many-step reference")
    eval_samples: int = option(1000, "samples per (model, NFE) cell")


# --------------------------------------------------------------------------------------------------
# 1. One network, three roles
# --------------------------------------------------------------------------------------------------


class OneNetwork(nn.Module):
    """One MLP that encodes, decodes and denoises: its input is [pixels (64), latent (d), embedding of t,
    one-hot role] and its output [pixels (64), latent (d)]; each role fills the slots it has, zeros the
    rest and reads one output slot. Every hidden layer serves every role; of the output layer, the pixel
    rows serve the decoder and the latent rows the encoder and the denoiser.

    encode(x (B, 1, 8, 8)) -> z (B, d); decode(z) -> x (B, 1, 8, 8); forward(z_t, t, cond) -> v-prediction
    (B, d), the e2ediff `Denoiser` interface (cond is ignored: unconditional).
    """

    def __init__(self, image_shape=(1, 8, 8), latent_dim=8, hidden=256, depth=3, latent_norm=True,
                 time_features=16):
        super().__init__()
        self.image_shape, self.latent_dim = tuple(image_shape), latent_dim
        self.pixels, self.time_features, self.latent_norm = math.prod(image_shape), time_features, latent_norm
        widths = [self.pixels + latent_dim + time_features + len(ROLES)] + [hidden] * depth
        layers = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(width_in, width_out), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, self.pixels + latent_dim))

    def run(self, role: str, pixels=None, latent=None, t=None):
        """The shared MLP in one role: (pixel output (B, 64), latent output (B, d))."""
        e2ediff.check_choice("role", role, ROLES)
        batch = (pixels if pixels is not None else latent).shape[0]
        device = next(self.parameters()).device
        pixels = torch.zeros(batch, self.pixels, device=device) if pixels is None else pixels.flatten(1)
        latent = torch.zeros(batch, self.latent_dim, device=device) if latent is None else latent
        time = (torch.zeros(batch, self.time_features, device=device) if t is None
                else timestep_embedding(t, self.time_features))
        role_one_hot = F.one_hot(torch.full((batch,), ROLES.index(role), device=device), len(ROLES)).float()
        output = self.net(torch.cat([pixels, latent, time, role_one_hot], dim=1))
        return output[:, :self.pixels], output[:, self.pixels:]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        latent = self.run("encode", pixels=images)[1]
        return F.layer_norm(latent, (self.latent_dim,)) if self.latent_norm else latent

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.run("decode", latent=latent)[0].view(-1, *self.image_shape)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return self.run("denoise", latent=z_t, t=t)[1]


def build_network(config: Config) -> OneNetwork:
    return OneNetwork((1, 8, 8), config.latent_dim, config.hidden, config.depth, config.latent_norm)


def build_schedule() -> e2ediff.NoiseSchedule:
    """train_toy's default: DDPM linear betas rescaled to zero terminal SNR (Lin et al. 2024), 1000 steps."""
    return e2ediff.make_schedule("linear", 1000, zero_terminal_snr=True)


# --------------------------------------------------------------------------------------------------
# 2. The objectives (per-sample terms; the caller reduces)
# --------------------------------------------------------------------------------------------------


def reconstruction_error(network: OneNetwork, images: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """|D(z) - x|^2 per sample, (B,)."""
    return (network.decode(latent) - images).pow(2).flatten(1).mean(1)


def self_distillation_loss(denoiser: e2ediff.Denoiser, latent: torch.Tensor, schedule: e2ediff.NoiseSchedule,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """DSD's denoising term, (B,): |x0_hat(z_t, t) - sg(z)|^2 with z_t = alpha_t z + sigma_t eps.

    The target is the stop-gradient latent (the self-distillation "teacher" view); the online view z_t keeps
    its gradient, so the encoder learns only through the noisy input. x0_hat is read from the v-prediction
    (x0 = alpha z_t - sigma v), i.e. the velocity loss recast as denoising the latent. Draws t and eps in the
    order e2ediff.diffusion_loss does, so the same generator state gives both losses the same noise.
    """
    gen_device = generator.device if generator is not None else latent.device
    t = torch.randint(0, schedule.num_train_timesteps, (latent.shape[0],), generator=generator,
                      device=gen_device).to(latent.device)
    noise = torch.randn(latent.shape, generator=generator, device=gen_device).to(latent.device)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    z_t = alpha[:, None] * latent + sigma[:, None] * noise  # the online view: gradient flows into E
    x0_hat, _ = e2ediff.split_prediction(denoiser(z_t, t), z_t, alpha, sigma, PREDICTION_TYPE)
    return (x0_hat - latent.detach()).pow(2).mean(1)  # the target view: stop-gradient


def joint_terms(training: str, network: OneNetwork, images: torch.Tensor, schedule: e2ediff.NoiseSchedule,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The per-sample terms of one joint training ("naive" or "dsd") on a batch: recon and diffusion."""
    latent = network.encode(images)
    if training == "naive":  # L_v with z = E(x) un-detached: its gradient reaches E through z_t and the target
        diffusion = e2ediff.diffusion_loss(network, latent, schedule, PREDICTION_TYPE, generator=generator)
    else:
        diffusion = self_distillation_loss(network, latent, schedule, generator)
    return {"recon": reconstruction_error(network, images, latent), "diffusion": diffusion}


# --------------------------------------------------------------------------------------------------
# 3. Collapse indicators
# --------------------------------------------------------------------------------------------------


def effective_rank(matrix: torch.Tensor) -> float:
    """Roy & Vetterli (2007): exp of the entropy of the normalised singular values of (N, d) rows, after
    centring. d for isotropic rows, 1 when they all lie on one line."""
    singular = torch.linalg.svdvals((matrix - matrix.mean(0)).double())
    p = singular / singular.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def indicators(network: OneNetwork, images: torch.Tensor) -> dict[str, float]:
    """Per-dimension latent std (mean over dims), effective rank of the latents, reconstruction MSE."""
    latent = network.encode(images)
    return {"latent_std": float(latent.std(0).mean()), "effective_rank": effective_rank(latent),
            "recon_mse": float(reconstruction_error(network, images, latent).mean())}


# --------------------------------------------------------------------------------------------------
# 4. The three trainings
# --------------------------------------------------------------------------------------------------


def fit(config: Config, images: torch.Tensor, parameters, step_loss, probe, seed: int) -> list[dict]:
    """AdamW for config.steps steps on random batches; step_loss(batch, generator) -> scalar. Logs
    probe() (a dict) every config.log_every steps and at the end: the history rows."""
    optimizer = torch.optim.AdamW(parameters, lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for step in range(config.steps + 1):
        if step % config.log_every == 0 or step == config.steps:
            history.append({"step": step, **probe()})
        if step == config.steps:
            break
        batch = images[torch.randint(0, len(images), (config.batch_size,), generator=generator)]
        loss = step_loss(batch, generator)
        descend(optimizer, loss)
    return history


@dataclass
class Trained:
    """A trained model: who encodes/decodes and who denoises (the same network except in two-stage)."""
    autoencoder: OneNetwork
    denoiser: OneNetwork
    history: list[dict]
    seconds: float

    @property
    def parameters(self) -> int:
        networks = {id(self.autoencoder): self.autoencoder, id(self.denoiser): self.denoiser}
        return sum(p.numel() for network in networks.values() for p in network.parameters())


def train(training: str, config: Config, images: torch.Tensor, probe_images: torch.Tensor) -> Trained:
    """One of TRAININGS from scratch; the history holds the collapse indicators over training (for
    two-stage: of its autoencoder stage, whose latents the second stage then uses frozen)."""
    e2ediff.check_choice("training", training, TRAININGS)
    start, schedule = time.time(), build_schedule()
    torch.manual_seed(config.seed)
    network = build_network(config)
    probe = lambda: indicators(network, probe_images)  # noqa: E731

    def joint_loss(batch, generator):
        terms = joint_terms(training, network, batch, schedule, generator)
        return terms["recon"].mean() + config.diffusion_weight * terms["diffusion"].mean()

    if training != "two_stage":
        history = fit(config, images, network.parameters(), joint_loss, probe, config.seed)
        return Trained(network, network, history, time.time() - start)

    def autoencoder_loss(batch, generator):
        return reconstruction_error(network, batch, network.encode(batch)).mean()

    history = fit(config, images, network.parameters(), autoencoder_loss, probe, config.seed)
    network.requires_grad_(False)  # stage 2: the autoencoder is frozen, a second network denoises
    denoiser = build_network(config)

    def denoiser_loss(batch, generator):
        return e2ediff.diffusion_loss(denoiser, network.encode(batch), schedule, PREDICTION_TYPE, generator=generator).mean()

    fit(config, images, denoiser.parameters(), denoiser_loss, lambda: {}, config.seed + 1)
    return Trained(network, denoiser, history, time.time() - start)


# --------------------------------------------------------------------------------------------------
# 5. Few-step sampling in latent space, decoded
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_images(model: Trained, num_steps: int, num_samples: int, seed: int) -> torch.Tensor:
    """DDIM (eta = 0) with num_steps network evaluations from seeded N(0, I) latents, then the decoder:
    (num_samples, 1, 8, 8) clamped to the data range [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    z_T = torch.randn(num_samples, model.denoiser.latent_dim, generator=generator)
    latent = e2ediff.unrolled_sample(model.denoiser, z_T, build_schedule(), num_steps,
                                     prediction_type=PREDICTION_TYPE, update="ddim")
    return model.autoencoder.decode(latent).clamp(-1, 1)


class Judge:
    """The two sample metrics against the test split: CFD (toy_nets, the toy's metric) and the energy
    distance of the raw pixels (toy2d.energy_distance); lower is better for both."""

    def __init__(self, config: Config, data):
        classifier, _ = toy_data.load_metric_classifier()  # the fixed instrument: the same CFD on every CPU
        self.cfd = ClassifierFrechetDistance(classifier, data.test_images)
        self.test_pixels = data.test_images.flatten(1)

    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        return {"cfd": self.cfd(images), "energy": toy2d.energy_distance(images.flatten(1), self.test_pixels)}


# --------------------------------------------------------------------------------------------------
# 6. End-to-end fine-tuning through the network's own sampler and decoder (e2ediff's Algorithm 1)
# --------------------------------------------------------------------------------------------------


class DecodedEndToEndLoss(e2ediff.EndToEndLoss):
    """Alg. 1 lines 7-13 in latent space with the loss on decoded images: unroll the T-step sampler from
    z_T with gradients, decode its output with the same network, L1/L2 against the real digits. The
    sampler, the decoder (and, through the shared weights, the encoder) all train."""

    def forward(self, z_T, target, step, cond=None, uncond=None, target_image=None):
        latent = e2ediff.unrolled_sample(self.denoiser, z_T, self.schedule, self.config.num_steps, **self.sampler_options)
        image = self.denoiser.decode(latent)
        loss = e2ediff.reconstruction_loss(image, target_image, self.config.loss_weights)["recon"].mean()
        return loss, {"loss": loss.detach()}, image, target_image


def finetune_end_to_end(model: Trained, config: Config, images: torch.Tensor, probe_images: torch.Tensor) -> Trained:
    """A copy of a one-network model fine-tuned by e2ediff.train_step on DecodedEndToEndLoss. Coupling:
    each digit's z_T is the frozen model's DDIM inversion of its latent E(x) (e2ediff.ddim_invert), so the
    L2 regression is well-posed (see e2ediff's "Which coupling"). Returns the EMA network (tau = 0.95)."""
    if model.autoencoder is not model.denoiser:
        raise ValueError("end-to-end fine-tuning here is for one-network models (naive, dsd)")
    start, schedule, base = time.time(), build_schedule(), model.denoiser
    with torch.no_grad():
        latents = base.encode(images)
        z_T = e2ediff.ddim_invert(base, latents, schedule, config.inversion_steps, prediction_type=PREDICTION_TYPE)
    network = copy.deepcopy(base).requires_grad_(True)
    e2e = e2ediff.EndToEndConfig(num_steps=config.finetune_nfe, update="ddim", coupling="inversion", lpips_weight=0.0,
                                 inversion_steps=config.inversion_steps, grad_checkpoint=False)
    loss_fn = DecodedEndToEndLoss(network, schedule, e2e, PREDICTION_TYPE)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.finetune_lr)
    ema = e2ediff.EMA(network, e2e.ema_decay)
    generator = torch.Generator().manual_seed(config.seed)
    history = [{"step": 0, **indicators(ema.module, probe_images)}]
    for step in range(config.finetune_steps):
        index = torch.randint(0, len(images), (config.finetune_batch_size,), generator=generator)
        batch = {"target": latents[index], "z_T": z_T[index], "images": images[index]}
        e2ediff.train_step(loss_fn, optimizer, ema, [batch], step)
    history.append({"step": config.finetune_steps, **indicators(ema.module, probe_images)})
    return Trained(ema.module, ema.module, history, time.time() - start)


# --------------------------------------------------------------------------------------------------
# 7. One seed, everything
# --------------------------------------------------------------------------------------------------


def run(config: Config, log=print) -> dict:
    """Every model for one seed, trained, measured (indicators) and sampled (CFD, energy at each NFE).

    Models: naive, dsd, two_stage, dsd_no_latent_norm (the DSD objective without the latent LayerNorm: the
    ablation behind our reading), dsd_equal_updates (DSD trained 2 x steps: as many optimiser updates as
    the two-stage baseline's two stages together) and dsd+e2e (fine-tuned from dsd).

    :returns: {"rows": [{model, nfe, cfd, energy}], "final": {model: indicators}, "history": {training:
        rows}, "parameters": {model: count}, "seconds": {model: training time}, "reference": metrics of
        the train split itself (the metrics' floor)}.
    """
    data = toy_data.load_digits_data()
    images = data.train_images
    probe_images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:512]]
    judge = Judge(config, data)
    models = {}
    for training in TRAININGS:
        models[training] = train(training, config, images, probe_images)
        log(f"seed {config.seed} {training}: {models[training].seconds:.0f}s, {models[training].history[-1]}")
    models["dsd_no_latent_norm"] = train("dsd", dataclasses.replace(config, latent_norm=False), images, probe_images)
    models["dsd_equal_updates"] = train("dsd", dataclasses.replace(config, steps=2 * config.steps), images, probe_images)
    models["dsd+e2e"] = finetune_end_to_end(models["dsd"], config, images, probe_images)
    for name in ("dsd_no_latent_norm", "dsd_equal_updates", "dsd+e2e"):
        log(f"seed {config.seed} {name}: {models[name].seconds:.0f}s, {models[name].history[-1]}")
    rows = []
    for name, model in models.items():
        for nfe in config.nfe:
            metrics = judge(sample_images(model, nfe, config.eval_samples, seed=1000 + config.seed))
            rows.append({"model": name, "nfe": nfe, **metrics})
    return {"rows": rows, "final": {name: model.history[-1] for name, model in models.items()},
            "history": {name: models[name].history for name in (*TRAININGS, "dsd_no_latent_norm")},
            "parameters": {name: model.parameters for name, model in models.items()},
            "seconds": {name: model.seconds for name, model in models.items()},
            "reference": judge(images)}


def main(argv=None):
    torch.set_num_threads(1)  # a small MLP: one thread is fastest, and leaves the other core free
    try:
        config = parse_config(Config, argv, __doc__)
    except UsageError as error:
        exit_with(error)
    result = run(config)
    print(f"\nseed {config.seed}; lower is better; reference (train split vs test): CFD {result['reference']['cfd']:.1f}, "
          f"energy {result['reference']['energy']:.4f}")
    print("| model | parameters | latent std | effective rank | recon MSE | " + " | ".join(f"CFD {k} NFE" for k in config.nfe) + " |")
    print("|---" * (5 + len(config.nfe)) + "|")
    for name, final in result["final"].items():
        cfds = {r["nfe"]: r["cfd"] for r in result["rows"] if r["model"] == name}
        print(f"| {name} | {result['parameters'][name]:,} | {final['latent_std']:.3f} | {final['effective_rank']:.2f} | "
              f"{final['recon_mse']:.4f} | " + " | ".join(f"{cfds[k]:.1f}" for k in config.nfe) + " |")
    print(json.dumps({"config": dataclasses.asdict(config), "rows": result["rows"], "final": result["final"]}))


if __name__ == "__main__":
    main()
