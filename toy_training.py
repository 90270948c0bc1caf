"""toy_training — the toy's stages, the library behind train_toy.py (its command line and usage).

Config (every flag, with why), the dataset presets and Rules, preflight; the stages: pretrain (the diffusion
base), distill (an LCM from it), finetune (E2EDiff through the few-step sampler: e2ediff.train_step), generate
and evaluate (CFD with the committed metric classifier, pixel energy, precision, recall, the verdicts); main
runs them in order. The notebook, benchmarks/ and the tests import these; nothing imports the script.
"""

import copy
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from critics import base_feature_discriminator, student_auc
from e2ediff import (
    EMA, PREDICTION_TYPES, SCHEDULES, UPDATES, EndToEndConfig, EndToEndLoss, GANLoss, PatchDiscriminator,
    consistency_scalings, couple, ddim_invert, diffusion_loss, guided_output, make_schedule, option,
    sampling_timesteps, split_prediction, train_step, unrolled_sample,
)
from perceptual import LPIPS, FeatureDistance
from toy_nets import (
    CIFAR10_FOLDER, Classifier, ClassifierFrechetDistance, PerceptualNet, UNet, energy_distance, high_frequency_ratio,
    inception_fid, precision_recall, verdict,
)
from toy_data import (
    CHANNELS, IMAGE_SIZE, classifier_accuracy, fit_classifier, load_cifar10, load_digits_data,
    load_metric_classifier, validation_split,
)
from train_utils import (
    INCEPTION_WEIGHTS, PREDICTION_RULE, Rule, StopRequest, UsageError, atomic_write, check_readable_file, descend,
    exit_with, flag, load_checkpoint, parse_config as parse_flags, rng_state, save_checkpoint, select_device,
    set_rng_state, validate,
)

# ----------------------------------------------------------------------------------------------
# Config: every default says why; the fields (and the method's, in e2e) become the command-line flags.

GAN_WEIGHT = 0.5  # the toy's --gan-weight with L2 (seed-0 pilots: 0.3 and 1.0 did worse; quality.py at 83b4aaa: 2.0 overshoots)

# The toy's departures from the paper's recipe (EndToEndConfig's defaults), each with its reason.
TOY_METHOD = dict(
    coupling="inversion",  # a well-posed regression: Alg. 1's independent pairs under L2 collapse (README)
    update="ddim",  # the base is a plain diffusion model, not an LCM: its own sampler is DDIM
    lpips_weight=0.0,  # LPIPS needs ImageNet backbone weights, which an offline machine lacks
    ema_decay=0.99,  # 400 steps at lr 1e-4: averages the last ~100 (the paper's 0.95, at lr 1e-6, ~20)
    # the adversarial term, a recipe measured on digits (benchmarks/quality.py's GAN ablation): real samples
    # are data with every coupling; the discriminator judges p(x | label) through a projection
    gan_adaptive=False,  # a fixed weight (--gan-weight 0.5 measured best): the adaptive one settles at ~0.001 here
    gan_kind="non_saturating",
    r1_weight=0.0,  # R1 0.1 keeps this discriminator at chance on 8x8 digits (its loss stays at 2 ln 2)
    disc_lr=1e-3,  # 10x the generator's lr: the discriminator must keep up in 200 steps (1e-4 pulls less: 83b4aaa)
    disc_conditional=True,
    disc_channels=64, disc_layers=1,  # a PatchGAN whose patches fit 8x8 digits
    grad_checkpoint=False,  # a small UNet at 8x8: memory is no concern, plain backprop is faster
)


@dataclass
class Config:
    # what to run
    stage: str = option("all", "all = pretrain, (distill,) fine-tune, evaluate (the quickstart); or one stage",
                        ("all", "pretrain", "distill", "finetune", "eval"))
    base: str = option("diffusion", "what end-to-end fine-tuning starts from: the diffusion base, or an LCM "
                       "distilled from it (the paper's setting: PixArt-delta is an LCM)", ("diffusion", "lcm"))
    dataset: str = option("digits", "digits is bundled with scikit-learn: runs offline", ("digits", "cifar10"))
    data_dir: str = option("data", "where CIFAR-10 lives (<data-dir>/cifar-10-batches-py)")
    eval_split: str = option("test", "what the metrics compare against: the test split, or a validation split carved "
                             "from the train split (which then trains on the rest): for choosing a recipe without "
                             "looking at the test split", ("test", "validation"))
    download: bool = option(True, "fetch CIFAR-10 when it is missing and the network allows")
    out_dir: str = option("runs/toy-digits", "checkpoints, log, grids and results go here", valid="non-empty")
    device: str = option("auto", "auto picks cuda > mps > cpu; bf16 autocast on cuda")
    seed: int = option(0, "seeds model init, data order, noise and the evaluation noise", valid=">= 0")
    resume: bool = option(False, "continue each stage from its checkpoint; finished stages are skipped")
    # model
    model_channels: int = option(32, "UNet width at full resolution; 32 keeps digits fast on CPU", valid=">= 1")
    channel_mult: tuple[int, ...] = option((1, 2), "width multiplier per resolution level (8x8 -> 4x4)",
                                            valid=">= 1")
    num_res_blocks: int = option(1, "residual blocks per level; one suffices for 8x8 digits", valid=">= 1")
    class_conditional: bool = option(True, "class labels as condition: the toy analogue of text prompts")
    cond_drop_prob: float = option(0.1, "label dropout in pretraining, so classifier-free guidance works",
                                   valid="[0, 1]")
    guidance_scale: float = option(1.0, "classifier-free guidance when sampling; 1 = plain conditional",
                                   valid=">= 0")
    # diffusion
    schedule: str = option("linear", "beta schedule of the base model (DDPM's linear)", SCHEDULES)
    zero_terminal_snr: bool = option(True, "rescale to alpha_T = 0 so x_T carries no image (Lin et al. 2024)")
    num_train_timesteps: int = option(1000, "training timesteps, the usual 1000", valid=">= 2")
    prediction_type: str = option("v_prediction", "v-prediction: required with zero terminal SNR", PREDICTION_TYPES)
    # stage 1: pretraining (--grad-clip applies here too)
    pretrain_steps: int = option(3000, "enough for a base whose 50-step DDIM draws clean digits", valid=">= 1")
    pretrain_batch_size: int = option(128, "large enough for stable diffusion-loss gradients", valid=">= 1")
    pretrain_lr: float = option(1e-3, "AdamW; high is fine for a small net after warm-up", valid="> 0")
    warmup_steps: int = option(100, "linear learning-rate warm-up, then constant (resume-safe)", valid=">= 0")
    pretrain_ema_decay: float = option(0.999, "EMA of the base weights, with warm-up (decay min(this, (1+n)/(10+n))): "
                                       "the random init is gone within ~10 steps; averages ~n/10 steps", valid="[0, 1]")
    # stage 1b, with --base lcm: latent consistency distillation of the base into a few-step LCM
    distill_steps: int = option(500, "LCD iterations: 500 at batch 64 give 4-NFE digits within 1.1x of the base's "
                                "50-step DDIM CFD (measured, seed 0)", valid=">= 1")
    distill_batch_size: int = option(64, "each LCD step runs the teacher, the target and the student", valid=">= 1")
    distill_lr: float = option(2e-4, "AdamW; the student starts from the teacher's weights", valid="> 0")
    distill_target_decay: float = option(0.95, "EMA of the target network theta^- (LCM paper: mu = 0.95); the LCM "
                                         "we keep", valid="[0, 1]")
    lcm_update: str = option("lcm", "the LCM's sampler, on its grid: its own multistep update (fresh noise between "
                             "steps, as PixArt-delta's), or ddim (deterministic)", UPDATES)
    # stage 2: end-to-end fine-tuning (the method's options: e2e)
    nfe: tuple[int, ...] = option((1, 2, 4), "fine-tune one model per sampler length T (1-4 NFE)", valid="[1, 4]")
    finetune_steps: int = option(400, "a short fine-tune already beats base DDIM at the same NFE; 400 keeps "
                                "README's command 1 within 10 minutes on 2 cores", valid=">= 1")
    finetune_batch_size: int = option(64, "the cost of a step grows with T: batch 64 keeps T = 4 cheap", valid=">= 1")
    finetune_lr: float = option(1e-4, "small: we start from a good model and regress to data", valid="> 0")
    teacher_pool: int = option(4, "with --coupling teacher: teacher pairs made once per training image, before "
                               "fine-tuning (the frozen base is fixed, so a cache is exact); 0 = a fresh teacher "
                               "sample for every batch, as couple() does (--teacher-steps x slower)", valid=">= 0")
    perceptual_net: str = option("trained", "the lpips term's network: trained = an LPIPS-style distance in a small "
                                 "net this script trains on the train split (offline); lpips = the lpips package's "
                                 "ImageNet backbone (its weights must be on disk)", ("trained", "lpips"))
    e2e: EndToEndConfig = field(default_factory=partial(EndToEndConfig, **TOY_METHOD))
    # stage 3: evaluation
    base_nfe: tuple[int, ...] = option((1, 2, 4, 50), "base-model DDIM step counts to compare against",
                                       valid=">= 1")
    eval_samples: int = option(1000, "samples per table row", valid=">= 1")
    eval_batch_size: int = option(500, "batch size for sampling, inversion and metrics", valid=">= 1")
    metric_classifier: str = option("auto", "the CFD's classifier: auto = on digits the fixed instrument "
                                    "metrics/digits-classifier.pt (sha256-checked: the same CFD on every CPU), on "
                                    "CIFAR-10 (which has none) retrain; retrain = trained per run with --seed, for a "
                                    "user's own data; or a file toy_data.py --rebuild-metric-classifier --out wrote",
                                    valid="non-empty")
    classifier_epochs: int = option(30, "epochs of the perceptual backbone, and of the metric's classifier with "
                                    "--metric-classifier retrain (seconds on digits)", valid=">= 1")
    inception_weights: str = option("", f"torch-fidelity's Inception weights, the file {INCEPTION_WEIGHTS}; "
                                           f"empty = <torch hub dir>/checkpoints/{INCEPTION_WEIGHTS}")
    # logging and checkpoints
    log_every: int = option(50, "steps between rows of metrics.jsonl", valid=">= 1")
    save_every: int = option(500, "steps between checkpoints (also saved at the end and on Ctrl-C)", valid=">= 1")

    def __post_init__(self):
        validate(self, RULES)

    @property
    def out(self):
        return Path(self.out_dir)


