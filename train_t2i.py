"""
End-to-end fine-tuning of a pretrained text-to-image diffusion model (E2EDiff, arXiv 2412.21044) at
full scale: unroll the model's own few-step sampler from pure noise in the VAE's latent space, keep
every step differentiable, put the loss on the final output. By default it reproduces the paper's
setting: PixArt-delta (a 0.6B PixArt transformer distilled to 4 LCM steps) with the SD VAE (frozen)
and T5 text embeddings (frozen), AdamW lr 1e-6, weight decay 1e-8, EMA 0.95, batch 8 per GPU,
24k steps, L2 on latents + LPIPS on decoded images.

One code path for one process and for many: DDP is switched on when torchrun sets RANK (NCCL on
GPUs, gloo on CPU). Rank 0 logs, samples and saves; every rank seeds differently.

Models. --pretrained is a diffusers pipeline folder or hub id with transformer/, vae/, text_encoder/,
tokenizer/, scheduler/ (the layout of PixArt-alpha/PixArt-LCM-XL-2-1024-MS); --transformer, --vae,
--text-encoder, --tokenizer, --scheduler override single parts (a folder or hub id holding that part
at its root). The noise schedule and prediction type come from scheduler/scheduler_config.json. On a
machine without hub access, download once and point at the folder (and export HF_HUB_OFFLINE=1, so
that a missing model fails at once with the download command instead of after the hub's retries):

    hf download PixArt-alpha/PixArt-LCM-XL-2-1024-MS --local-dir models/pixart-lcm

Data (--data): an image-caption folder in HF imagefolder form (metadata.jsonl rows with "file_name"
and "text"), WebDataset tar shards as img2dataset writes them (NNNNNNNNN.jpg + .txt per sample: a
folder of .tar files, a brace pattern 'shards/{00000..01023}.tar', or 'pipe:...' URLs), or a folder
written by --precompute-to. Images are resized and centre-cropped to --resolution. Corrupt images,
missing and empty captions are skipped and counted (the "skipped" field of every log row).

Single GPU (or CPU, slowly):

    python train_t2i.py --pretrained models/pixart-lcm --data data/laion-art --out-dir runs/e2e

One node, 8 GPUs:

    torchrun --standalone --nproc_per_node=8 train_t2i.py --pretrained models/pixart-lcm \\
        --data 'shards/{00000..01023}.tar'

The paper's 64 GPUs, 8 nodes (run on every node, NODE_RANK = 0..7, MASTER_ADDR = node 0's address):

    torchrun --nnodes=8 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER_ADDR:29500 --rdzv_id=e2ediff train_t2i.py --pretrained models/pixart-lcm \\
        --data 'shards/{00000..01023}.tar'

Continue from <out-dir>/ckpt.pt (model, EMA, optimisers, discriminator, step, data position, RNG):

    torchrun ... train_t2i.py ... --resume

Pre-compute VAE latents and T5 embeddings once (same torchrun command; each rank writes its share),
then train on them without running T5 or the VAE encoder in the training step:

    torchrun ... train_t2i.py --pretrained models/pixart-lcm --data 'shards/{00000..01023}.tar' --precompute-to cache/
    torchrun ... train_t2i.py --pretrained models/pixart-lcm --data cache/

Evaluation: with --eval-data (an imagefolder of prompts and reference images, e.g. COCO-30k) the EMA
model is scored by torchmetrics' CLIP score (--clip-model) and FID (torch-fidelity's Inception
weights, --inception-weights) every --eval-every steps and at the end; a missing model or weights
file is reported in the log and skipped.

Memory and throughput knobs: --checkpoint-steps (on: one sampler step's activations at a time),
--checkpoint-blocks (also every transformer/VAE-decoder block), --backprop-steps K (gradients through
the last K steps only), --batch-size with --grad-accum (same global batch, less memory),
--lpips-weight 0 (no differentiable VAE decode at full resolution: the largest activation cost),
--precompute-to (no T5 or VAE encoder in the step), --mixed-precision bf16, --num-workers.

Outputs in --out-dir: log.jsonl (config, one row per log step, checkpoints with a per-rank weight
checksum, evaluations), ckpt.pt, samples/step_NNNNNNN.png (EMA model, fixed prompts and noise) and
transformer_ema/ (the EMA denoiser in diffusers format, loadable into the pipeline) at the end.
`python train_t2i.py --help` lists every flag with its default and why.

Try it on CPU in a minute with tiny random models (what tests/test_t2i.py does):

    python tests/tiny_t2i.py /tmp/tiny
    torchrun --standalone --nproc_per_node=2 train_t2i.py --pretrained /tmp/tiny/pipeline \\
        --data /tmp/tiny/images --resolution 64 --max-text-length 16 --batch-size 2 --max-steps 3 \\
        --log-every 1 --lpips-weight 0 --out-dir /tmp/tiny/run
"""

import argparse
import contextlib
import copy
import dataclasses
import datetime
import hashlib
import io
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from e2ediff import (
    INCEPTION_WEIGHTS, inception_weights_path,
    EMA, GANLoss, LPIPS, PatchDiscriminator, check_prediction_type, couple, end_to_end_loss, load_checkpoint,
    StopRequest, make_schedule, rng_state, save_checkpoint, select_device, set_rng_state, unrolled_sample,
)

# ----------------------------------------------------------------------------------------------
# Config: every default says why; the fields become the command-line flags.


def option(default, why):
    return field(default=default, metadata={"help": why})


