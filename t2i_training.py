"""t2i_training — full-scale text-to-image E2EDiff, the library behind train_t2i.py (its command line and usage).

Config and its Rules, the pretrained parts' loading (diffusers), the data streams (imagefolder, WebDataset,
precomputed latents), DDP set-up, the training Run around e2ediff.train_step, sampling and checkpoints;
main runs it. Tests and tests/ddp_probe.py import these; nothing imports the script.
"""
from __future__ import annotations

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
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from diffusers_parts import DiffusersDenoiser, LatentCodec
from critics import base_feature_discriminator, student_auc
from e2ediff import (
    EMA, PREDICTION_TYPES, EndToEndConfig, EndToEndLoss, GANLoss, PatchDiscriminator, check_prediction_type,
    make_schedule, option, sampling_timesteps, train_step, unrolled_sample, unwrap,
)
from perceptual import LPIPS
from train_utils import (
    INCEPTION_WEIGHTS, PREDICTION_RULE, OptionError, Rule, as_flags, StopRequest, UsageError, check_readable_file,
    check_rules, exit_with, flag, flat_config, inception_weights_path, load_checkpoint, missing_inception_message,
    parse_config, rng_state, save_checkpoint, select_device, set_rng_state, validate,
)

# ----------------------------------------------------------------------------------------------
# Config: every default says why; the fields (the method's EndToEndConfig flattened in) are the flags.


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
    prediction_type: str = option("", "empty = the scheduler config's (epsilon for PixArt-delta)",
                                  ("",) + PREDICTION_TYPES)
    zero_terminal_snr: bool = option(False, "off: PixArt-delta predicts epsilon, which zero terminal SNR rules out")
    max_text_length: int = option(120, "T5 tokens per caption: the PixArt pipelines' max_sequence_length", valid=">= 1")
    # the method: Alg. 1 lines 6-15 (sampler, coupling, losses, GAN, clip, EMA, memory)
    e2e: EndToEndConfig = field(default_factory=partial(EndToEndConfig, spacing="auto"))  # the base's own grid
    # optimisation
    batch_size: int = option(8, "images per GPU per micro-step: the paper's 8 (x 64 A100s = 512)", valid=">= 1")
    grad_accum: int = option(1, "micro-steps per optimiser step: keep 512 images per step on fewer GPUs", valid=">= 1")
    lr: float = option(1e-6, "AdamW learning rate (paper)", valid="> 0")
    weight_decay: float = option(1e-8, "AdamW weight decay (paper)", valid=">= 0")
    adam_beta1: float = option(0.9, "AdamW default (the paper names AdamW, not its betas)", valid="[0, 1)")
    adam_beta2: float = option(0.999, "AdamW default", valid="[0, 1)")
    max_steps: int = option(24000, "optimiser steps (paper)", valid=">= 1")
    mixed_precision: str = option("bf16", "bf16 autocast on GPU (weights and AdamW stay fp32); CPU runs fp32",
                                  ("bf16", "no"))
    checkpoint_blocks: bool = option(False, "also checkpoint every transformer and VAE-decoder block: less memory")
    # data
    data: str = option("", "imagefolder, WebDataset shards (folder, brace pattern, pipe:) or a --precompute-to folder")
    resolution: int = option(1024, "PixArt-delta 1024-MS works at 1024^2, where the paper evaluates", valid=">= 8")
    num_workers: int = option(4, "DataLoader workers per rank (image decoding and tokenising)", valid=">= 0")
    precompute_to: str = option("", "write VAE latents + text embeddings of --data to this folder, then exit")
    cache_dtype: str = option("float16", "dtype of pre-computed tensors: float16 halves T5-XXL's 120x4096 per caption",
                              ("float16", "bfloat16", "float32"))
    # run
    out_dir: str = option("runs/t2i", "log.jsonl, ckpt.pt, samples/ and transformer_ema/ go here", valid="non-empty")
    device: str = option("auto", "auto = cuda (one per local rank) > mps > cpu")
    seed: int = option(0, "base seed; rank r uses seed + r", valid=">= 0")
    resume: bool = option(False, "continue from <out-dir>/ckpt.pt")
    log_every: int = option(10, "steps between log rows", valid=">= 1")
    sample_every: int = option(500, "steps between sample grids (and at the end); 0 = only at the end", valid=">= 0")
    ckpt_every: int = option(1000, "steps between checkpoints (and at the end); 0 = only at the end", valid=">= 0")
    sample_prompts: str = option("", "file with one prompt per line; empty = a built-in list of four")
    dist_timeout: float = option(1800.0, "seconds a collective waits for a stuck rank before the run fails", valid="> 0")
    # evaluation
    eval_data: str = option("", "imagefolder of prompts + reference images (e.g. COCO-30k); empty = no eval")
    eval_every: int = option(0, "steps between evaluations; 0 = only at the end", valid=">= 0")
    eval_samples: int = option(0, "prompts to evaluate; 0 = all of --eval-data", valid=">= 0")
    clip_model: str = option("openai/clip-vit-large-patch14", "CLIP for the CLIP score (torchmetrics' default)")
    inception_weights: str = option("", f"torch-fidelity's Inception weights, the file {INCEPTION_WEIGHTS}; "
                                           f"empty = $TORCH_HOME/hub/checkpoints/{INCEPTION_WEIGHTS}")

    def __post_init__(self):
        validate(self)
        if not self.data:
            raise OptionError("data", self.data, "an imagefolder, WebDataset shards or a --precompute-to folder")
        if self.resolution % 8:
            raise OptionError("resolution", self.resolution, "a multiple of 8 (the VAE's downsampling factor)")
        if self.e2e.disc_conditional:
            raise OptionError("disc_conditional", True, "class labels: the projection discriminator reads labels, "
                              "and this script conditions on text")
        check_rules(self, RULES)