def _uses_lcm_grid(c) -> bool:
    return c.base == "lcm" or c.e2e.spacing == "lcm"


# Options that are bad together: each would fail later, inside a model or the sampler (see train_utils.Rule).
RULES = (
    Rule(("disc_conditional", "class_conditional", "gan_weight"), "--no-disc-conditional without class labels "
         "(the projection discriminator reads them)",
         lambda c: not (c.e2e.gan_weight > 0 and c.e2e.disc_conditional and not c.class_conditional),
         {"class_conditional": False, "gan_weight": 0.5, "disc_conditional": True}),
    Rule(("backprop_steps", "nfe"), "--backprop-steps at most the smallest --nfe (the last K of T steps)",
         lambda c: c.e2e.backprop_steps <= min(c.nfe), {"backprop_steps": 2, "nfe": (1, 2)}),
    *(Rule((name, "num_train_timesteps"), f"{flag(name)} at most --num-train-timesteps (DDIM steps on its grid)",
           lambda c, steps=steps: steps(c) <= c.num_train_timesteps, {name: value, "num_train_timesteps": 1000})
      for name, steps, value in [("base_nfe", lambda c: max(c.base_nfe), (1, 5000)),
                                 ("inversion_steps", lambda c: c.e2e.inversion_steps, 2000),
                                 ("teacher_steps", lambda c: c.e2e.teacher_steps, 2000)]),
    PREDICTION_RULE,
    Rule(("guidance_scale", "class_conditional"), "--guidance-scale 1 without class labels (guidance needs them)",
         lambda c: c.guidance_scale == 1 or c.class_conditional, {"guidance_scale": 2.0, "class_conditional": False}),
    Rule(("spacing",), "trailing or lcm here (auto picks a diffusers base's own grid: train_t2i.py)",
         lambda c: c.e2e.spacing != "auto", {"spacing": "auto"}),
    Rule(("original_steps", "nfe", "num_train_timesteps", "base", "spacing"), "max(--nfe) <= --original-steps <= "
         "--num-train-timesteps for an LCM grid (--base lcm or --spacing lcm)",
         lambda c: not _uses_lcm_grid(c) or max(c.nfe) <= c.e2e.original_steps <= c.num_train_timesteps,
         {"original_steps": 2, "nfe": (1, 4), "base": "lcm"}),
    Rule(("disc_layers", "dataset", "gan_weight"), "--disc-layers small enough for the images: 3 * 2^layers <= "
         "the side (digits 8: 1 layer; cifar10 32: up to 3)",
         lambda c: c.e2e.gan_weight == 0 or c.e2e.disc_kind != "patch"
         or PatchDiscriminator.min_side(c.e2e.disc_layers) <= IMAGE_SIZE[c.dataset],
         {"disc_layers": 2, "dataset": "digits", "gan_weight": 0.5}),
    Rule(("critic_warmup_steps", "finetune_steps"), "--critic-warmup-steps below --finetune-steps (the generator "
         "trains after it)", lambda c: c.e2e.critic_warmup_steps < c.finetune_steps,
         {"critic_warmup_steps": 600, "finetune_steps": 600, "gan_weight": 0.5}),
    Rule(("channel_mult", "dataset"), "at most log2(side) + 1 levels in --channel-mult (each halves the side)",
         lambda c: 2 ** (len(c.channel_mult) - 1) <= IMAGE_SIZE[c.dataset],
         {"channel_mult": (1, 1, 1, 1, 1), "dataset": "digits"}),
)


# Dataset-specific defaults that replace the digits defaults unless a flag is given. The CIFAR-10
# values are a starting point for one GPU, not a tuned recipe.
PRESETS = {
    "digits": {},
    "cifar10": dict(
        out_dir="runs/toy-cifar10", model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
        pretrain_steps=200_000, pretrain_lr=2e-4, warmup_steps=1000, pretrain_ema_decay=0.9999,
        finetune_steps=5000, finetune_lr=2e-5, disc_layers=3, disc_channels=64, perceptual_net="lpips",
        eval_samples=10_000, eval_batch_size=1000, classifier_epochs=20,
        log_every=100, save_every=5000,
    ),
}

# The fields that fix the model's shape, meaning and training data: a checkpoint must agree on all of them.
MODEL_FIELDS = ("dataset", "eval_split", "model_channels", "channel_mult", "num_res_blocks", "class_conditional",
                "schedule", "zero_terminal_snr", "num_train_timesteps", "prediction_type")