@dataclass
class Config:
    # models
    pretrained: str = option("PixArt-alpha/PixArt-LCM-XL-2-1024-MS",
                             "PixArt-delta, the paper's base (Sec. 4.1): hub id or pipeline folder")
    transformer: str = option("", "override the denoiser (folder or hub id with config.json at its root)")
    vae: str = option("", "override the VAE (AutoencoderKL); empty = <pretrained>/vae, the SD VAE")
    text_encoder: str = option("", "override the text encoder; empty = <pretrained>/text_encoder, T5")
    tokenizer: str = option("", "override the tokenizer; empty = <pretrained>/tokenizer")
    scheduler: str = option("", "override the folder holding scheduler_config.json (the noise schedule)")
    prediction_type: str = option("", "empty = the scheduler config's (epsilon for PixArt-delta)")
    zero_terminal_snr: bool = option(False, "off: PixArt-delta predicts epsilon, which zero terminal SNR rules out")
    max_text_length: int = option(120, "T5 tokens per caption: the PixArt pipelines' max_sequence_length")
    # sampler (Alg. 1 lines 6-10)
    num_steps: int = option(4, "PixArt-delta is distilled to 4 LCM steps; the paper trains at 4 NFE")
    update: str = option("lcm", "PixArt-delta's sampler: predict x0, re-noise (our reading of Alg. 1 l. 9)")
    eta: float = option(0.0, "DDIM stochasticity (only with --update ddim)")
    spacing: str = option("trailing", "starts at t=999 like PixArt-delta's LCM scheduler (999 759 499 259 vs 999 749 499 249)")
    coupling: str = option("independent", "Alg. 1: z_T independent of the data; inversion is better posed")
    inversion_steps: int = option(25, "DDIM-inversion steps of the frozen base (--coupling inversion)")
    teacher_steps: int = option(50, "frozen-base DDIM steps per target (--coupling teacher)")
    # losses (Eq. 7, Eq. 8)
    l1_weight: float = option(0.0, "L1 on latents; Table 2: L2 is slightly better")
    l2_weight: float = option(1.0, "L2 on latents (Table 2: L2 + LPIPS is the paper's best, FID 25.27)")
    lpips_weight: float = option(1.0, "LPIPS on VAE-decoded images (Table 2's best); relative weight not given: 1")
    lpips_net: str = option("alex", "LPIPS backbone (AlexNet: the LPIPS authors' default)")
    lpips_random_backbone: bool = option(False, "TESTS ONLY: random backbone, real heads (works offline)")
    gan_weight: float = option(0.0, "PatchGAN term; 0 = off (Table 2: +GAN costs FID, 25.74 vs 25.27)")
    gan_kind: str = option("hinge", "GAN objective (taming-transformers' hinge)")
    gan_start_step: int = option(0, "step at which the GAN term and the discriminator updates start")
    gan_adaptive: bool = option(True, "scale the GAN term by the ratio of gradient norms (taming)")
    r1_weight: float = option(0.0, "R1 penalty on the discriminator; 0 = off")
    disc_lr: float = option(1e-4, "discriminator Adam lr, betas (0.5, 0.9); not given in the paper")
    disc_channels: int = option(64, "PatchGAN width (taming's NLayerDiscriminator)")
    disc_layers: int = option(3, "PatchGAN strided layers (taming's default)")
    # optimisation
    batch_size: int = option(8, "images per GPU per micro-step: the paper's 8 (x 64 A100s = 512)")
    grad_accum: int = option(1, "micro-steps per optimiser step: keep 512 images per step on fewer GPUs")
    lr: float = option(1e-6, "AdamW learning rate (paper)")
    weight_decay: float = option(1e-8, "AdamW weight decay (paper)")
    adam_beta1: float = option(0.9, "AdamW default (the paper names AdamW, not its betas)")
    adam_beta2: float = option(0.999, "AdamW default")
    grad_clip: float = option(1.0, "gradient-norm clip; not in the paper: diffusers' scripts' default; 0 = off")
    ema_decay: float = option(0.95, "EMA of the weights (paper, Alg. 1 line 13)")
    max_steps: int = option(24000, "optimiser steps (paper)")
    mixed_precision: str = option("bf16", "bf16 autocast on GPU (weights and AdamW stay fp32); CPU runs fp32")
    checkpoint_steps: bool = option(True, "recompute each sampler step in backward: T steps at 1024^2 do not fit")
    checkpoint_blocks: bool = option(False, "also checkpoint every transformer and VAE-decoder block: less memory")
    backprop_steps: int = option(0, "0 = backprop through all T steps (paper); K = only the last K (DRaFT-K)")
    # data
    data: str = option("", "imagefolder, WebDataset shards (folder, brace pattern, pipe:) or a --precompute-to folder")
    resolution: int = option(1024, "PixArt-delta 1024-MS works at 1024^2, where the paper evaluates")
    num_workers: int = option(4, "DataLoader workers per rank (image decoding and tokenising)")
    precompute_to: str = option("", "write VAE latents + text embeddings of --data to this folder, then exit")
    cache_dtype: str = option("float16", "dtype of pre-computed tensors: float16 halves T5-XXL's 120x4096 per caption")
    # run
    out_dir: str = option("runs/t2i", "log.jsonl, ckpt.pt, samples/ and transformer_ema/ go here")
    device: str = option("auto", "auto = cuda (one per local rank) > mps > cpu")
    seed: int = option(0, "base seed; rank r uses seed + r")
    resume: bool = option(False, "continue from <out-dir>/ckpt.pt")
    log_every: int = option(10, "steps between log rows")
    sample_every: int = option(500, "steps between sample grids (and at the end); 0 = only at the end")
    ckpt_every: int = option(1000, "steps between checkpoints (and at the end); 0 = only at the end")
    sample_prompts: str = option("", "file with one prompt per line; empty = a built-in list of four")
    dist_timeout: float = option(1800.0, "seconds a collective waits for a stuck rank before the run fails")
    # evaluation
    eval_data: str = option("", "imagefolder of prompts + reference images (e.g. COCO-30k); empty = no eval")
    eval_every: int = option(0, "steps between evaluations; 0 = only at the end")
    eval_samples: int = option(0, "prompts to evaluate; 0 = all of --eval-data")
    clip_model: str = option("openai/clip-vit-large-patch14", "CLIP for the CLIP score (torchmetrics' default)")
    inception_weights: str = option("", "torch-fidelity's Inception weights; empty = $TORCH_HOME/hub/checkpoints")

    def __post_init__(self):
        for name, valid in CHOICES.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; valid: {', '.join(map(repr, valid))}")
        if not self.data:
            raise ValueError("--data is required: an imagefolder, WebDataset shards or a --precompute-to folder")
        if self.resolution % 8:
            raise ValueError(f"--resolution must be a multiple of 8 (the VAE factor), got {self.resolution}")
        if not 0 <= self.backprop_steps <= self.num_steps:
            raise ValueError(f"--backprop-steps must be in [0, --num-steps={self.num_steps}], "
                             f"got {self.backprop_steps}")


CHOICES = {
    "prediction_type": ("", "epsilon", "sample", "v_prediction"),
    "update": ("lcm", "ddim"),
    "spacing": ("trailing", "leading", "linspace"),
    "coupling": ("independent", "inversion", "teacher"),
    "lpips_net": ("alex", "vgg", "squeeze"),
    "gan_kind": ("hinge", "non_saturating"),
    "mixed_precision": ("bf16", "no"),
    "cache_dtype": ("float16", "bfloat16", "float32"),
}

SAMPLE_PROMPTS = (
    "A photo of a red fox standing in a snowy forest at dawn",
    "An astronaut riding a horse on the moon, digital art",
    "A bowl of ramen on a wooden table, close-up, soft light",
    "A watercolor painting of a lighthouse on a cliff at sunset",
)