# Options that are bad together: each would fail later, inside a model or the sampler (see train_utils.Rule).
RULES = (
    Rule(("disc_layers", "resolution", "gan_weight"), "--disc-layers small enough for the images: 3 * 2^layers <= "
         "--resolution (the PatchGAN reads decoded images)",
         lambda c: c.e2e.gan_weight == 0 or c.e2e.disc_kind != "patch"
         or PatchDiscriminator.min_side(c.e2e.disc_layers) <= c.resolution,
         {"disc_layers": 5, "resolution": 64, "gan_weight": 0.1}),
    Rule(("critic_warmup_steps", "max_steps"), "--critic-warmup-steps below --max-steps (the generator trains after it)",
         lambda c: c.e2e.critic_warmup_steps < c.max_steps, {"critic_warmup_steps": 5, "max_steps": 5, "gan_weight": 0.1}),
    PREDICTION_RULE,
)


SAMPLE_PROMPTS = (
    "A photo of a red fox standing in a snowy forest at dawn",
    "An astronaut riding a horse on the moon, digital art",
    "A bowl of ramen on a wooden table, close-up, soft light",
    "A watercolor painting of a lighthouse on a cliff at sunset",
)

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


def all_gather_object(obj) -> list:
    """[every rank's obj]; [obj] in a single process."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# Pretrained parts, loaded with diffusers / transformers from a hub id or a local folder.


class MissingModelError(FileNotFoundError):
    pass


def load_part(config: Config, name: str, loader, **kwargs):
    """One pretrained part: loader(<pretrained>, subfolder=name), or loader(config.<name>) when that
    override is given. A failure raises MissingModelError saying what to download, and where."""
    override = getattr(config, name)
    path, subfolder = (override, None) if override else (config.pretrained, name)
    try:
        return loader(path, subfolder=subfolder, **kwargs) if subfolder else loader(path, **kwargs)
    except OSError as error:
        part, where = name.replace("_", " "), f"{path}/{subfolder}" if subfolder else path
        given = flag(name) if override else "--pretrained"
        if os.path.isdir(path):
            hint = (f"The folder {path} exists but has no loadable {part} in {where}/. --pretrained expects a "
                    f"diffusers pipeline folder (transformer/ vae/ text_encoder/ tokenizer/ scheduler/), as "
                    f"PixArt-alpha/PixArt-LCM-XL-2-1024-MS is laid out; {flag(name)} takes a folder "
                    f"with the {part} at its root.")
        else:
            local = os.path.join("models", path.rstrip("/").split("/")[-1])
            hint = (f"'{path}' is not a local folder, and the hub could not provide it (offline, HF_HUB_OFFLINE=1, "
                    f"a typo, or a gated repo). Download it where the hub is reachable:\n"
                    f"    hf download {path} --local-dir {local}\n"
                    f"then pass {given} {local}")
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


def base_prediction_type(config: Config, scheduler_config: dict) -> str:
    """--prediction-type, or the base's own (its scheduler config's; diffusers' default epsilon)."""
    return config.prediction_type or scheduler_config.get("prediction_type", "epsilon")


def base_sampler(config: Config, scheduler_config: dict) -> tuple[EndToEndConfig, str, object]:
    """(the method's options on the base's grid, the prediction type, the noise schedule) the run samples with,
    from the base's scheduler_config.json; ValueError for a combination the sampler rejects (checked here,
    where preflight and the run both build it)."""
    method = base_grid(config.e2e, scheduler_config)  # the LCM's grid: a RuleError if T does not fit in it
    prediction_type = base_prediction_type(config, scheduler_config)
    schedule = schedule_from_config(scheduler_config, config.zero_terminal_snr)
    check_prediction_type(prediction_type, schedule)
    sampling_timesteps(schedule.num_train_timesteps, method.num_steps, method.spacing, method.original_steps)
    return method, prediction_type, schedule