# What each stage trains, beyond its length ("e2e" = every method field but the per-model T and the memory-only
# recomputation switches). A stage's checkpoint, continued or kept as finished under other values, would mix two
# recipes in one model and record the new one: open_checkpoint refuses it.
RECIPE_FIELDS = {
    "pretrain": ("seed", "cond_drop_prob", "pretrain_batch_size", "pretrain_lr", "warmup_steps", "pretrain_ema_decay",
                 "e2e.grad_clip"),
    "distill": ("seed", "guidance_scale", "distill_batch_size", "distill_lr", "distill_target_decay", "e2e.grad_clip",
                "e2e.original_steps"),
    "finetune": ("seed", "base", "lcm_update", "guidance_scale", "finetune_batch_size", "finetune_lr", "teacher_pool",
                 "perceptual_net", "e2e"),
}
RECIPE_EXEMPT = ("e2e.num_steps", "e2e.grad_checkpoint", "e2e.checkpoint_policy")


def parse_config(argv=None, description: str = ""):
    """Command line -> Config: flags override the dataset preset, which overrides the defaults. The
    sampler length comes from --nfe, so EndToEndConfig's num_steps gets no flag here. `description`:
    --help's text (train_toy.py's usage)."""
    return parse_flags(Config, argv, description, PRESETS, preset_flag="dataset", hidden=("num_steps",))


# ----------------------------------------------------------------------------------------------
# Data (toy_data.py): both datasets become the same tensors in [-1, 1], (N, C, H, W), with class labels.


def build_dataset(config):
    """The dataset named by config.dataset, as an ImageData; with --eval-split validation its "test"
    images are a validation split carved from the train split, and its train images the rest."""
    data = load_digits_data() if config.dataset == "digits" else load_cifar10(config.data_dir, config.download)
    return data if config.eval_split == "test" else validation_split(data)


class Batches:
    """Endless shuffled mini-batches of indices (each epoch a new permutation), resumable exactly."""

    def __init__(self, num_examples, batch_size, seed):
        if batch_size > num_examples:
            raise ValueError(f"batch size {batch_size} exceeds the {num_examples} training examples")
        self.num_examples, self.batch_size = num_examples, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = torch.empty(0, dtype=torch.int64), 0

    def next(self):
        if self.position + self.batch_size > len(self.order):  # drop the ragged end, reshuffle
            self.order, self.position = torch.randperm(self.num_examples, generator=self.generator), 0
        indices = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return indices

    def state_dict(self):
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], state["position"]


# ----------------------------------------------------------------------------------------------
# Model (the UNet is in toy_nets.py), schedule, conditions.


def build_model(config, data):
    return UNet(data.image_shape[0], config.model_channels, config.channel_mult, config.num_res_blocks,
                data.num_classes if config.class_conditional else None)


def build_schedule(config, device):
    return make_schedule(config.schedule, config.num_train_timesteps,
                         zero_terminal_snr=config.zero_terminal_snr).to(device)


def conditions(config, data, labels):
    """(cond, uncond) for the denoiser: class labels and the "no class" token, or (None, None)."""
    if not config.class_conditional:
        return None, None
    return labels, torch.full_like(labels, data.num_classes)


def training_batch(batches, config, data, device):
    """The next training images x0 and their (cond, uncond) (see conditions)."""
    indices = batches.next()
    x0, labels = data.train_images[indices].to(device), data.train_labels[indices].to(device)
    return (x0, *conditions(config, data, labels))


def autocast(device):
    """bf16 autocast on CUDA; plain fp32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------------------------
# Checkpoints, log, and the training loop shared by both stages.


def lcm_sampler(config) -> dict:
    """unrolled_sample options of an LCM: --lcm-update (its own multistep update by default) on its
    distillation grid, no extra guidance (the guided teacher's ODE is distilled into it)."""
    return dict(update=config.lcm_update, spacing="lcm", original_steps=config.e2e.original_steps, guidance_scale=1.0)


def finetune_name(config, num_steps) -> str:
    """finetune-nfe<T> from the diffusion base, finetune-lcm-nfe<T> from the LCM."""
    return f"finetune-nfe{num_steps}" if config.base == "diffusion" else f"finetune-lcm-nfe{num_steps}"


def check_compatible(saved_config, config, path):
    """UsageError naming every model-shape field where a checkpoint's config differs from ours."""
    def normal(value):
        return list(value) if isinstance(value, (list, tuple)) else value
    differing = [f"{flag(name)}: checkpoint {saved_config.get(name)!r} vs now {getattr(config, name)!r}"
                 for name in MODEL_FIELDS if normal(saved_config.get(name)) != normal(getattr(config, name))]
    if differing:
        raise UsageError(f"{path} was written with other model flags ({'; '.join(differing)}). "
                         f"Pass the same flags, or choose another --out-dir.")


def recipe_values(config_dict: dict, stage: str) -> dict:
    """{dotted field: value} of RECIPE_FIELDS[stage] in a config as asdict() writes it (tuples as lists)."""
    values = {}
    for name in RECIPE_FIELDS[stage]:
        value = config_dict
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, dict):
            values.update({f"{name}.{key}": item for key, item in value.items()})
        else:
            values[name] = value
    return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()
            if name not in RECIPE_EXEMPT}


def check_same_recipe(saved_config, config, stage, path):
    """UsageError naming every flag of `stage`'s recipe where the checkpoint differs from ours; a field the
    checkpoint lacks (written before the flag existed) cannot be checked and passes."""
    saved, now = recipe_values(saved_config, stage), recipe_values(asdict(config), stage)
    differing = [f"{flag(name.split('.')[-1])}: checkpoint {saved[name]!r} vs now {now[name]!r}"
                 for name in now if name in saved and saved[name] != now[name]]
    if differing:
        raise UsageError(f"{path} was trained with other {stage} flags ({'; '.join(differing)}). Pass the same "
                         f"flags to continue or reuse it, or choose another --out-dir.")


def read_checkpoint(path, config, stage):
    """A checkpoint of `stage` made with our model flags; UsageError, with how to recover, otherwise."""
    hint = (f"Move it away (mv {path} {path}.bad) and rerun with --resume: finished stages are kept and the "
            f"{stage} stage starts over; or choose another --out-dir.")
    checkpoint = load_checkpoint(path, hint=hint)
    if checkpoint.get("stage") != stage:
        raise UsageError(f"{path} is not a {stage} checkpoint (it holds {checkpoint.get('stage')!r}). {hint}")
    check_compatible(checkpoint["config"], config, path)
    return checkpoint


def open_checkpoint(path, config, stage, steps):
    """(the checkpoint to resume from or None, whether it already ran all `steps`); refuses to
    overwrite a run without --resume."""
    if not path.exists():
        return None, False
    if not config.resume:
        raise UsageError(f"{path} exists. Pass --resume to continue it (finished stages are skipped), or "
                         f"choose another --out-dir to start over.")
    checkpoint = read_checkpoint(path, config, stage)
    check_same_recipe(checkpoint["config"], config, stage, path)
    return checkpoint, checkpoint["step"] >= steps


def finished_checkpoint(path, config, stage, steps, how):
    """The checkpoint of a stage that a later stage builds on: it must exist (`how`: what makes it), be
    readable, match our model flags and have run all `steps`."""
    if not path.exists():
        raise UsageError(f"no {stage} checkpoint at {path}: {how}, or point --out-dir at the run that has it.")
    checkpoint = read_checkpoint(path, config, stage)
    if checkpoint["step"] < steps:
        steps_flag = flag(f"{stage}_steps")
        raise UsageError(f"{path} stopped at step {checkpoint['step']} of {steps}: finish it with --stage {stage} "
                         f"--resume, or pass {steps_flag} {checkpoint['step']} to use it as it is.")
    return checkpoint