def parse_config(argv=None):
    """Command line -> Config."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"] + (f" {{{', '.join(c for c in CHOICES[f.name] if c)}}}" if f.name in CHOICES else "")
        text += f" [default: {f.default!r}]"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            parser.add_argument(flag, type=f.type, default=f.default, help=text)
    try:
        return Config(**vars(parser.parse_args(argv)))
    except ValueError as error:
        parser.error(str(error))


# ----------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; without them this is one process.


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self):
        return dist.is_initialized()

    @property
    def master(self):
        return self.rank == 0


def setup_distributed(config: Config) -> Dist:
    """init_process_group from torchrun's environment (NCCL on GPUs, gloo on CPU), with a timeout."""
    if "RANK" not in os.environ:
        return Dist(device=select_device(config.device))
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = torch.cuda.is_available() and config.device in ("auto", "cuda")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=config.dist_timeout))
    return Dist(rank, world_size, device)


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place); the identity in a single process. NCCL reduces CUDA tensors only
    ("No backend type associated with device type cpu"), so a CPU tensor goes through this rank's GPU."""
    if not dist.is_initialized():
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        on_gpu = tensor.cuda()  # this rank's device (set_device in setup_distributed)
        dist.all_reduce(on_gpu)
        return tensor.copy_(on_gpu)
    dist.all_reduce(tensor)
    return tensor


def all_gather_object(obj, ctx: Dist) -> list:
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def sync_gradients(module, sync: bool):
    """DDP's gradient all-reduce only on the last micro-step of an accumulation (no_sync before it)."""
    return module.no_sync() if isinstance(module, DDP) and not sync else contextlib.nullcontext()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def weights_checksum(*modules) -> str:
    """sha256 of every parameter's bytes: equal on all ranks iff DDP kept the replicas identical."""
    digest = hashlib.sha256()
    for module in modules:
        for param in module.parameters():
            digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def inject_test_fault(step: int, ctx: Dist):
    """TESTS ONLY: E2EDIFF_TEST_FAULT="raise:<rank>:<step>" or "hang:<rank>:<step>" makes one rank fail."""
    spec = os.environ.get("E2EDIFF_TEST_FAULT")
    if not spec:
        return
    mode, rank, at_step = spec.split(":")
    if int(rank) == ctx.rank and int(at_step) == step:
        if mode == "raise":
            raise RuntimeError(f"E2EDIFF_TEST_FAULT: rank {ctx.rank} fails at step {step}")
        time.sleep(10**6)  # "hang": the other ranks must time out instead of waiting forever


# ----------------------------------------------------------------------------------------------
# Pretrained parts, loaded with diffusers / transformers from a hub id or a local folder.


class MissingModelError(FileNotFoundError):
    pass


def load_part(config: Config, name: str, loader, **kwargs):
    """One pretrained part: loader(<pretrained>, subfolder=name), or loader(config.<name>) when that
    override is given. A failure raises MissingModelError saying what to download, and where."""
    override, flag = getattr(config, name), "--" + name.replace("_", "-")
    path, subfolder = (override, None) if override else (config.pretrained, name)
    try:
        return loader(path, subfolder=subfolder, **kwargs) if subfolder else loader(path, **kwargs)
    except OSError as error:
        part, where = name.replace("_", " "), f"{path}/{subfolder}" if subfolder else path
        flag = flag if override else "--pretrained"
        if os.path.isdir(path):
            hint = (f"The folder {path} exists but has no loadable {part} in {where}/. --pretrained expects a "
                    f"diffusers pipeline folder (transformer/ vae/ text_encoder/ tokenizer/ scheduler/), as "
                    f"PixArt-alpha/PixArt-LCM-XL-2-1024-MS is laid out; --{name.replace('_', '-')} takes a folder "
                    f"with the {part} at its root.")
        else:
            local = os.path.join("models", path.rstrip("/").split("/")[-1])
            hint = (f"'{path}' is not a local folder, and the hub could not provide it (offline, HF_HUB_OFFLINE=1, "
                    f"a typo, or a gated repo). Download it where the hub is reachable:\n"
                    f"    hf download {path} --local-dir {local}\n"
                    f"then pass {flag} {local}")
        raise MissingModelError(f"could not load the {part} from {where}: {error}\n{hint}") from error


def load_scheduler_config(config: Config) -> dict:
    from diffusers import DDPMScheduler  # any scheduler class reads scheduler_config.json as a dict
    return dict(load_part(config, "scheduler", DDPMScheduler.load_config))


BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


def schedule_from_config(scheduler_config: dict, zero_terminal_snr: bool = False):
    """The e2ediff schedule that the pretrained model was trained with (diffusers scheduler config)."""
    kind = scheduler_config.get("beta_schedule", "linear")
    if kind not in BETA_SCHEDULES or scheduler_config.get("trained_betas") is not None:
        raise ValueError(f"unsupported beta_schedule {kind!r} (or explicit trained_betas) in the scheduler config; "
                         f"supported: {', '.join(BETA_SCHEDULES)}")
    return make_schedule(
        BETA_SCHEDULES[kind], num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000),
        beta_start=scheduler_config.get("beta_start") if kind != "squaredcos_cap_v2" else None,
        beta_end=scheduler_config.get("beta_end") if kind != "squaredcos_cap_v2" else None,
        zero_terminal_snr=zero_terminal_snr or bool(scheduler_config.get("rescale_betas_zero_snr", False)))


def load_text_parts(config: Config, device, dtype):
    """The frozen text encoder (T5 by default) and its tokenizer."""
    import transformers
    text_encoder = load_part(config, "text_encoder", transformers.T5EncoderModel.from_pretrained, dtype=dtype)
    tokenizer = load_part(config, "tokenizer", transformers.AutoTokenizer.from_pretrained)
    return text_encoder.to(device).eval().requires_grad_(False), tokenizer


def load_vae(config: Config, device):
    """The frozen VAE (AutoencoderKL). Kept in fp32: it is small, and autocast runs it in bf16 on GPU."""
    from diffusers import AutoencoderKL
    vae = load_part(config, "vae", AutoencoderKL.from_pretrained)
    return vae.to(device, torch.float32).eval().requires_grad_(False)


def load_transformer(config: Config):
    """The denoiser: whichever diffusers class its config.json names (PixArtTransformer2DModel, a UNet, ...)."""
    from diffusers import AutoModel
    return load_part(config, "transformer", AutoModel.from_pretrained)