def base_grid(method: EndToEndConfig, scheduler_config: dict) -> EndToEndConfig:
    """--spacing auto -> the timesteps the base was trained for: an LCM's distillation grid when its
    scheduler is an LCMScheduler (its original_inference_steps; PixArt-delta: 50, so T = 4 visits
    999 759 499 259), else trailing. Any other --spacing is kept as given."""
    if method.spacing != "auto":
        return method
    if scheduler_config.get("_class_name") == "LCMScheduler":
        method = dataclasses.replace(method, spacing="lcm",
                                     original_steps=scheduler_config.get("original_inference_steps", 50))
    else:
        method = dataclasses.replace(method, spacing="trailing")
    validate(method)  # T may not fit in the LCM's grid: a RuleError
    return method


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
    num_workers readers, no two readers sharing a unit; each reader reshuffles its own share every
    epoch. A bad sample is skipped and counted once, by the one reader that owns it. Each item carries
    its reader's position after it, so a checkpoint can restart every reader where it stopped.
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
            folder, row = unit
            key = str(row.get("file_name"))
            yield self._sample(key, row.get("text"), lambda: open(os.path.join(folder, key), "rb"))
        elif self.kind == "webdataset":
            yield from self._read_shard(unit)
        else:
            yield self._read_precomputed(unit)

    def _sample(self, key, caption, open_image):
        """(key, {"pixels", "caption", "key"}, None), or (key, None, reason) for a bad sample."""
        if caption is None:
            return key, None, "missing_caption"
        caption = (caption.decode("utf-8", errors="replace") if isinstance(caption, bytes) else str(caption)).strip()
        if not caption:
            return key, None, "empty_caption"
        try:
            with open_image() as file, Image.open(file) as image:
                pixels = self.transform(image.convert("RGB"))
        except Exception:  # missing, unreadable, truncated, a decompression bomb: one bad sample
            return key, None, "corrupt_image"
        return key, {"pixels": pixels, "caption": caption, "key": key}, None

    def _read_shard(self, url):
        import webdataset as wds
        errors = []
        samples = wds.tarfile_to_samples(handler=lambda error: errors.append(error) or True)([{"url": url}])
        shard = (re.findall(r"([^/\s]+)\.tar", url) or [hashlib.sha1(url.encode()).hexdigest()[:12]])[-1]
        for sample in samples:
            image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), b"")
            yield self._sample(f"{shard}-{sample['__key__']}", sample.get("txt"), lambda: io.BytesIO(image))
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
    """A CLIPModel whose get_*_features return tensors: transformers 5 returns a ModelOutput there,
    which torchmetrics 1.9's CLIPScore cannot read."""

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
        messages.append("FID skipped: " + missing_inception_message(weights))
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
def evaluate(run: Run) -> dict:
    """Generate one image per --eval-data prompt with the EMA model (ranks share the prompts) and score
    them. Returns {"clip_score": ., "fid": .} for the available metrics, and "messages" for the others."""
    config, ctx = run.config, run.ctx
    metrics, messages = build_metrics(config, ctx.device)
    if not metrics:
        return {"messages": messages}
    stream = CaptionStream(config.eval_data, config.resolution, ctx.rank, ctx.world_size, config.seed, epochs=1)
    budget = -(-(config.eval_samples or len(stream.units)) // ctx.world_size)  # this rank's share
    generator = torch.Generator(ctx.device).manual_seed(config.seed + 1000 * ctx.rank)
    seen = 0
    for batch in make_loader(stream, config, run.tokenizer, ctx.device):
        take = min(len(batch["keys"]), max(0, budget - seen))
        if take == 0:
            break
        seen += take
        real = batch["pixels"][:take].to(ctx.device)
        fake = generate(run, encode_text(run.text_encoder, batch["input_ids"][:take], batch["attention_mask"][:take]),
                        generator)
        if "fid" in metrics:
            metrics["fid"].update(to_uint8(real), real=True)
            metrics["fid"].update(to_uint8(fake), real=False)
        if "clip_score" in metrics:
            metrics["clip_score"].update(to_uint8(fake), batch["captions"][:take])
    scores = {name: float(metric.compute()) for name, metric in metrics.items()}  # compute() gathers all ranks
    return {**scores, "messages": messages}


@torch.no_grad()
def sample_latents(run: Run, cond, generator: torch.Generator) -> torch.Tensor:
    """The EMA model's own T-step sample, latents (B, C, h, w) (Alg. 1 lines 6-12 without gradients): z_T, then
    the sampler's fresh noise, drawn from `generator` in the order PixArtAlphaPipeline(generator=...) draws them."""
    denoiser, device = run.ema.module, cond[0].device
    size = run.config.resolution // run.codec.factor
    z_T = torch.randn(len(cond[0]), denoiser.transformer.config.in_channels, size, size, generator=generator,
                      device=generator.device).to(device)
    with autocast(run.config, device):
        return unrolled_sample(denoiser, z_T, run.schedule, run.config.e2e.num_steps, cond=cond, generator=generator,
                               **run.config.e2e.sampler_options(run.prediction_type))


@torch.no_grad()
def generate(run: Run, cond, generator: torch.Generator) -> torch.Tensor:
    """Images in [-1, 1] from the EMA model's own T-step sampler, decoded."""
    with autocast(run.config, cond[0].device):
        return run.codec.decode(sample_latents(run, cond, generator)).float().clamp(-1, 1)


def save_samples(run: Run) -> str:
    """A grid of the EMA model's samples for the fixed prompts and fixed noise; returns its path."""
    import torchvision
    images = generate(run, run.sample_cond, torch.Generator(run.ctx.device).manual_seed(run.config.seed))
    path = os.path.join(run.config.out_dir, "samples", f"step_{run.step:07d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torchvision.utils.save_image((images + 1) / 2, path, nrow=len(images))
    return path


# ----------------------------------------------------------------------------------------------
# Training: the parts (Alg. 1 line 1), the data and its encoding (lines 3-5), e2ediff.train_step (6-15).


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
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(text or json.dumps(row), flush=True)


class Run:
    """One training run: the frozen parts (schedule, text encoder, VAE, the base for the coupling), the
    trained denoiser inside its EndToEndLoss (DDP-wrapped when distributed) with its AdamW, EMA and
    GANLoss, and where the run is: `step`, and `readers`, each DataLoader worker's stream position."""

    def __init__(self, config: Config, ctx: Dist, log: Log):  # Alg. 1 line 1: start from the pretrained model
        self.config, self.ctx, self.log, self.step, self.readers = config, ctx, log, 0, {}
        self.ckpt_path = os.path.join(config.out_dir, "ckpt.pt")
        method, self.prediction_type, schedule = base_sampler(config, load_scheduler_config(config))
        config = self.config = dataclasses.replace(config, e2e=method)
        self.schedule = schedule.to(ctx.device)
        self.text_encoder, self.tokenizer = load_text_parts(config, ctx.device, frozen_dtype(config, ctx.device))
        self.codec = LatentCodec(load_vae(config, ctx.device))
        transformer = load_transformer(config).to(ctx.device, torch.float32).train()  # fp32: 1e-6 steps vanish in bf16
        if config.checkpoint_blocks:
            transformer.enable_gradient_checkpointing()
            self.codec.vae.enable_gradient_checkpointing()
        if (latent_size := config.resolution // self.codec.factor) != transformer.config.sample_size:
            log({"event": "note", "message": f"training at {config.resolution}px = {latent_size}^2 latents; the "
                 f"transformer was trained at sample_size {transformer.config.sample_size}"})
        self.denoiser = DiffusersDenoiser(transformer, self.codec.factor)
        self.base = None  # the frozen pretrained denoiser that the couplings run and --disc-kind basefeat reads
        if config.e2e.coupling != "independent" or config.e2e.gan_weight > 0 and config.e2e.disc_kind == "basefeat":
            self.base = copy.deepcopy(self.denoiser).to(frozen_dtype(config, ctx.device)).eval().requires_grad_(False)
        prompts = SAMPLE_PROMPTS
        if config.sample_prompts:
            with open(config.sample_prompts) as f:
                prompts = tuple(line.strip() for line in f if line.strip())
        self.sample_cond = encode_text(self.text_encoder, *tokenize(self.tokenizer, prompts, config.max_text_length))
        if data_kind(config.data) == "precomputed" and not config.eval_data:
            self.text_encoder = None  # pre-computed embeddings: T5 is not needed in the training step
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
        self.loss_fn, self.gan = self.build_loss()
        self.optimizer = torch.optim.AdamW(self.denoiser.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                           betas=(config.adam_beta1, config.adam_beta2))
        self.ema = EMA(self.denoiser, config.e2e.ema_decay)
        self.critic_auc = {}  # the critic's held-out AUC after its warm-up ("warmup") and at the end ("final")

    def build_loss(self) -> tuple[nn.Module, GANLoss | None]:
        """EndToEndLoss (Alg. 1 lines 7-13, Eq. 7-8), LPIPS on VAE-decoded images and, with --gan-weight > 0,
        a discriminator (a PatchGAN; --disc-kind basefeat: heads on the frozen base); DDP wraps the loss (so the
        denoiser) and the discriminator when distributed."""
        e2e, device = self.config.e2e, self.ctx.device

        def wrap(module):
            return DDP(module, device_ids=[device.index] if device.type == "cuda" else None) if self.ctx.enabled \
                else module
        lpips = LPIPS(e2e.lpips_net, random_backbone=e2e.lpips_random_backbone).to(device) if e2e.lpips_weight else None
        gan = None
        if e2e.gan_weight > 0 and e2e.disc_kind == "basefeat":  # heads on the frozen base's blocks, on latents
            transformer = self.denoiser.transformer
            latent_size = self.config.resolution // self.codec.factor
            example = torch.zeros(1, transformer.config.in_channels, latent_size, latent_size, device=device)
            with autocast(self.config, device):  # the base may be bf16
                discriminator = base_feature_discriminator(self.base, self.schedule, e2e, example,
                                                           tuple(c[:1] for c in self.sample_cond))
            gan = GANLoss(wrap(discriminator.to(device)), e2e)
        elif e2e.gan_weight > 0:
            gan = GANLoss(wrap(PatchDiscriminator(3, e2e.disc_channels, e2e.disc_layers).to(device)), e2e)
        loss_fn = EndToEndLoss(self.denoiser, self.schedule, e2e, self.prediction_type, lpips=lpips, gan=gan,
                               decode=self.codec.decode)
        return wrap(loss_fn), gan

    @property
    def discriminator(self) -> nn.Module | None:
        """The discriminator itself (not its DDP wrapper); None without the GAN."""
        return None if self.gan is None else unwrap(self.gan.discriminator)

    @property
    def global_batch(self) -> int:
        """Images per optimiser step, over every rank and micro-batch."""
        return self.config.batch_size * self.config.grad_accum * self.ctx.world_size

    def due(self, every: int) -> bool:
        """Every `every` steps, and always at the last step; 0 = only at the last step."""
        return self.step == self.config.max_steps or (every > 0 and self.step % every == 0)

    def resume(self) -> None:
        """Load <out-dir>/ckpt.pt (every rank reads it). With the same world size and worker count every
        reader and RNG continues exactly where it stopped; otherwise the data restarts the epoch the
        slowest reader was in, and the RNGs are reseeded."""
        config, ctx = self.config, self.ctx
        checkpoint = load_checkpoint(self.ckpt_path, hint=CHECKPOINT_HINT.format(path=self.ckpt_path))
        self.denoiser.transformer.load_state_dict(checkpoint["model"])
        self.ema.load_state_dict(checkpoint["ema"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.gan is not None and checkpoint["discriminator"] is not None:
            self.discriminator.load_state_dict(checkpoint["discriminator"])
            self.gan.optimizer.load_state_dict(checkpoint["disc_optimizer"])
        self.step, saved = checkpoint["step"], checkpoint["config"]
        self.critic_auc = checkpoint.get("critic_auc", {})
        exact = checkpoint["world_size"] == ctx.world_size and saved["num_workers"] == config.num_workers
        if exact:
            self.readers = checkpoint["data"][ctx.rank]
            set_rng_state(checkpoint["rng"][ctx.rank])
        else:
            epoch = min((s["epoch"] for states in checkpoint["data"] for s in states.values()), default=0)
            self.readers = {worker: {"epoch": epoch, "unit": 0, "item": 0, "bad": {}}
                            for worker in range(max(config.num_workers, 1))}
            torch.manual_seed(config.seed + ctx.rank + 7919 * self.step)
        now = flat_config(config)
        changed = {name: (old, now.get(name)) for name, old in saved.items() if now.get(name, old) != old}
        changed.pop("resume", None)
        self.log({"event": "resume", "step": self.step, "path": self.ckpt_path, "exact_data_position": exact,
                  "changed_config": changed})

    def save(self) -> None:
        """Checkpoint this step: rank 0 writes it (atomically), with every rank's data position and RNGs."""
        data_states, rng_states = all_gather_object(self.readers), all_gather_object(rng_state())
        if self.ctx.master:
            disc = self.discriminator
            save_checkpoint({
                "model": self.denoiser.transformer.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "discriminator": disc.state_dict() if disc else None,
                "disc_optimizer": self.gan.optimizer.state_dict() if disc else None, "step": self.step,
                "config": flat_config(self.config), "world_size": self.ctx.world_size, "data": data_states,
                "rng": rng_states, "critic_auc": self.critic_auc}, self.ckpt_path)
        self.log({"event": "checkpoint", "step": self.step, "path": self.ckpt_path})
        barrier()

    def micro_batch(self, batch: dict) -> dict:
        """Alg. 1 lines 3-5 for one DataLoader batch (see encode), its reader's position kept for a resume."""
        self.readers[batch["state"]["worker"]] = batch["state"]
        return self.encode(batch)

    def encode(self, batch: dict) -> dict:
        """z0 = E(x0), a sample of the VAE posterior, and e_c = T(c), or both from a --precompute-to folder.
        "images" are the real pixels that LPIPS and the discriminator compare with; without them (pre-computed
        data) EndToEndLoss decodes the target."""
        device, codec = self.ctx.device, self.codec
        with torch.no_grad(), autocast(self.config, device):
            if "pixels" in batch:
                images = batch["pixels"].to(device)
                target = codec.sample(*codec.distribution(images))
                cond = encode_text(self.text_encoder, batch["input_ids"], batch["attention_mask"])
            else:
                target = codec.sample(batch["latent_mean"].to(device), batch["latent_std"].to(device))
                cond = (batch["text_embeddings"].to(device, torch.float32), batch["attention_mask"].to(device))
                images = None
        return {"target": target, "cond": cond, "images": images}

    def log_window(self, window: list[dict], extra: dict) -> None:
        """One log row: every value's mean over the steps since the last row and over the ranks, and `extra`."""
        names = sorted(window[-1])
        sums = torch.tensor([sum(row.get(name, 0.0) for row in window) for name in names], dtype=torch.float64)
        means = all_reduce(sums) / (len(window) * self.ctx.world_size)
        row = {"step": self.step, **dict(zip(names, means.tolist()))}
        row.update(skipped=count_skipped(self.readers), images_per_sec=self.global_batch / row["sec_per_step"], **extra)
        generator = (f"loss {row['loss']:.5f} | grad norm {row['grad_norm']:.3g}" if "loss" in row
                     else f"critic warm-up | disc {row['disc']:.5f}")  # the generator frozen: no loss of its own
        self.log(row, f"step {self.step} | {generator} | "
                      f"{row['sec_per_step']:.2f} s/step | {row['images_per_sec']:.1f} img/s | "
                      f"skipped {row['skipped']}" + (f" | critic AUC {extra['critic_auc']:.3f}" if extra else ""))

    def after_step(self) -> None:
        """The sample grid, the checkpoint and the evaluation, each when due."""
        if self.ctx.master and self.due(self.config.sample_every):
            self.log({"event": "samples", "step": self.step, "path": save_samples(self)})
        if self.due(self.config.ckpt_every):
            self.save()
        if self.config.eval_data and self.due(self.config.eval_every):
            self.log({"event": "eval", "step": self.step, **evaluate(self)})


CRITIC_AUC_SEED_OFFSET = 2000  # the held-out batch's second pass over --data and the fakes' noise: seed + this


class CriticHealth:
    """The discriminator's AUC (critics.student_auc) on rank 0, real against fake: real = one batch drawn once
    from a second pass over --data (seeded apart; the run has no held-out split, so these images are also in
    training), as the discriminator reads them; fake = the current student's samples from fixed noise for that
    batch's captions. Every random draw is forked from a fixed seed: logging it changes no training step."""

    def __init__(self, run: Run):
        config, self.run, self.seed = run.config, run, run.config.seed + CRITIC_AUC_SEED_OFFSET
        stream = CaptionStream(config.data, config.resolution, seed=self.seed)
        device = run.ctx.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # training's RNGs untouched
            torch.manual_seed(self.seed)
            batch = run.encode(next(iter(make_loader(stream, dataclasses.replace(config, num_workers=0),
                                                     run.tokenizer, run.ctx.device))))
            self.z_T = torch.randn_like(batch["target"])
        self.cond = batch["cond"]
        if run.gan.on_latents:
            self.real = batch["target"]
        else:
            self.real = batch["images"] if batch["images"] is not None else unwrap(run.loss_fn).as_image(batch["target"])

    def __call__(self) -> float:
        with autocast(self.run.config, self.run.ctx.device):
            return student_auc(self.run.loss_fn, self.run.gan, self.real, self.z_T, self.cond, seed=self.seed)


def train(config: Config, ctx: Dist) -> None:
    torch.manual_seed(config.seed + ctx.rank)  # every rank its own noise; DDP broadcasts rank 0's weights
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    os.makedirs(config.out_dir, exist_ok=True)
    log = Log(os.path.join(config.out_dir, "log.jsonl"), ctx.master)
    log({"event": "config", "world_size": ctx.world_size, "device": str(ctx.device), **flat_config(config)},
        f"train_t2i: {ctx.world_size} process(es) on {ctx.device.type}; config in {log.path}")
    kind = data_kind(config.data)
    run = Run(config, ctx, log)
    if config.resume:
        run.resume()
    stream = CaptionStream(config.data, config.resolution, ctx.rank, ctx.world_size, config.seed, start=run.readers)
    batches = iter(make_loader(stream, config, run.tokenizer, ctx.device))
    log({"event": "start", "step": run.step, "data": kind, "units": len(stream.units),
         "prediction_type": run.prediction_type, "parameters": sum(p.numel() for p in run.denoiser.parameters()),
         "global_batch": run.global_batch, "spacing": run.config.e2e.spacing,
         "timesteps": sampling_timesteps(run.schedule.num_train_timesteps, run.config.e2e.num_steps,
                                         run.config.e2e.spacing, run.config.e2e.original_steps).tolist()})
    window, health = [], CriticHealth(run) if run.gan is not None and ctx.master else None
    if health is not None and config.e2e.critic_warmup_steps == 0 and "warmup" not in run.critic_auc:
        run.critic_auc["warmup"] = health()  # no warm-up: the critic as it starts
    with StopRequest() as stop:  # Ctrl-C / SIGTERM: finish the step, checkpoint, stop
        while run.step < config.max_steps:
            started = time.time()
            micro_batches = (run.micro_batch(next(batches)) for _ in range(config.grad_accum))  # encoded one by one
            logs = train_step(run.loss_fn, run.optimizer, run.ema, micro_batches, run.step, base_model=run.base,
                              accumulation=config.grad_accum, gan=run.gan, no_sync=DDP.no_sync if ctx.enabled else None,
                              autocast=partial(autocast, config, ctx.device))  # Alg. 1 lines 6-15
            run.step += 1
            window.append({**logs, "sec_per_step": time.time() - started})
            auc = {}
            if health is not None and (run.due(config.log_every) or run.step == config.e2e.critic_warmup_steps):
                auc["critic_auc"] = health()
                if run.step == config.e2e.critic_warmup_steps:
                    run.critic_auc["warmup"] = auc["critic_auc"]
                if run.step == config.max_steps:
                    run.critic_auc["final"] = auc["critic_auc"]
            if run.due(config.log_every):
                run.log_window(window, auc)
                window = []
            # any rank's signal stops every rank at this same step (one tiny all-reduce per step)
            if all_reduce(torch.tensor([float(stop.requested)], dtype=torch.float64)).item() > 0:
                run.save()
                log({"event": "stopped", "step": run.step, "path": run.ckpt_path})
                raise KeyboardInterrupt(f"stopped at step {run.step} on a signal; saved {run.ckpt_path}. "
                                        f"Continue with the same command plus --resume.")
            run.after_step()
    if ctx.master:
        run.ema.module.transformer.save_pretrained(os.path.join(config.out_dir, "transformer_ema"))
        auc = {"critic_auc_warmup": run.critic_auc.get("warmup"), "critic_auc": run.critic_auc.get("final")}
        log({"event": "done", "step": run.step, "transformer_ema": os.path.join(config.out_dir, "transformer_ema"),
             **(auc if run.gan is not None else {})})
    barrier()


# ----------------------------------------------------------------------------------------------
# Before any work: the extras, every path, the device and the checkpoint checked; nothing written yet.

T2I_EXTRAS = ("diffusers", "transformers", "sentencepiece", "safetensors", "webdataset", "accelerate")
MODEL_PARTS = {  # flag -> the file that shows the part is there (in <pretrained>/<part>/ or at an override's root)
    "transformer": "config.json", "vae": "config.json", "text_encoder": "config.json",
    "tokenizer": "tokenizer_config.json", "scheduler": "scheduler_config.json",
}
CHECKPOINT_HINT = "To start over, move it away (mv {path} {path}.bad) and run without --resume; or restore a copy."


def check_extras() -> None:
    """UsageError naming requirements-t2i.txt when a package this script needs is not installed."""
    import importlib.util
    missing = [name for name in T2I_EXTRAS if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"train_t2i.py needs the text-to-image extras (missing: {', '.join(missing)}): "
                         f"pip install -r requirements-t2i.txt")


def looks_local(name: str) -> bool:
    """Whether a model argument is a local path rather than a hub id (org/name or name)."""
    return (os.path.exists(name) or os.path.isabs(name) or name.startswith((".", "~")) or name.endswith("/")
            or name.count("/") > 1 or os.sep != "/" and os.sep in name)


def check_model(name: str, value: str, file: str) -> None:
    """A local path must exist; a hub id must be in the local cache when the hub is offline."""
    if looks_local(value):
        if not os.path.isdir(value):
            raise UsageError(f"{flag(name)}: got {value!r}, which is not a folder (a local path; hub ids read org/name)")
        return
    from huggingface_hub import constants, try_to_load_from_cache
    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(value, file), str):
        local = os.path.join("models", value.rstrip("/").split("/")[-1])
        raise UsageError(f"{flag(name)}: {value!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; where "
                         f"the hub is reachable run `hf download {value} --local-dir {local}`, then pass "
                         f"{flag(name)} {local}")


def check_sampler(config: Config) -> None:
    """Build now what the run will sample with (base_sampler): a combination of flags and base that the sampler
    would reject after the models have loaded (epsilon under zero terminal SNR, more steps than an LCM grid
    holds) is a UsageError naming the flags. A scheduler config that cannot be read is left to the load,
    which says what to download."""
    try:
        scheduler_config = load_scheduler_config(config)
    except MissingModelError:
        return
    try:
        base_sampler(config, scheduler_config)
    except ValueError as error:
        flags = [f"--prediction-type {base_prediction_type(config, scheduler_config)}",
                 as_flags("zero_terminal_snr", config.zero_terminal_snr), f"--num-steps {config.e2e.num_steps}",
                 f"--spacing {config.e2e.spacing}"]
        raise UsageError(f"{', '.join(flags)} with the base's scheduler_config.json: {error}") from None


def preflight(config: Config) -> dict | None:
    """Check what the run needs before it loads a model or writes a file: the extras, the device, the data,
    the models, the prompt and evaluation files, and the checkpoint. UsageError otherwise. Returns the
    checkpoint's metadata (step, ...) when --resume will continue one, else None."""
    check_extras()
    select_device(config.device)
    try:
        kind = data_kind(config.data)
        if kind == "webdataset":
            list_units(config.data, kind)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    if kind == "precomputed" and config.precompute_to:
        raise UsageError(f"--precompute-to: got {config.precompute_to!r}, but --data {config.data} is already "
                         f"pre-computed; train on it without --precompute-to")
    if kind == "precomputed":
        with open(os.path.join(config.data, "meta.json")) as f:
            resolution = json.load(f)["resolution"]
        if resolution != config.resolution:
            raise UsageError(f"--resolution: got {config.resolution}, but --data {config.data} was pre-computed at "
                             f"{resolution}")
    for part, file in MODEL_PARTS.items():
        if getattr(config, part):
            check_model(part, getattr(config, part), file)
        else:
            check_model("pretrained", config.pretrained, f"{part}/{file}")
    check_sampler(config)
    if config.eval_data:
        if not os.path.isfile(os.path.join(config.eval_data, "metadata.jsonl")):
            raise UsageError(f"--eval-data: got {config.eval_data!r}, need an imagefolder with metadata.jsonl")
        if looks_local(config.clip_model) and not os.path.isdir(config.clip_model):  # a hub id may be missing:
            raise UsageError(f"--clip-model: got {config.clip_model!r}, which is not a folder")  # no CLIP score then
    if config.sample_prompts:
        check_readable_file(config.sample_prompts, "sample_prompts", "a text file with one prompt per line")
    if config.inception_weights:
        check_readable_file(config.inception_weights, "inception_weights", f"the file {INCEPTION_WEIGHTS}")
    if config.precompute_to:
        return None
    path = os.path.join(config.out_dir, "ckpt.pt")
    if not config.resume:
        if os.path.exists(path):
            raise UsageError(f"{path} exists: pass --resume to continue it, or choose another --out-dir")
        return None
    if not os.path.exists(path):
        raise UsageError(f"--resume: no checkpoint at {path}; run without --resume to start a new run")
    checkpoint = load_checkpoint(path, hint=CHECKPOINT_HINT.format(path=path), mmap=True)  # maps, reads nothing big
    return {"step": checkpoint["step"]}


def main(argv=None, description: str = ""):
    """The command line (train_t2i.py): precompute latents, or train."""
    try:
        config = parse_config(Config, argv, description)
        resumed = preflight(config)
    except UsageError as error:
        exit_with(error)
    if resumed and resumed["step"] >= config.max_steps and os.path.isdir(os.path.join(config.out_dir, "transformer_ema")):
        print(f"{config.out_dir} is finished (step {resumed['step']} of --max-steps {config.max_steps}); nothing to do")
        return
    ctx = setup_distributed(config)
    try:
        if config.precompute_to:
            precompute(config, ctx)
        else:
            train(config, ctx)
    except UsageError as error:
        exit_with(error)
    except (MissingModelError, FileNotFoundError, ValueError) as error:
        sys.exit(f"error (rank {ctx.rank}): {error}")
    except KeyboardInterrupt as interrupt:
        StopRequest.exit(f"rank {ctx.rank}: {interrupt}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