class Log:
    """metrics.jsonl: one JSON object per line, appended and flushed as we go."""

    def __init__(self, path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row):
        with open(self.path, "a") as file:
            file.write(json.dumps(row) + "\n")

    def forget(self, stage):
        """Drop every row of `stage`: an evaluation run again replaces the rows of the last one."""
        self.forget_after(stage, -math.inf)

    def forget_after(self, stage, step):
        """A run of `stage` (re)starts after `step`: drop that stage's rows past it, which a run that
        stopped after its last checkpoint had logged and the restarted run is about to log again."""
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        keep = [line for line in lines
                if not ((row := json.loads(line)).get("stage") == stage and row.get("step", 0) > step)]
        if len(keep) < len(lines):
            atomic_write(str(self.path), lambda f: f.write("".join(keep).encode()))


def train_loop(name, path, parts, config, one_step, start_step, steps, log, extra=None):
    """Run one_step(step) -> dict of floats for steps start_step+1 .. steps; log, save, stop safely.

    parts: name -> object with state_dict() (model, EMA, optimisers, Batches), saved in every
    checkpoint with the step, the config and the RNG states. A non-finite loss stops the run without
    saving, so the last good checkpoint stays as it was; Ctrl-C or SIGTERM saves, then raises KeyboardInterrupt.
    """
    stage = name.split("-")[0]

    def save(step):
        state = {"stage": stage, "step": step, "config": asdict(config), "rng": rng_state(), **(extra or {})}
        save_checkpoint({**state, **{key: part.state_dict() for key, part in parts.items()}}, path)

    log.forget_after(name, start_step)
    started = time.time()
    with StopRequest() as stop, tqdm(total=steps, initial=start_step, desc=name, dynamic_ncols=True) as bar:
        for step in range(start_step + 1, steps + 1):
            metrics = one_step(step)
            bad = [key for key, value in metrics.items() if not math.isfinite(value)]
            if bad:
                kept = f"the last good checkpoint ({path}) is untouched" if path.exists() else \
                    f"no checkpoint of {name} was written yet"
                raise FloatingPointError(f"{name}: non-finite {', '.join(bad)} at step {step}; stopped without "
                                         f"saving, {kept}. Try a lower learning rate.")
            bar.update(1)
            bar.set_postfix({key: f"{metrics[key]:.4f}" for key in ("loss", "disc") if key in metrics})
            if step % config.log_every == 0 or step == steps:
                elapsed = time.time() - started
                log.write({"stage": name, "step": step, **metrics, "seconds": round(elapsed, 2),
                           "steps_per_second": round((step - start_step) / elapsed, 2)})
            if step % config.save_every == 0 or step == steps or stop.requested:
                save(step)
            if stop.requested:
                raise KeyboardInterrupt(f"{name} interrupted at step {step}; saved {path}. "
                                        f"Continue with the same command plus --resume.")


def learning_rate(step, peak, warmup_steps):
    return peak * min(1.0, step / warmup_steps) if warmup_steps else peak


def set_learning_rate(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------------------------
# Stage 1: pretrain the base model with the standard diffusion loss.


def pretrain(config, data, device):
    """Train the base denoiser (diffusion loss, EMA) into <out>/pretrain.pt; returns its path."""
    path = config.out / "pretrain.pt"
    checkpoint, finished = open_checkpoint(path, config, "pretrain", config.pretrain_steps)
    if finished:
        print(f"pretrain: {path} is finished, skipping")
        return path
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = build_model(config, data).to(device)
    ema = EMA(model, decay=config.pretrain_ema_decay, warmup=True)  # from a random init: see EMA
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, weight_decay=0.0)
    batches = Batches(len(data.train_images), config.pretrain_batch_size, config.seed)
    parts = {"model": model, "ema": ema, "optimizer": optimizer, "batches": batches}
    start_step = resume_parts(checkpoint, parts)
    schedule = build_schedule(config, device)
    print(f"pretrain: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"steps {start_step} -> {config.pretrain_steps} on {device}")

    def one_step(step):
        x0, cond, uncond = training_batch(batches, config, data, device)
        if cond is not None:  # drop labels at random so the model also learns p(x) for guidance
            cond = torch.where(torch.rand(len(cond), device=device) < config.cond_drop_prob, uncond, cond)
        set_learning_rate(optimizer, learning_rate(step, config.pretrain_lr, config.warmup_steps))
        with autocast(device):
            loss = diffusion_loss(model, x0, schedule, config.prediction_type, cond=cond).mean()
        descend(optimizer, loss, config.e2e.grad_clip)
        ema.update(model)
        return {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}

    train_loop("pretrain", path, parts, config, one_step, start_step, config.pretrain_steps,
               Log(config.out / "metrics.jsonl"))
    return path


def resume_parts(checkpoint, parts):
    """Load every part and the RNG states from a checkpoint; returns its step (0 if none)."""
    if checkpoint is None:
        return 0
    for key, part in parts.items():
        part.load_state_dict(checkpoint[key])
    set_rng_state(checkpoint["rng"])
    return checkpoint["step"]


def load_base(config, data, device):
    """The frozen EMA weights of the pretrained base model, checked against the config."""
    checkpoint = finished_checkpoint(config.out / "pretrain.pt", config, "pretrain", config.pretrain_steps,
                                     "run --stage pretrain first (or --stage all)")
    ema = EMA(build_model(config, data).to(device), decay=config.pretrain_ema_decay, warmup=True)
    ema.load_state_dict(checkpoint["ema"])
    return ema.module.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Stage 1b (--base lcm): latent consistency distillation, the frozen diffusion base as the teacher.


def per_image(values):
    """(B,) -> (B, 1, 1, 1), to scale a batch of images."""
    return values.view(-1, 1, 1, 1)


def consistency_function(model, z_t, t, cond, alphas_cumprod, prediction_type):
    """f(z_t, t) = c_skip(t) z_t + c_out(t) x0_hat(z_t, t): the LCM's output, the identity at t = 0."""
    abar = alphas_cumprod[t]
    x0, _ = split_prediction(model(z_t, t, cond), z_t, abar.sqrt(), (1 - abar).sqrt(), prediction_type)
    c_skip, c_out = consistency_scalings(t.float())
    return per_image(c_skip) * z_t + per_image(c_out) * x0


def distill(config, data, device):
    """Latent consistency distillation (Luo et al. 2023, Alg. 1, in pixel space here) of the frozen base
    into a few-step LCM, into <out>/lcm.pt; returns its path.

    On the LCM grid {k-1, 2k-1, ..., N-1} (k = N // original_steps, 20 for the usual 50 steps): draw x0
    and t_{n+k} on the grid, noise x0 to z_{t_{n+k}}, take one DDIM step of the teacher's guided ODE
    to z_{t_n} (the skipping-step solver), and pull the student's f(z_{t_{n+k}}, t_{n+k}) towards the
    target network's f(z_{t_n}, t_n) (stop-gradient); the target is the student's EMA (decay mu). The
    teacher's guidance is the toy's --guidance-scale, one w (the paper's LCMs also take w as an input,
    which the toy UNet has no slot for). The target network is the LCM kept (as diffusers' LCD script).
    """
    path = config.out / "lcm.pt"
    checkpoint, finished = open_checkpoint(path, config, "distill", config.distill_steps)
    if finished:
        print(f"distill: {path} is finished, skipping")
        return path
    teacher = load_base(config, data, device)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = build_model(config, data).to(device)
    model.load_state_dict(teacher.state_dict())  # the student starts as the teacher (LCD initialises from it)
    target = EMA(model, decay=config.distill_target_decay)  # theta^-
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.distill_lr, weight_decay=0.0)
    batches = Batches(len(data.train_images), config.distill_batch_size, config.seed)
    parts = {"model": model, "target": target, "optimizer": optimizer, "batches": batches}
    start_step = resume_parts(checkpoint, parts)
    schedule = build_schedule(config, device)
    abar = schedule.alphas_cumprod
    grid = sampling_timesteps(config.num_train_timesteps, config.e2e.original_steps, "lcm",
                              config.e2e.original_steps).to(device)  # every grid point, descending
    skip = config.num_train_timesteps // config.e2e.original_steps  # k
    print(f"distill: LCD on the {len(grid)}-point grid (skipping step {skip}), steps {start_step} -> "
          f"{config.distill_steps} on {device}")

    def one_step(step):
        x0, cond, uncond = training_batch(batches, config, data, device)
        t = grid[torch.randint(len(grid), (len(x0),), device=device)]  # t_{n+k}
        s = (t - skip).clamp(min=0)  # t_n
        z_t = per_image(abar[t].sqrt()) * x0 + per_image((1 - abar[t]).sqrt()) * torch.randn_like(x0)
        with torch.no_grad(), autocast(device):  # one DDIM step of the teacher's (guided) ODE, then the target
            output = guided_output(teacher, z_t, t, cond, uncond, config.guidance_scale).float()
            x0_teacher, eps_teacher = split_prediction(output, z_t, abar[t].sqrt(), (1 - abar[t]).sqrt(),
                                                       config.prediction_type)
            z_s = per_image(abar[s].sqrt()) * x0_teacher + per_image((1 - abar[s]).sqrt()) * eps_teacher
            target_output = consistency_function(target.module, z_s, s, cond, abar, config.prediction_type).float()
        with autocast(device):
            prediction = consistency_function(model, z_t, t, cond, abar, config.prediction_type).float()
        loss = F.mse_loss(prediction, target_output)  # LCD's d: L2 (the LCM code also offers Huber)
        descend(optimizer, loss, config.e2e.grad_clip)
        target.update(model)
        return {"loss": loss.item()}

    train_loop("distill", path, parts, config, one_step, start_step, config.distill_steps,
               Log(config.out / "metrics.jsonl"))
    return path