class Denoiser(nn.Module):
    """A diffusers PixArt transformer (or UNet2DConditionModel) in e2ediff's protocol:
    model(z_t (B, C, h, w), t (B,), cond=(text_embeddings (B, L, D), attention_mask (B, L))) -> (B, C, h, w)."""

    def __init__(self, transformer: nn.Module, vae_scale_factor: int = 8):
        super().__init__()
        self.transformer, self.vae_scale_factor = transformer, vae_scale_factor

    @property
    def last_layer(self) -> torch.Tensor:
        """The output projection's weight, where the adaptive GAN weight compares gradient norms."""
        for name in ("proj_out", "conv_out"):  # PixArt / UNet
            if hasattr(self.transformer, name):
                return getattr(self.transformer, name).weight
        return [p for p in self.transformer.parameters() if p.dim() > 1][-1]

    def forward(self, z_t, t, cond):
        text_embeddings, attention_mask = cond
        kwargs = {}
        if type(self.transformer).__name__ == "PixArtTransformer2DModel":
            # as diffusers' PixArtAlphaPipeline (step 6.1): the 1024-MS models also take the image size
            kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
            if self.transformer.use_additional_conditions:
                height, width = (s * self.vae_scale_factor for s in z_t.shape[-2:])
                kwargs["added_cond_kwargs"] = {
                    "resolution": z_t.new_tensor([[height, width]]).expand(len(z_t), 2),
                    "aspect_ratio": z_t.new_tensor([[height / width]]).expand(len(z_t), 1)}
        output = self.transformer(z_t, timestep=t, encoder_hidden_states=text_embeddings,
                                  encoder_attention_mask=attention_mask, return_dict=False, **kwargs)[0]
        if output.shape[1] == 2 * z_t.shape[1]:  # PixArt's out_channels = 2 C: a learned variance we do not use
            output = output[:, : z_t.shape[1]]
        return output


class EndToEnd(nn.Module):
    """Alg. 1 lines 6-11 as one module: unroll the sampler, Eq. 7 (+ Eq. 8) on its output.

    DDP wraps this, so DDP sees one forward per step and the per-step activation checkpointing runs
    inside it (DDP cannot wrap a module that is checkpointed from outside). Only `denoiser` is a
    registered submodule: the frozen VAE, LPIPS and the discriminator stay outside DDP's view.
    """

    def __init__(self, denoiser: Denoiser, schedule, config: Config, prediction_type: str, decode, lpips, gan):
        super().__init__()
        self.denoiser, self.schedule, self.config, self.prediction_type = denoiser, schedule, config, prediction_type
        self.helpers = {"decode": decode, "lpips": lpips, "gan": gan}  # a dict: not registered as submodules

    def forward(self, z_T, target, cond, step: int, target_image=None):
        c = self.config
        return end_to_end_loss(
            self.denoiser, z_T, target, self.schedule, c.num_steps,
            loss_weights={"l1": c.l1_weight, "l2": c.l2_weight, "lpips": c.lpips_weight},
            lpips=self.helpers["lpips"], gan=self.helpers["gan"], step=step, last_layer=self.denoiser.last_layer,
            decode=self.helpers["decode"], target_image=target_image, prediction_type=self.prediction_type,
            update=c.update, eta=c.eta, spacing=c.spacing, cond=cond, checkpoint=c.checkpoint_steps,
            backprop_steps=c.backprop_steps or None)


class LatentCodec:
    """The frozen VAE as the map between images in [-1, 1] and the denoiser's (scaled) latents."""

    def __init__(self, vae):
        self.vae = vae
        self.scale, self.shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def distribution(self, images):
        """(B, 3, H, W) -> mean, std of q(z | x), each (B, C, H/f, W/f), unscaled."""
        posterior = self.vae.encode(images).latent_dist
        return posterior.mean, posterior.std

    def sample(self, mean, std):
        """A latent from the posterior, scaled as the denoiser was trained: (z - shift) * scale."""
        return (mean.float() + std.float() * torch.randn_like(mean, dtype=torch.float32) - self.shift) * self.scale

    def decode(self, latents):
        """Differentiable w.r.t. the latents (the VAE's own weights are frozen)."""
        return self.vae.decode(latents / self.scale + self.shift).sample


@torch.no_grad()
def encode_text(text_encoder, input_ids, attention_mask):
    """(B, L) token ids -> (B, L, D) embeddings, (B, L) mask, on the text encoder's device."""
    input_ids, attention_mask = input_ids.to(text_encoder.device), attention_mask.to(text_encoder.device)
    return text_encoder(input_ids, attention_mask=attention_mask)[0], attention_mask


def tokenize(tokenizer, captions, max_length):
    tokens = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    return tokens.input_ids, tokens.attention_mask


# ----------------------------------------------------------------------------------------------
# Data: one stream per (rank, DataLoader worker); bad samples skipped and counted; resumable.

SKIP_REASONS = ("corrupt_image", "missing_caption", "empty_caption", "corrupt_shard", "corrupt_file")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def data_kind(spec: str) -> str:
    """'imagefolder', 'precomputed' or 'webdataset', from what --data points at."""
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "metadata.jsonl")):
            return "imagefolder"
        if os.path.isfile(os.path.join(spec, "meta.json")):
            return "precomputed"
        if any(name.endswith(".tar") for name in os.listdir(spec)):
            return "webdataset"
        raise FileNotFoundError(f"--data {spec}: a folder with neither metadata.jsonl (imagefolder), meta.json "
                                f"(--precompute-to output) nor .tar shards (WebDataset)")
    if ".tar" in spec or spec.startswith("pipe:"):
        return "webdataset"
    raise FileNotFoundError(f"--data {spec}: no such folder, and not a .tar shard pattern")


def list_units(spec: str, kind: str) -> list:
    """The units the data is dealt out in: imagefolder rows, tar shards, or pre-computed files."""
    if kind == "imagefolder":
        with open(os.path.join(spec, "metadata.jsonl")) as f:
            return [(spec, json.loads(line)) for line in f if line.strip()]
    if kind == "precomputed":
        return sorted(os.path.join(spec, name) for name in os.listdir(spec) if name.endswith(".safetensors"))
    if os.path.isdir(spec):
        return sorted(os.path.join(spec, name) for name in os.listdir(spec) if name.endswith(".tar"))
    import braceexpand
    urls = list(braceexpand.braceexpand(spec))
    missing = [url for url in urls if "://" not in url and not url.startswith("pipe:") and not os.path.isfile(url)]
    if missing:
        raise FileNotFoundError(f"--data {spec}: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}")
    return urls