def load_lcm(config, data, device):
    """The distilled LCM (the target network's weights), checked against the config."""
    checkpoint = finished_checkpoint(config.out / "lcm.pt", config, "distill", config.distill_steps,
                                     "run --stage distill --base lcm first (or --stage all --base lcm)")
    target = EMA(build_model(config, data).to(device), decay=config.distill_target_decay)
    target.load_state_dict(checkpoint["target"])
    return target.module.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Stage 2: end-to-end fine-tuning through the unrolled T-step sampler.


@torch.no_grad()
def invert_training_set(base, data, schedule, config, device):
    """z_T = DDIM inversion of every training image by the frozen base, in fixed chunks: the coupling
    of Alg. 1 line 6 with `--coupling inversion`, computed once.

    The base never changes during fine-tuning, so this per-example cache is exact; fixed chunks keep
    it bit-identical between a run and its resume.
    """
    inverted = []
    for start in range(0, len(data.train_images), config.eval_batch_size):
        x0 = data.train_images[start:start + config.eval_batch_size].to(device)
        cond, _ = conditions(config, data, data.train_labels[start:start + config.eval_batch_size].to(device))
        with autocast(device):
            z_T = ddim_invert(base, x0, schedule, config.e2e.inversion_steps,
                              prediction_type=config.prediction_type, cond=cond)
        inverted.append(z_T.float().cpu())
    return torch.cat(inverted)


@torch.no_grad()
def teacher_pairs(base, data, schedule, config, device):
    """The teacher coupling (e2ediff.couple), made once: --teacher-pool noises per training image, each
    with that image's label, and the frozen base's --teacher-steps DDIM sample from it. Returns (z_T,
    samples), pair i for training image i % N; seeded by --seed, in fixed chunks (a resume rebuilds it
    bit-identically)."""
    generator = torch.Generator().manual_seed(config.seed)
    labels = data.train_labels.repeat(config.teacher_pool)
    noises, samples = [], []
    for label_chunk in labels.split(config.eval_batch_size):
        cond, _ = conditions(config, data, label_chunk.to(device))
        shape = (len(label_chunk), *data.image_shape)
        with autocast(device):
            z_T, sample = couple("teacher", torch.empty(shape, device=device), base_model=base, schedule=schedule,
                                 prediction_type=config.prediction_type, cond=cond,
                                 teacher_steps=config.e2e.teacher_steps, generator=generator)
        noises.append(z_T.float().cpu())
        samples.append(sample.float().cpu())
    return torch.cat(noises), torch.cat(samples)


def coupling_pairs(config, data, device, base, schedule):
    """Alg. 1 line 6 made once, for the couplings the frozen base makes: (z_T, paired target or None =
    the data), or None for pairs drawn on every batch. Saved as <out>/pairs-<coupling>.pt and reused
    while it was made by the same base, split and settings (benchmarks share one across many runs)."""
    coupling, e2e = config.e2e.coupling, config.e2e
    if coupling == "independent" or (coupling == "teacher" and config.teacher_pool == 0):
        return None
    steps = e2e.inversion_steps if coupling == "inversion" else e2e.teacher_steps
    key = {**{name: getattr(config, name) for name in MODEL_FIELDS + ("seed", "pretrain_steps", "teacher_pool")},
           "coupling": coupling, "steps": steps}
    path = config.out / f"pairs-{coupling}.pt"
    if path.exists():
        cached = load_checkpoint(path)
        if cached["key"] == key:
            return cached["z_T"], cached["paired_target"]
    started = time.time()
    if coupling == "inversion":
        pairs = (invert_training_set(base, data, schedule, config, device), None)
    else:
        pairs = teacher_pairs(base, data, schedule, config, device)
    print(f"finetune: {len(pairs[0])} {coupling} pairs ({steps} DDIM steps of the base) in {time.time() - started:.1f}s")
    save_checkpoint({"key": key, "z_T": pairs[0], "paired_target": pairs[1]}, path)
    return pairs


def finetune(config, data, device):
    """Fine-tune the base end-to-end, one model per T in config.nfe; returns {T: checkpoint path}.
    Finished models are skipped, and the base's inversion runs only if some model still trains."""
    paths = {steps: config.out / f"{finetune_name(config, steps)}.pt" for steps in config.nfe}
    opened = {steps: open_checkpoint(path, config, "finetune", config.finetune_steps) for steps, path in paths.items()}
    todo = {steps: checkpoint for steps, (checkpoint, finished) in opened.items() if not finished}
    for steps in sorted(set(paths) - set(todo)):
        print(f"{finetune_name(config, steps)}: {paths[steps]} is finished, skipping")
    if not todo:
        return paths
    base = load_base(config, data, device)  # the frozen diffusion base: the couplings' ODE, in both settings
    start = base if config.base == "diffusion" else load_lcm(config, data, device)
    schedule = build_schedule(config, device)
    pairs = coupling_pairs(config, data, device, base, schedule)
    lpips = None
    if config.e2e.lpips_weight > 0 and config.perceptual_net == "lpips":
        lpips = LPIPS(net=config.e2e.lpips_net, random_backbone=config.e2e.lpips_random_backbone).to(device)
    elif config.e2e.lpips_weight > 0:
        lpips = FeatureDistance(train_perceptual(config, data, device))
    for steps, checkpoint in todo.items():
        finetune_one(config, data, device, base, start, schedule, steps, pairs, lpips, checkpoint)
    return paths


def finetune_one(config, data, device, base, start, schedule, num_steps, pairs, lpips, checkpoint):
    """Alg. 1 on a copy of `start` (the base, or the LCM) for a num_steps-step sampler, into
    <out>/finetune[-lcm]-nfe<T>.pt; `base` makes the coupling's pairs, or `pairs` holds them cached:
    (z_T, paired target or None = the data), pair i for training image i % N. An LCM trains through its
    own sampler (lcm_sampler: --lcm-update on its grid, no extra guidance). `checkpoint`: the unfinished
    run to continue, or None."""
    name = finetune_name(config, num_steps)
    path = config.out / f"{name}.pt"
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    method = replace(config.e2e, num_steps=num_steps)
    guidance_scale = config.guidance_scale
    if config.base == "lcm":
        sampler = lcm_sampler(config)
        guidance_scale = sampler.pop("guidance_scale")
        method = replace(method, **sampler)
    model = build_model(config, data).to(device)
    model.load_state_dict(start.state_dict())  # Alg. 1 line 1: start from the pretrained model (EMA weights)
    ema = EMA(model, decay=method.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.finetune_lr, weight_decay=0.0)
    num_images = len(data.train_images)
    batches = Batches(num_images if pairs is None else len(pairs[0]), config.finetune_batch_size, config.seed)
    parts = {"model": model, "ema": ema, "optimizer": optimizer, "batches": batches}
    gan = None
    if method.gan_weight > 0:
        num_classes = data.num_classes if method.disc_conditional else None
        if method.disc_kind == "basefeat":  # heads on a copy of the frozen diffusion base (its hooks stay off `base`)
            example_cond, _ = conditions(config, data, data.train_labels[:1].to(device))
            discriminator = base_feature_discriminator(copy.deepcopy(base), schedule, method,
                                                       data.train_images[:1].to(device), example_cond, num_classes)
        else:
            discriminator = PatchDiscriminator(data.image_shape[0], method.disc_channels, method.disc_layers, num_classes)
        gan = GANLoss(discriminator.to(device), method)
        parts.update(discriminator=gan.discriminator, disc_optimizer=gan.optimizer)
    loss_fn = EndToEndLoss(model, schedule, method, config.prediction_type, lpips=lpips, gan=gan,
                           guidance_scale=guidance_scale)
    health = None if gan is None else CriticHealth(config, data, device, loss_fn, gan)
    if health is not None:
        parts["critic_health"] = health
    start_step = resume_parts(checkpoint, parts)
    if health is not None and start_step == 0 and method.critic_warmup_steps == 0:
        health.values["warmup"] = health()  # no warm-up: the critic as it starts
    print(f"{name}: coupling {method.coupling}, loss {method.loss_weights}, gan {method.gan_weight}, "
          f"steps {start_step} -> {config.finetune_steps} on {device}")

    def one_step(step):
        pair_indices = batches.next()
        indices = pair_indices % num_images  # Alg. 1 line 3; pixel space, so z0 = x0 (no line 4), e_c = the label
        cond, uncond = conditions(config, data, data.train_labels[indices].to(device))
        batch = {"target": data.train_images[indices].to(device), "cond": cond, "uncond": uncond}
        if pairs is not None:  # Alg. 1 line 6, cached
            z_T, paired_target = pairs
            batch["z_T"] = z_T[pair_indices].to(device)
            batch["paired_target"] = None if paired_target is None else paired_target[pair_indices].to(device)
        logs = train_step(loss_fn, optimizer, ema, [batch], step - 1, base_model=base, gan=gan,
                          autocast=partial(autocast, device))  # Alg. 1 lines 6-15; step - 1 steps done before
        if health is not None and (step % config.log_every == 0 or step in (method.critic_warmup_steps,
                                                                           config.finetune_steps)):
            logs["critic_auc"] = health()
            for moment, at in (("warmup", method.critic_warmup_steps), ("final", config.finetune_steps)):
                if step == at:
                    health.values[moment] = logs["critic_auc"]
        return logs

    train_loop(name, path, parts, config, one_step, start_step, config.finetune_steps,
               Log(config.out / "metrics.jsonl"), extra={"nfe": num_steps})
    return path


CRITIC_AUC_SAMPLES = 256  # held-out reals, and as many fakes: the AUC's standard error is then 0.020 near 0.8
                          # and 0.014 near 0.9 (critics.auc_standard_error)
CRITIC_AUC_SEED_OFFSET = 2000  # the fakes' fixed noise is seeded by config.seed + this


def critic_auc_samples(data) -> int:
    """How many held-out real digits (and as many fakes) CriticHealth measures a critic's AUC on."""
    return min(CRITIC_AUC_SAMPLES, len(data.test_images))


class CriticHealth:
    """The discriminator's held-out AUC (critics.student_auc): real = the first CRITIC_AUC_SAMPLES images of the
    split the run is measured against (never trained on), fake = the current student's samples from fixed noise
    for the same labels. A part of the fine-tune's checkpoint: its value at the end of the critic's warm-up (or
    at the start, without one) and at the end of the run. The random state of training is left untouched."""

    def __init__(self, config, data, device, loss_fn, gan):
        count = critic_auc_samples(data)
        self.real, labels = data.test_images[:count].to(device), data.test_labels[:count].to(device)
        self.cond, self.uncond = conditions(config, data, labels)
        self.z_T = torch.randn(self.real.shape, generator=torch.Generator().manual_seed(
            config.seed + CRITIC_AUC_SEED_OFFSET)).to(device)
        self.loss_fn, self.gan, self.seed = loss_fn, gan, config.seed + CRITIC_AUC_SEED_OFFSET
        self.values = {"warmup": None, "final": None}

    def __call__(self) -> float:
        return student_auc(self.loss_fn, self.gan, self.real, self.z_T, self.cond, self.uncond, seed=self.seed)

    def state_dict(self):
        return dict(self.values)

    def load_state_dict(self, state):
        self.values = dict(state)


def finetuned_critic_auc(config, num_steps) -> dict:
    """{"critic_auc_warmup", "critic_auc"} of a finished fine-tune with a GAN term; {} without one."""
    checkpoint = load_checkpoint(config.out / f"{finetune_name(config, num_steps)}.pt")
    values = checkpoint.get("critic_health")
    return {} if values is None else {"critic_auc_warmup": values["warmup"], "critic_auc": values["final"]}


def load_finetuned(config, data, device, num_steps):
    """The EMA weights of the model fine-tuned for num_steps sampler steps, trained with our recipe (the
    results record it)."""
    path = config.out / f"{finetune_name(config, num_steps)}.pt"
    checkpoint = finished_checkpoint(path, config, "finetune", config.finetune_steps,
                                     f"run --stage finetune --nfe {num_steps} first, or leave {num_steps} out of --nfe")
    check_same_recipe(checkpoint["config"], config, "finetune", path)
    ema = EMA(build_model(config, data).to(device), decay=config.e2e.ema_decay)
    ema.load_state_dict(checkpoint["ema"])
    return ema.module.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Metrics: classifier Fréchet distance (offline), Inception FID (CIFAR-10, with torch-fidelity).