class CaptionStream(IterableDataset):
    """Image-caption samples (or pre-computed tensors) for this rank and DataLoader worker.

    The units are shuffled once with a seed all ranks share and dealt out to the world_size x
    num_workers readers (as wds.split_by_node then wds.split_by_worker would: no two readers share a
    unit); each reader reshuffles its own share every epoch. A bad sample is skipped and counted once,
    by the one reader that owns it. Each item carries its reader's position after it, so a checkpoint
    can restart every reader where it stopped.
    """

    def __init__(self, spec: str, resolution: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 epochs: int | None = None, start: dict | None = None):
        import torchvision.transforms as T
        self.kind = data_kind(spec)
        self.units = list_units(spec, self.kind)
        self.rank, self.world_size, self.seed, self.epochs, self.start = rank, world_size, seed, epochs, start or {}
        self.transform = T.Compose([
            T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(resolution), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])  # [-1, 1]

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        readers = self.world_size * num_workers
        if len(self.units) < readers:
            raise ValueError(f"{len(self.units)} {self.kind} units for {readers} readers ({self.world_size} ranks x "
                             f"{num_workers} workers): every reader needs at least one; write more shards or lower "
                             f"--num-workers")
        reader = self.rank * num_workers + worker
        owner = torch.randperm(len(self.units), generator=torch.Generator().manual_seed(self.seed)).tolist()
        mine = [self.units[i] for i in owner[reader::readers]]  # fixed: each unit (and bad sample) has one reader
        state = self.start.get(worker, {"epoch": 0, "unit": 0, "item": 0, "bad": {}})
        epoch, first_unit, first_item, bad = state["epoch"], state["unit"], state["item"], dict(state["bad"])
        while self.epochs is None or epoch < self.epochs:
            shuffle = torch.Generator().manual_seed(self.seed + 1_000_003 * (epoch + 1) + reader)
            order = torch.randperm(len(mine), generator=shuffle).tolist()  # a new order every epoch
            yielded = False
            for unit in range(first_unit, len(mine)):
                for index, (key, item, reason) in enumerate(self.read(mine[order[unit]])):
                    if index < first_item:
                        continue  # resuming inside a shard
                    if item is None:
                        bad.setdefault(key, reason)  # counted once, however many epochs meet it
                        continue
                    yielded = True
                    item["state"] = {"worker": worker, "epoch": epoch, "unit": unit, "item": index + 1,
                                     "bad": dict(bad)}
                    yield item
                first_item = 0
            if not yielded and first_unit == 0:
                raise RuntimeError(f"rank {self.rank} worker {worker}: no usable sample in a whole epoch of "
                                   f"{len(mine)} {self.kind} units (skipped: {dict(Counter(bad.values()))})")
            epoch, first_unit = epoch + 1, 0
        # a finite stream ends with its final state alone, so bad samples after the last good one count too
        yield {"state": {"worker": worker, "epoch": epoch, "unit": 0, "item": 0, "bad": dict(bad)}}

    def read(self, unit):
        """Yields (key, item or None, skip reason or None) for every sample of one unit."""
        if self.kind == "imagefolder":
            yield self._read_row(*unit)
        elif self.kind == "webdataset":
            yield from self._read_shard(unit)
        else:
            yield self._read_precomputed(unit)

    def _read_row(self, folder, row):
        key = str(row.get("file_name"))
        caption = row.get("text")
        if caption is None:
            return key, None, "missing_caption"
        if not str(caption).strip():
            return key, None, "empty_caption"
        try:
            with Image.open(os.path.join(folder, key)) as image:
                pixels = self.transform(image.convert("RGB"))
        except Exception:  # unreadable, truncated, missing file, decompression bomb: one bad sample
            return key, None, "corrupt_image"
        return key, {"pixels": pixels, "caption": str(caption), "key": key}, None

    def _read_shard(self, url):
        import webdataset as wds
        errors = []
        samples = wds.tarfile_to_samples(handler=lambda error: errors.append(error) or True)([{"url": url}])
        shard = (re.findall(r"([^/\s]+)\.tar", url) or [hashlib.sha1(url.encode()).hexdigest()[:12]])[-1]
        for sample in samples:
            key = f"{shard}-{sample['__key__']}"
            image_bytes = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
            caption = sample.get("txt")
            if caption is None:
                yield key, None, "missing_caption"
                continue
            caption = caption.decode("utf-8", errors="replace").strip()
            if not caption:
                yield key, None, "empty_caption"
                continue
            try:
                with Image.open(io.BytesIO(image_bytes)) as image:
                    pixels = self.transform(image.convert("RGB"))
            except Exception:  # no image in the sample, or an undecodable one
                yield key, None, "corrupt_image"
                continue
            yield key, {"pixels": pixels, "caption": caption, "key": key}, None
        if errors:  # a truncated or unreadable tar: the rest of the shard is lost, the run goes on
            yield url, None, "corrupt_shard"

    def _read_precomputed(self, path):
        from safetensors.torch import load_file
        key = os.path.basename(path)[: -len(".safetensors")]
        try:
            return key, {**load_file(path), "key": key}, None
        except Exception:
            return key, None, "corrupt_file"


def collate(items, tokenizer=None, max_text_length=120):
    """Stack a batch; tokenise captions here, in the DataLoader worker. A finite stream's last batch
    may hold only its final state (keys == [])."""
    batch = {"state": items[-1]["state"]}
    items = [item for item in items if "key" in item]
    batch["keys"] = [item["key"] for item in items]
    if not items:
        return batch
    if "pixels" in items[0]:
        batch["pixels"] = torch.stack([item["pixels"] for item in items])
        batch["captions"] = [item["caption"] for item in items]
        if tokenizer is not None:
            batch["input_ids"], batch["attention_mask"] = tokenize(tokenizer, batch["captions"], max_text_length)
    else:
        for name in ("latent_mean", "latent_std", "text_embeddings", "attention_mask"):
            batch[name] = torch.stack([item[name] for item in items])
    return batch


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT / SIGTERM, which reach a rank's whole process group (torchrun
    forwards Ctrl-C to each rank that way): their rank finishes its step, checkpoints and stops, and
    the DataLoader shuts them down after."""
    for signum in StopRequest.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def make_loader(stream: CaptionStream, config: Config, tokenizer, device):
    return DataLoader(stream, batch_size=config.batch_size, num_workers=config.num_workers,
                      collate_fn=partial(collate, tokenizer=tokenizer, max_text_length=config.max_text_length),
                      pin_memory=device.type == "cuda", persistent_workers=config.num_workers > 0,
                      worker_init_fn=ignore_stop_signals,
                      generator=torch.Generator())  # its own: starting workers must not draw from the training RNG


def count_skipped(reader_states: dict) -> dict:
    """Skip counts summed over this rank's readers and all ranks: {reason: n}."""
    counts = Counter()
    for state in reader_states.values():
        counts.update(state["bad"].values())
    totals = all_reduce(torch.tensor([counts[reason] for reason in SKIP_REASONS], dtype=torch.float64))
    return {reason: int(n) for reason, n in zip(SKIP_REASONS, totals.tolist())}


# ----------------------------------------------------------------------------------------------
# Pre-computation: VAE posteriors and text embeddings to disk, one safetensors file per sample.