PERCEPTUAL_SEED_OFFSET = 1000  # the perceptual backbone's seed is config.seed + this: never the metric classifier's


def metric_classifier(config, data, device):
    """The metric's classifier and what it is: (Classifier, record: path, sha256, accuracy on the eval split).
    auto on digits: the fixed instrument metrics/digits-classifier.pt; a path: that file; retrain (and auto on
    CIFAR-10): trained on the train split, cached in <out>/classifier.pt, its initialisation seeded too, so that
    metric is a function of --seed alone (on one machine)."""
    path = metric_classifier_path(config)
    if path == "retrain":
        torch.manual_seed(config.seed)
        classifier = fit_classifier(Classifier(data.image_shape[0], data.num_classes), config.out / "classifier.pt",
                                    data, device, config.seed, config.classifier_epochs, config.eval_batch_size)
        record = {"path": "retrain", "sha256": None}
    else:
        classifier, record = load_metric_classifier(path, device, data.image_shape[0], data.num_classes)
        record = {key: record[key] for key in ("path", "sha256")}
    accuracy = classifier_accuracy(classifier, data.test_images, data.test_labels, config.eval_batch_size)
    return classifier, {**record, f"{config.eval_split}_accuracy": accuracy}


def metric_classifier_path(config):
    """"retrain", None for the committed instrument (toy_data.load_metric_classifier checks its sha256), or a file."""
    if config.metric_classifier == "auto":
        return None if config.dataset == "digits" else "retrain"
    return config.metric_classifier


def train_perceptual(config, data, device):
    """The toy's perceptual backbone (toy_nets.PerceptualNet), trained as a classifier on the train
    split with its own seed; cached in <out>/perceptual.pt. The `lpips` term of --perceptual-net trained."""
    seed = config.seed + PERCEPTUAL_SEED_OFFSET
    torch.manual_seed(seed)
    return fit_classifier(PerceptualNet(data.image_shape[0], data.num_classes), config.out / "perceptual.pt",
                          data, device, seed, config.classifier_epochs, config.eval_batch_size)


# ----------------------------------------------------------------------------------------------
# Stage 3: sample, measure, tabulate.


@torch.no_grad()
def generate(model, config, data, schedule, num_steps, num_samples, device, lcm=False):
    """num_samples images from fixed noise (seeded by config.seed), labels cycling through the classes:
    DDIM, or with lcm=True an LCM's own sampler (its update on its grid; its fresh noise from the seed too)."""
    generator = torch.Generator().manual_seed(config.seed)
    noise = torch.randn(num_samples, *data.image_shape, generator=generator)
    labels = torch.arange(num_samples) % data.num_classes
    sampler = lcm_sampler(config) if lcm else dict(update="ddim", spacing=config.e2e.spacing,
                                                   guidance_scale=config.guidance_scale)
    images = []
    for z_T, label_chunk in zip(noise.split(config.eval_batch_size), labels.split(config.eval_batch_size)):
        cond, uncond = conditions(config, data, label_chunk.to(device))
        with autocast(device):
            x0 = unrolled_sample(model, z_T.to(device), schedule, num_steps, prediction_type=config.prediction_type,
                                 cond=cond, uncond=uncond, generator=generator, **sampler)
        images.append(x0.float().clamp(-1, 1).cpu())
    return torch.cat(images)


def save_grid(images, path, num_classes):
    """The first num_classes^2 images as a grid (one column per class), upscaled to >= 64 px per cell."""
    import torchvision
    grid = images[:num_classes * num_classes]
    if grid.shape[-1] < 32:
        grid = F.interpolate(grid, scale_factor=64 // grid.shape[-1], mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image((grid + 1) / 2, path, nrow=num_classes, padding=2, pad_value=1.0)


def evaluate(config, data, device, started=None):
    """Base DDIM at config.base_nfe vs each fine-tuned model at its NFE: grids, results.md/.json. `started`:
    when the run began (time.time()), for the run's wall time in results.json."""
    schedule = build_schedule(config, device)
    base = load_base(config, data, device)
    finetuned = {steps: load_finetuned(config, data, device, steps) for steps in config.nfe}
    classifier, metric = metric_classifier(config, data, device)
    print(f"metric classifier {metric['path']}: {config.eval_split}-split accuracy "
          f"{metric[config.eval_split + '_accuracy']:.3f}")
    cfd = ClassifierFrechetDistance(classifier, data.test_images, config.eval_batch_size)
    inception_error = None
    candidates = [("real data (train split)", None, "data", data.train_images[:config.eval_samples])]
    for steps in config.base_nfe:
        candidates.append(("base, DDIM", steps, f"base-ddim-nfe{steps}",
                           generate(base, config, data, schedule, steps, config.eval_samples, device)))
    lcm = config.base == "lcm"
    if lcm:
        distilled = load_lcm(config, data, device)
        for steps in config.nfe:
            candidates.append(("LCM (distilled)", steps, f"lcm-nfe{steps}",
                               generate(distilled, config, data, schedule, steps, config.eval_samples, device, lcm)))
    for steps, model in finetuned.items():
        candidates.append(("E2E from LCM" if lcm else "E2E fine-tuned", steps, f"e2e-{'lcm-' * lcm}nfe{steps}",
                           generate(model, config, data, schedule, steps, config.eval_samples, device, lcm)))
    rows, log = [], Log(config.out / "metrics.jsonl")
    log.forget("eval")  # an evaluation run again replaces the last one's rows
    for label, steps, name, images in tqdm(candidates, desc="eval", dynamic_ncols=True):
        row = {"model": label, "nfe": steps, "cfd": cfd(images), **pixel_metrics(images, data.test_images)}
        if name.startswith("e2e-"):  # the discriminator's held-out AUC, when it had one
            row.update(finetuned_critic_auc(config, steps))
        if data.name == "cifar10" and inception_error is None:
            try:
                row["inception_fid"] = inception_fid(images, config.data_dir, config.inception_weights, device)
            except FileNotFoundError as error:
                inception_error = str(error)
        save_grid(images, config.out / "grids" / f"{name}.png", data.num_classes)
        rows.append(row)
        log.write({"stage": "eval", **row})
    if inception_error:
        print(f"Inception FID skipped: {inception_error}")
    table = results_table(rows, data, inception_error, config.eval_split)
    (config.out / "results.md").write_text(table + "\n")
    (config.out / "results.json").write_text(json.dumps({
        "config": asdict(config), "metric_classifier": metric, "threads": torch.get_num_threads(),
        "wall_s": None if started is None else round(time.time() - started, 1), "rows": rows}, indent=1) + "\n")
    print(table)
    for line in verdicts(rows):
        print(line)
    return rows


PIXEL_METRIC_SAMPLES = 2000  # pairwise distances: O(n^2) memory, so CIFAR-10's 10k samples are capped


def pixel_metrics(images, reference):
    """The metrics no trained network shapes, against the test split in pixel space: energy distance,
    k-NN precision (fidelity) and recall (diversity), and the high-frequency ratio (Laplacian power over the
    split's: detail); on at most PIXEL_METRIC_SAMPLES of each."""
    images, reference = images[:PIXEL_METRIC_SAMPLES], reference[:PIXEL_METRIC_SAMPLES]
    scores = precision_recall(reference, images)
    return {"pixel_energy": energy_distance(images, reference), "precision": scores["precision"],
            "recall": scores["recall"], "hf_ratio": high_frequency_ratio(images, reference)}


def verdicts(rows):
    """One line per fine-tuned model under the verdict rule (toy_nets.verdict: CFD <= 0.9x, pixel energy
    <= 1.0x and recall >= the reference's - 0.05): against the model it started from at the same NFE,
    and (from an LCM: the paper's Table 1) against the diffusion base's 50-step DDIM."""
    by = {(row["model"], row["nfe"]): row for row in rows}
    lines = []
    for (model, nfe), row in by.items():
        if model not in ("E2E fine-tuned", "E2E from LCM"):
            continue
        start = "base, DDIM" if model == "E2E fine-tuned" else "LCM (distilled)"
        for other, other_nfe in [(start, nfe)] + [("base, DDIM", 50)] * (model == "E2E from LCM"):
            if (other, other_nfe) in by:
                result = verdict(row, by[other, other_nfe])
                lines.append(f"{nfe} NFE: {model} {'beats' if result['beats'] else 'does NOT beat'} {other} at "
                             f"{other_nfe} NFE: CFD {row['cfd']:.1f} vs {by[other, other_nfe]['cfd']:.1f} (ratio "
                             f"{result['distance_ratio']:.2f}), pixel ratio {result['pixel_ratio']:.2f}, recall "
                             f"{result['recall_delta']:+.3f}")
    return lines


def results_table(rows, data, inception_error, split="test"):
    """Markdown table of the evaluation rows; `split`: what the metrics compared against (--eval-split)."""
    with_fid = data.name == "cifar10"
    header = "| model | NFE | CFD ↓ | pixel energy ↓ | precision ↑ | recall ↑ |" + (" Inception FID ↓ |" if with_fid else "")
    lines = [header, "|---|---|---|---|---|---|" + ("---|" if with_fid else "")]
    for row in rows:
        line = (f"| {row['model']} | {row['nfe'] or '–'} | {row['cfd']:.1f} | {row['pixel_energy']:.4f} | "
                f"{row['precision']:.3f} | {row['recall']:.3f} |")
        if with_fid:
            line += f" {row['inception_fid']:.2f} |" if "inception_fid" in row else " n/a |"
        lines.append(line)
    lines.append(f"\nCFD: Fréchet distance in a small {data.name} classifier's features against the {split} "
                 f"split ({len(data.test_images)} images); not the Inception FID. Pixel energy, precision, recall: "
                 f"the same {split} split in pixel space (energy distance; k-NN precision and recall, k = 5).")
    if with_fid and inception_error:
        lines.append("Inception FID n/a: weights not on disk (see the message printed by the run).")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Before any work: every input checked, and every checkpoint the run will read or continue opened.


def preflight(config):
    """Check what this run needs before it builds a model or touches the disk: the device, the data
    folder, the Inception weights, and every checkpoint it will continue (--resume) or build on.
    Returns (the device, whether every training stage of this run is already finished)."""
    device = select_device(config.device)
    folder = Path(config.data_dir) / CIFAR10_FOLDER
    if config.dataset == "cifar10" and not config.download and not folder.is_dir():
        raise UsageError(f"--data-dir: no CIFAR-10 in {folder}/ and --no-download; unpack cifar-10-python.tar.gz "
                         f"into {config.data_dir}/, or allow --download")
    if config.inception_weights:
        check_readable_file(config.inception_weights, "inception_weights", f"the file {INCEPTION_WEIGHTS}")
    if metric_classifier_path(config) != "retrain" and config.stage in ("all", "eval"):  # the instrument, before any work
        try:
            load_metric_classifier(metric_classifier_path(config), in_channels=CHANNELS[config.dataset])
        except UsageError as error:
            raise UsageError(f"--metric-classifier: {error}") from None
    lcm = config.base == "lcm"
    if config.stage == "distill" and not lcm:
        raise UsageError("--stage distill: the LCM is distilled for --base lcm; pass it (or another --stage)")
    out = config.out  # (stage, checkpoint, its steps, what makes it)
    pretrained = ("pretrain", out / "pretrain.pt", config.pretrain_steps, "run --stage pretrain first (or --stage all)")
    distilled = ("distill", out / "lcm.pt", config.distill_steps,
                 "run --stage distill --base lcm first (or --stage all --base lcm)")
    tuned = [("finetune", out / f"{finetune_name(config, steps)}.pt", config.finetune_steps,
              f"run --stage finetune --nfe {steps} first, or leave {steps} out of --nfe") for steps in config.nfe]
    writes = {"all": [pretrained] + [distilled] * lcm + tuned, "pretrain": [pretrained], "distill": [distilled],
              "finetune": tuned, "eval": []}[config.stage]
    reads = {"all": [], "pretrain": [], "distill": [pretrained], "finetune": [pretrained] + [distilled] * lcm,
             "eval": [pretrained] + [distilled] * lcm + tuned}[config.stage]
    finished = [open_checkpoint(path, config, stage, steps)[1] for stage, path, steps, _ in writes]
    for stage, path, steps, how in reads:  # what this run builds on or evaluates: its results record our recipe as theirs
        check_same_recipe(finished_checkpoint(path, config, stage, steps, how)["config"], config, stage, path)
    return device, all(finished)


def check_batch_sizes(config, data):
    """UsageError for a batch larger than the training split of the stages this run trains."""
    sizes = {"pretrain_batch_size": config.stage in ("all", "pretrain"),
             "distill_batch_size": config.stage == "distill" or config.stage == "all" and config.base == "lcm",
             "finetune_batch_size": config.stage in ("all", "finetune")}
    for name in (name for name, used in sizes.items() if used):
        if getattr(config, name) > len(data.train_images):
            raise UsageError(f"{flag(name)}: got {getattr(config, name)}, need at most the "
                             f"{len(data.train_images)} training images of {data.name}")


def results_up_to_date(config):
    """Whether results.json holds this config's evaluation and is newer than every checkpoint."""
    results = config.out / "results.json"
    if not results.exists():
        return False
    now = {key: value for key, value in json.loads(json.dumps(asdict(config))).items() if key not in ("resume", "stage")}
    saved = {key: value for key, value in json.loads(results.read_text())["config"].items()
             if key not in ("resume", "stage")}
    newest_checkpoint = max((path.stat().st_mtime for path in config.out.glob("*.pt")), default=0.0)
    return saved == now and results.stat().st_mtime >= newest_checkpoint


def main(argv=None, description: str = ""):
    """The command line: every stage --stage asks for, in order (train_toy.py)."""
    try:
        config = parse_config(argv, description)
        device, nothing_to_train = preflight(config)
        data = build_dataset(config)
        check_batch_sizes(config, data)
    except (UsageError, FileNotFoundError) as error:  # FileNotFoundError: CIFAR-10 neither here nor downloadable
        exit_with(error)
    started = time.time()
    try:
        if config.stage in ("all", "pretrain"):
            pretrain(config, data, device)
        if config.stage == "distill" or config.stage == "all" and config.base == "lcm":
            distill(config, data, device)
        if config.stage in ("all", "finetune"):
            finetune(config, data, device)
        if config.stage == "eval" or config.stage == "all" and not (nothing_to_train and results_up_to_date(config)):
            evaluate(config, data, device, started)
        elif config.stage == "all":
            print(f"eval: {config.out / 'results.json'} is up to date (nothing trained since), skipping; "
                  f"--stage eval evaluates again")
    except KeyboardInterrupt as interrupt:
        StopRequest.exit(str(interrupt) or "interrupted outside training; nothing to save")
    except UsageError as error:
        exit_with(error)
    except (FileNotFoundError, FloatingPointError) as error:
        sys.exit(f"error: {error}")
    print(f"done in {time.time() - started:.0f}s; outputs in {config.out}/")