def precompute(config: Config, ctx: Dist):
    """Writes <precompute-to>/<key>.safetensors (latent_mean, latent_std, text_embeddings,
    attention_mask) for every usable sample of --data (each rank its share), then meta.json."""
    from safetensors.torch import save_file
    stream = CaptionStream(config.data, config.resolution, ctx.rank, ctx.world_size, config.seed, epochs=1)
    if stream.kind == "precomputed":
        raise ValueError(f"--data {config.data} is already pre-computed")
    dtype = getattr(torch, config.cache_dtype)
    text_encoder, tokenizer = load_text_parts(config, ctx.device, frozen_dtype(config, ctx.device))
    codec = LatentCodec(load_vae(config, ctx.device))
    os.makedirs(config.precompute_to, exist_ok=True)
    written, readers = 0, {}
    for batch in make_loader(stream, config, tokenizer, ctx.device):
        readers[batch["state"]["worker"]] = batch["state"]
        if not batch["keys"]:
            continue
        with autocast(config, ctx.device):
            mean, std = codec.distribution(batch["pixels"].to(ctx.device))
            embeddings, mask = encode_text(text_encoder, batch["input_ids"], batch["attention_mask"])
        for i, key in enumerate(batch["keys"]):
            tensors = {"latent_mean": mean[i], "latent_std": std[i], "text_embeddings": embeddings[i]}
            tensors = {name: value.to(dtype).contiguous().cpu() for name, value in tensors.items()}
            tensors["attention_mask"] = mask[i].contiguous().cpu()
            filename = re.sub(r"[^\w.-]", "_", key) + ".safetensors"
            save_file(tensors, os.path.join(config.precompute_to, filename))
        written += len(batch["keys"])
    total = int(all_reduce(torch.tensor(written, dtype=torch.float64)).item())
    skipped = count_skipped(readers)
    barrier()
    if ctx.master:
        meta = {"format": "e2ediff-precomputed-v1", "samples": total, "skipped": skipped, "source": config.data,
                "resolution": config.resolution, "max_text_length": config.max_text_length,
                "pretrained": config.pretrained, "vae": config.vae, "text_encoder": config.text_encoder}
        with open(os.path.join(config.precompute_to, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        print(f"pre-computed {total} samples into {config.precompute_to} (skipped: {skipped})")
    barrier()


# ----------------------------------------------------------------------------------------------
# Evaluation: CLIP score and FID through torchmetrics, on an imagefolder of prompts and images.

class CLIPFeatures(nn.Module):
    """A CLIPModel whose get_*_features return tensors: transformers 5 returns a ModelOutput, which
    torchmetrics 1.9's CLIPScore cannot read (Lightning-AI/torchmetrics#3407, fixed after 1.9.0)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        features = self.model.get_image_features(*args, **kwargs)
        return features if torch.is_tensor(features) else features.pooler_output

    def get_text_features(self, *args, **kwargs):
        features = self.model.get_text_features(*args, **kwargs)
        return features if torch.is_tensor(features) else features.pooler_output


def build_metrics(config: Config, device) -> tuple[dict, list[str]]:
    """({"clip_score": CLIPScore, "fid": FID} for those whose models are on hand, [messages for the rest])."""
    metrics, messages = {}, []
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor

        def clip():  # a callable: torchmetrics 1.9 rejects names without "openai" in them, e.g. local folders
            model = CLIPFeatures(CLIPModel.from_pretrained(config.clip_model))
            return model, CLIPProcessor.from_pretrained(config.clip_model)
        metrics["clip_score"] = CLIPScore(model_name_or_path=clip).to(device)
    except Exception as error:  # missing model offline (OSError), gated repo, missing package
        local = os.path.join("models", config.clip_model.rstrip("/").split("/")[-1])
        messages.append(f"CLIP score skipped: could not load CLIP model '{config.clip_model}' ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}). Download it where the hub is reachable "
                        f"(hf download {config.clip_model} --local-dir {local}) and pass --clip-model {local}.")
    weights = inception_weights_path(config.inception_weights)
    if not os.path.isfile(weights):
        messages.append(f"FID skipped: torch-fidelity's Inception weights {INCEPTION_WEIGHTS} are not at {weights} "
                        f"(torch-fidelity downloads them on first use when online: copy the file to "
                        f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}/ or pass --inception-weights PATH).")
    else:
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
            metrics["fid"] = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights).to(device)
        except Exception as error:
            messages.append(f"FID skipped: could not build the Inception network from {weights}: {error}")
    return metrics, messages


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> [0, 255] uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def evaluate(config: Config, ctx: Dist, denoiser, text_encoder, tokenizer, codec, schedule, prediction_type) -> dict:
    """Generate one image per --eval-data prompt (ranks share the prompts) and score them.
    Returns {"clip_score": ., "fid": .} for the available metrics, and "messages" for the others."""
    metrics, messages = build_metrics(config, ctx.device)
    if not metrics:
        return {"messages": messages}
    stream = CaptionStream(config.eval_data, config.resolution, ctx.rank, ctx.world_size, config.seed, epochs=1)
    budget = config.eval_samples or len(stream.units)
    generator = torch.Generator(ctx.device).manual_seed(config.seed + 1000 * ctx.rank)
    seen = 0
    for batch in make_loader(stream, config, tokenizer, ctx.device):
        take = min(len(batch["keys"]), max(0, -(-budget // ctx.world_size) - seen))
        if take == 0:
            break
        seen += take
        real = batch["pixels"][:take].to(ctx.device)
        cond = encode_text(text_encoder, batch["input_ids"][:take], batch["attention_mask"][:take])
        fake = generate(config, denoiser, cond, schedule, prediction_type, codec, generator)
        if "fid" in metrics:
            metrics["fid"].update(to_uint8(real), real=True)
            metrics["fid"].update(to_uint8(fake), real=False)
        if "clip_score" in metrics:
            metrics["clip_score"].update(to_uint8(fake), batch["captions"][:take])
    scores = {name: float(metric.compute()) for name, metric in metrics.items()}  # compute() gathers all ranks
    return {**scores, "messages": messages}


@torch.no_grad()
def generate(config: Config, denoiser, cond, schedule, prediction_type, codec: LatentCodec, generator) -> torch.Tensor:
    """Images in [-1, 1] from the model's own T-step sampler (no gradients)."""
    text_embeddings = cond[0]
    channels = denoiser.transformer.config.in_channels
    size = config.resolution // codec.factor
    z_T = torch.randn(len(text_embeddings), channels, size, size, generator=generator, device=generator.device)
    with autocast(config, text_embeddings.device):
        z0 = unrolled_sample(denoiser, z_T.to(text_embeddings.device), schedule, config.num_steps, cond=cond,
                             prediction_type=prediction_type, update=config.update, eta=config.eta,
                             spacing=config.spacing, generator=generator)
        return codec.decode(z0).float().clamp(-1, 1)


# ----------------------------------------------------------------------------------------------
# Training


def frozen_dtype(config: Config, device) -> torch.dtype:
    """bf16 for the frozen text encoder (T5-XXL is 19 GB in fp32) when autocasting to bf16; else fp32."""
    return torch.bfloat16 if config.mixed_precision == "bf16" and device.type == "cuda" else torch.float32


def autocast(config: Config, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=frozen_dtype(config, device) == torch.bfloat16)


class Log:
    """Rank 0 prints and appends JSON rows to <out-dir>/log.jsonl; other ranks stay silent."""

    def __init__(self, path: str, master: bool):
        self.path, self.master = path, master

    def __call__(self, row: dict, text: str | None = None):
        if not self.master:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(text or json.dumps(row), flush=True)


def save_samples(config, step, denoiser, sample_cond, schedule, prediction_type, codec, device):
    """A grid of the EMA model's samples for the fixed prompts and fixed noise (rank 0)."""
    import torchvision
    generator = torch.Generator(device).manual_seed(config.seed)
    images = generate(config, denoiser, sample_cond, schedule, prediction_type, codec, generator)
    path = os.path.join(config.out_dir, "samples", f"step_{step:07d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torchvision.utils.save_image((images + 1) / 2, path, nrow=len(images))
    return path


def train(config: Config, ctx: Dist):
    torch.manual_seed(config.seed + ctx.rank)  # every rank its own noise; DDP broadcasts rank 0's weights
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    os.makedirs(config.out_dir, exist_ok=True)
    log = Log(os.path.join(config.out_dir, "log.jsonl"), ctx.master)
    log({"event": "config", "world_size": ctx.world_size, "device": str(ctx.device), **asdict(config)},
        f"train_t2i: {ctx.world_size} process(es) on {ctx.device.type}; config in {log.path}")

    kind = data_kind(config.data)
    if kind == "precomputed":
        with open(os.path.join(config.data, "meta.json")) as f:
            meta = json.load(f)
        if meta["resolution"] != config.resolution:
            raise ValueError(f"{config.data} was pre-computed at --resolution {meta['resolution']}, "
                             f"not {config.resolution}")

    # ---- models
    scheduler_config = load_scheduler_config(config)
    prediction_type = config.prediction_type or scheduler_config.get("prediction_type", "epsilon")
    schedule = schedule_from_config(scheduler_config, config.zero_terminal_snr).to(ctx.device)
    check_prediction_type(prediction_type, schedule)
    text_encoder, tokenizer = load_text_parts(config, ctx.device, frozen_dtype(config, ctx.device))
    codec = LatentCodec(load_vae(config, ctx.device))
    transformer = load_transformer(config).to(ctx.device, torch.float32).train()  # fp32: 1e-6 updates vanish in bf16
    if config.checkpoint_blocks:
        transformer.enable_gradient_checkpointing()
        codec.vae.enable_gradient_checkpointing()
    denoiser = Denoiser(transformer, codec.factor)
    if config.resolution // codec.factor != transformer.config.sample_size:
        log({"event": "note", "message": f"training at {config.resolution}px = {config.resolution // codec.factor}^2 "
             f"latents; the transformer was trained at sample_size {transformer.config.sample_size}"})
    ema = EMA(denoiser, decay=config.ema_decay)
    base = None
    if config.coupling != "independent":  # the frozen pretrained model that inverts data / makes targets
        base = copy.deepcopy(denoiser).to(frozen_dtype(config, ctx.device)).eval().requires_grad_(False)
    lpips = None
    if config.lpips_weight > 0:
        lpips = LPIPS(config.lpips_net, random_backbone=config.lpips_random_backbone).to(ctx.device)
    gan = discriminator = disc_optimizer = None
    if config.gan_weight > 0:
        discriminator = PatchDiscriminator(3, config.disc_channels, config.disc_layers).to(ctx.device)
        disc_optimizer = torch.optim.Adam(discriminator.parameters(), lr=config.disc_lr, betas=(0.5, 0.9))
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(config.adam_beta1, config.adam_beta2))

    # ---- fixed prompts for the sample grids, encoded once
    prompts = SAMPLE_PROMPTS
    if config.sample_prompts:
        with open(config.sample_prompts) as f:
            prompts = tuple(line.strip() for line in f if line.strip())
    sample_cond = encode_text(text_encoder, *tokenize(tokenizer, prompts, config.max_text_length))
    if kind == "precomputed" and not config.eval_data:
        del text_encoder  # pre-computed embeddings: T5 is not needed in the training step
        text_encoder = None
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- resume (all ranks read the checkpoint)
    step, reader_states = 0, {}
    ckpt_path = os.path.join(config.out_dir, "ckpt.pt")
    if config.resume:
        checkpoint = load_checkpoint(ckpt_path)
        transformer.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if discriminator is not None and checkpoint.get("discriminator") is not None:
            discriminator.load_state_dict(checkpoint["discriminator"])
            disc_optimizer.load_state_dict(checkpoint["disc_optimizer"])
        step = checkpoint["step"]
        saved_config = checkpoint["config"]
        same_layout = checkpoint["world_size"] == ctx.world_size and saved_config["num_workers"] == config.num_workers
        if same_layout:
            reader_states = checkpoint["data"][ctx.rank]
            set_rng_state(checkpoint["rng"][ctx.rank])
        else:  # another world size or worker count: restart the epoch the slowest reader was in
            epoch = min((s["epoch"] for rank_states in checkpoint["data"] for s in rank_states.values()), default=0)
            fresh = {"epoch": epoch, "unit": 0, "item": 0, "bad": {}}
            reader_states = {worker: dict(fresh) for worker in range(max(config.num_workers, 1))}
            torch.manual_seed(config.seed + ctx.rank + 7919 * step)
        changed = {name: (old, getattr(config, name)) for name, old in saved_config.items()
                   if name != "resume" and getattr(config, name, old) != old}
        log({"event": "resume", "step": step, "path": ckpt_path, "exact_data_position": same_layout,
             "changed_config": changed})
        del checkpoint

    # ---- DDP: only the trainable modules (the discriminator first: the GAN loss holds the wrapped one)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    disc_model = discriminator
    if discriminator is not None and ctx.enabled:
        disc_model = DDP(discriminator, device_ids=device_ids)
    if discriminator is not None:
        gan = GANLoss(disc_model, kind=config.gan_kind, weight=config.gan_weight, start_step=config.gan_start_step,
                      adaptive=config.gan_adaptive, r1_weight=config.r1_weight)
    model = EndToEnd(denoiser, schedule, config, prediction_type, codec.decode, lpips, gan)
    if ctx.enabled:
        model = DDP(model, device_ids=device_ids)

    # ---- data
    stream = CaptionStream(config.data, config.resolution, ctx.rank, ctx.world_size, config.seed, start=reader_states)
    batches = iter(make_loader(stream, config, tokenizer, ctx.device))
    images_per_step = config.batch_size * config.grad_accum * ctx.world_size
    log({"event": "start", "step": step, "data": kind, "units": len(stream.units), "prediction_type": prediction_type,
         "parameters": sum(p.numel() for p in denoiser.parameters()), "global_batch": images_per_step})

    def save(step):
        """Checkpoint (rank 0 writes, atomically) and the replica check (every rank's weight checksum)."""
        data_states = all_gather_object(reader_states, ctx)
        rng_states = all_gather_object(rng_state(), ctx)
        checksums = all_gather_object(weights_checksum(denoiser, *([discriminator] if discriminator else [])), ctx)
        if ctx.master:
            save_checkpoint({
                "model": transformer.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "discriminator": discriminator.state_dict() if discriminator else None,
                "disc_optimizer": disc_optimizer.state_dict() if disc_optimizer else None,
                "step": step, "config": asdict(config), "world_size": ctx.world_size,
                "data": data_states, "rng": rng_states}, ckpt_path)
        identical = len(set(checksums)) == 1
        log({"event": "checkpoint", "step": step, "path": ckpt_path, "replica_checksums": checksums,
             "replicas_identical": identical})
        barrier()
        if not identical:
            raise RuntimeError(f"DDP replicas diverged at step {step}: weight checksums {checksums}")

    def run_eval(step):
        result = evaluate(config, ctx, ema.module, text_encoder, tokenizer, codec, schedule, prediction_type)
        log({"event": "eval", "step": step, **result})

    # ---- the loop (Alg. 1)
    window = []
    with StopRequest() as stop:  # Ctrl-C / SIGTERM: finish the step, checkpoint, stop
        while step < config.max_steps:
            inject_test_fault(step, ctx)
            started, logs_step = time.time(), Counter()
            for micro in range(config.grad_accum):
                batch = next(batches)
                reader_states[batch["state"]["worker"]] = batch["state"]
                with torch.no_grad(), autocast(config, ctx.device):  # Alg. 1 lines 3-4: z0 = E(x0), e_c = TextEnc(c)
                    pixels = batch["pixels"].to(ctx.device) if "pixels" in batch else None
                    if pixels is not None:
                        z0 = codec.sample(*codec.distribution(pixels))
                        cond = encode_text(text_encoder, batch["input_ids"], batch["attention_mask"])
                    else:
                        z0 = codec.sample(batch["latent_mean"].to(ctx.device), batch["latent_std"].to(ctx.device))
                        cond = (batch["text_embeddings"].to(ctx.device, torch.float32),
                                batch["attention_mask"].to(ctx.device))
                    z_T, target = couple(config.coupling, z0, base_model=base, schedule=schedule, cond=cond,
                                         prediction_type=prediction_type, inversion_steps=config.inversion_steps,
                                         teacher_steps=config.teacher_steps)
                    gan_on = gan is not None and gan.active(step)
                    target_image = None
                    if config.lpips_weight > 0 or gan_on:  # real pixels when they are the target, else decoded targets
                        real_is_target = pixels is not None and config.coupling != "teacher"
                        target_image = pixels if real_is_target else codec.decode(target)
                last = micro == config.grad_accum - 1
                with sync_gradients(model, last), autocast(config, ctx.device):
                    loss, logs, image = model(z_T, target, cond, step, target_image)  # Alg. 1 lines 6-11
                    (loss / config.grad_accum).backward()
                if gan_on:  # the discriminator's own step on real vs the sampler's (detached) images
                    with sync_gradients(disc_model, last), autocast(config, ctx.device):
                        disc = gan.discriminator_loss(target_image, image.detach(), step)
                        (disc["disc"] / config.grad_accum).backward()
                    logs = {**logs, "disc": disc["disc"].detach()}
                for name, value in logs.items():
                    logs_step[name] += float(value) / config.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(denoiser.parameters(), config.grad_clip or float("inf"))
            optimizer.step()  # Alg. 1 line 12
            optimizer.zero_grad(set_to_none=True)
            if gan_on:
                disc_optimizer.step()
                disc_optimizer.zero_grad(set_to_none=True)
            ema.update(denoiser)  # Alg. 1 line 13
            step += 1
            window.append({**logs_step, "grad_norm": float(grad_norm), "sec_per_step": time.time() - started})

            def due(every):  # every N steps, and always at the last step; 0 = only at the last step
                return step == config.max_steps or (every > 0 and step % every == 0)

            if due(config.log_every):  # means over the window and over ranks
                names = sorted(window[-1])
                sums = torch.tensor([sum(row.get(n, 0.0) for row in window) for n in names], dtype=torch.float64)
                means = all_reduce(sums) / (len(window) * ctx.world_size)
                row = {"step": step, **dict(zip(names, means.tolist()))}
                row.update(skipped=count_skipped(reader_states), images_per_sec=images_per_step / row["sec_per_step"])
                log(row, f"step {step} | loss {row['loss']:.5f} | grad norm {row['grad_norm']:.3g} | "
                         f"{row['sec_per_step']:.2f} s/step | {row['images_per_sec']:.1f} img/s | skipped {row['skipped']}")
                window = []
            # any rank's signal stops every rank at this same step (one tiny all-reduce per step)
            if all_reduce(torch.tensor([float(stop.requested)], dtype=torch.float64)).item() > 0:
                save(step)
                log({"event": "stopped", "step": step, "path": ckpt_path})
                raise KeyboardInterrupt(f"stopped at step {step} on a signal; saved {ckpt_path}. "
                                        f"Continue with the same command plus --resume.")
            if ctx.master and due(config.sample_every):
                path = save_samples(config, step, ema.module, sample_cond, schedule, prediction_type, codec, ctx.device)
                log({"event": "samples", "step": step, "path": path})
            if due(config.ckpt_every):
                save(step)
            if config.eval_data and due(config.eval_every):
                run_eval(step)

    if ctx.master:
        ema.module.transformer.save_pretrained(os.path.join(config.out_dir, "transformer_ema"))
        log({"event": "done", "step": step, "transformer_ema": os.path.join(config.out_dir, "transformer_ema")})
    barrier()


def main(argv=None):
    config = parse_config(argv)
    ctx = setup_distributed(config)
    try:
        if config.precompute_to:
            precompute(config, ctx)
        else:
            train(config, ctx)
    except (MissingModelError, FileNotFoundError, ValueError) as error:
        sys.exit(f"error (rank {ctx.rank}): {error}")
    except KeyboardInterrupt as interrupt:
        StopRequest.exit(f"rank {ctx.rank}: {interrupt}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
