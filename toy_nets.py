"""toy_nets — the networks and the metric of the toy script (train_toy.py), kept apart as nanoGPT
keeps model.py apart from train.py: the denoising UNet, the small classifier whose features define the
offline metric, that metric (the classifier Fréchet distance), and the Inception FID on CIFAR-10.
"""
import contextlib
import io
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from train_utils import inception_weights_path, missing_inception_message

CIFAR10_FOLDER = "cifar-10-batches-py"  # the python-pickle release's folder, under --data-dir

# ----------------------------------------------------------------------------------------------
# Model: a small DDPM-style UNet (residual blocks, time + class embedding, no attention).


def timestep_embedding(t, dim, max_period=10_000):
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017; DDPM). t (B,) -> (B, dim)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def group_norm(channels):
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding added in between, a skip connection around."""

    def __init__(self, in_channels, out_channels, embed_dim):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embed = nn.Linear(embed_dim, out_channels)
        self.norm2, self.conv2 = group_norm(out_channels), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, embedding):
        h = self.conv1(F.silu(self.norm1(x))) + self.embed(embedding)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class UNet(nn.Module):
    """Denoiser model(z_t, t, cond) -> output of z_t's shape; cond = class labels (B,) or None.

    Label num_classes is the "no class" token of classifier-free guidance; cond=None means it too.
    """

    def __init__(self, in_channels, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, num_classes=None):
        super().__init__()
        self.model_channels, self.num_classes = model_channels, num_classes
        embed_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.class_embed = nn.Embedding(num_classes + 1, embed_dim) if num_classes else None
        self.input = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.down, skip_channels, channels = nn.ModuleList(), [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(channels, mult * model_channels, embed_dim))
                channels = mult * model_channels
                skip_channels.append(channels)
            if level < len(channel_mult) - 1:  # halve the resolution
                self.down.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1))
                skip_channels.append(channels)
        self.middle = nn.ModuleList([ResBlock(channels, channels, embed_dim), ResBlock(channels, channels, embed_dim)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(channels + skip_channels.pop(), mult * model_channels, embed_dim))
                channels = mult * model_channels
            if level > 0:  # double the resolution
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(channels, channels, 3, padding=1)))
        self.out = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @property
    def last_layer(self):
        """The output conv's weight: the GAN loss's adaptive weight compares gradient norms here."""
        return self.out[-1].weight

    def forward(self, z_t, t, cond=None):
        embedding = self.time_embed(timestep_embedding(t, self.model_channels))  # (B, 4C)
        if self.class_embed is not None:
            if cond is None:
                cond = torch.full_like(t, self.num_classes)
            embedding = embedding + self.class_embed(cond)
        h = self.input(z_t)
        skips = [h]
        for block in self.down:
            h = block(h, embedding) if isinstance(block, ResBlock) else block(h)
            skips.append(h)
        for block in self.middle:
            h = block(h, embedding)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), embedding) if isinstance(block, ResBlock) else block(h)
        return self.out(h).float()  # fp32 out, so the sampler's arithmetic stays fp32 under autocast


# ----------------------------------------------------------------------------------------------
# The metric: classifier Fréchet distance (offline), Inception FID (CIFAR-10, with torch-fidelity).


class Classifier(nn.Module):
    """Small CNN classifier; its penultimate features (`.features`, (N, 2*width)) define the CFD."""

    def __init__(self, in_channels, num_classes, width=32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.features.num_features = 2 * width  # torchmetrics reads the feature size from here
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


class PerceptualNet(nn.Module):
    """The toy's perceptual backbone: a VGG-style classifier (two 3x3 convs per stage, GroupNorm, SiLU,
    average pooling; 16 -> 32 -> 64 channels) whose three stage outputs `features(x)` feed
    perceptual.FeatureDistance, LPIPS-style. A different network from `Classifier` (the metric's), by
    architecture and by seed, and trained separately, so a loss in its features does not optimise
    the CFD's own features."""

    def __init__(self, in_channels, num_classes, widths=(16, 32, 64)):
        super().__init__()
        self.stages, channels = nn.ModuleList(), in_channels
        for index, width in enumerate(widths):
            pool = [nn.AvgPool2d(2)] if index > 0 else []  # 8x8 -> 8, 4, 2 on digits
            self.stages.append(nn.Sequential(*pool, nn.Conv2d(channels, width, 3, padding=1), group_norm(width), nn.SiLU(),
                                             nn.Conv2d(width, width, 3, padding=1), group_norm(width), nn.SiLU()))
            channels = width
        self.head = nn.Linear(channels, num_classes)

    def features(self, x):
        """(B, C, H, W) in [-1, 1] -> the three stage outputs, [(B, 16, H, W), (B, 32, H/2, W/2), (B, 64, H/4, W/4)]."""
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs

    def forward(self, x):
        return self.head(self.features(x)[-1].mean((2, 3)))


class ClassifierFrechetDistance:
    """Classifier Fréchet distance (CFD) of images to a fixed reference set — not the Inception FID.

    ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) over the classifier's penultimate features,
    computed by torchmetrics' FrechetInceptionDistance with that feature network. Images in [-1, 1].
    """

    def __init__(self, classifier, reference, batch_size=500):
        from torchmetrics.image.fid import FrechetInceptionDistance
        self.device = next(classifier.parameters()).device
        self.batch_size = batch_size
        self.metric = FrechetInceptionDistance(feature=classifier.features, reset_real_features=False).to(self.device)
        self.feed(reference, real=True)

    @torch.no_grad()
    def feed(self, images, real):
        for chunk in images.split(self.batch_size):
            self.metric.update(chunk.to(self.device, torch.float32), real=real)

    def __call__(self, images):
        self.metric.reset()  # keeps the reference statistics
        self.feed(images, real=False)
        return float(self.metric.compute())


class TensorImages(torch.utils.data.Dataset):
    """A tensor of images as the Dataset torch-fidelity takes (items are tensors, not tuples)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


def inception_fid(images, data_dir, weights="", device=torch.device("cpu")):
    """Inception FID of images ((N, 3, H, W) in [-1, 1]) against CIFAR-10 train, via torch-fidelity.

    Raises FileNotFoundError, naming the file and where it goes, when the weights or data are absent.
    """
    weights_path = inception_weights_path(weights)
    if not Path(weights_path).is_file():
        raise FileNotFoundError(f"Inception FID needs {missing_inception_message(weights_path)}")
    if not (Path(data_dir) / CIFAR10_FOLDER).is_dir():
        raise FileNotFoundError(f"Inception FID needs CIFAR-10 train in {Path(data_dir) / CIFAR10_FOLDER}")
    import torch_fidelity
    uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    metrics = torch_fidelity.calculate_metrics(
        input1=TensorImages(uint8), input2="cifar10-train", fid=True,
        datasets_root=str(data_dir), datasets_download=False,
        feature_extractor_weights_path=str(weights_path), cuda=device.type == "cuda", verbose=False)
    return metrics["frechet_inception_distance"]


# ----------------------------------------------------------------------------------------------
# Metrics no trained network shapes: distances between samples in pixel space.


def laplacian_power(images: torch.Tensor) -> float:
    """Mean squared response of the 3x3 Laplacian (edges replicated) per pixel and channel: the energy of an
    image's finest detail. images (N, C, H, W) in [-1, 1]."""
    channels = images.shape[1]
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).repeat(channels, 1, 1, 1)
    response = F.conv2d(F.pad(images.float(), (1, 1, 1, 1), mode="replicate"), kernel.to(images.device), groups=channels)
    return float(response.pow(2).mean())


def high_frequency_ratio(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Laplacian power of samples / that of real images: < 1 blurrier than the data, > 1 noisier, 1 = as sharp.
    The detail the paper's GAN term is said to add (Table 2) shows here, where a Fréchet distance barely moves."""
    return laplacian_power(images) / laplacian_power(reference)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance (Szekely & Rizzo 2013): 2 E|X - Y| - E|X - X'| - E|Y - Y'| >= 0, = 0 iff the
    distributions match. x (n, ...), y (m, ...), flattened to vectors; the V-statistic (diagonal zeros
    included). On images: pixel space, where no trained network can be gamed."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, nearest_k: int = 5) -> dict:
    """k-NN precision and recall (Kynkaanniemi et al. 2019), with density and coverage (Naeem et al.
    2020), by the `prdc` package (Naeem et al.'s code) on flattened samples: precision is the share of
    samples inside the real data's k-NN balls (fidelity), recall the share of real points inside the
    samples' k-NN balls (diversity: it drops when modes are dropped)."""
    from prdc import compute_prdc
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the two set sizes
        values = compute_prdc(real.flatten(1).double().numpy(), fake.flatten(1).double().numpy(), nearest_k)
    return {name: float(value) for name, value in values.items()}


# The verdict rule (the project's measurement rules): a student beats a reference only on the same samples'
# distribution metric, pixel metric and recall together, so that no win comes from dropping modes.
BEATS_CFD_RATIO = 0.9  # distribution metric: at least 10 % lower
BEATS_PIXEL_RATIO = 1.0  # pixel-space energy distance: no worse
BEATS_RECALL_MARGIN = 0.05  # recall: at most 0.05 below the reference's


def verdict(student: dict, reference: dict, metric: str = "cfd") -> dict:
    """The three comparisons of the verdict rule, student vs reference (dicts of means with `metric`,
    "pixel_energy" (optional: 2D points have no pixels) and "recall"), and whether all hold ("beats")."""
    result = {"distance_ratio": student[metric] / reference[metric],
              "recall_delta": student["recall"] - reference["recall"]}
    checks = [result["distance_ratio"] <= BEATS_CFD_RATIO, result["recall_delta"] >= -BEATS_RECALL_MARGIN]
    if "pixel_energy" in student:
        result["pixel_ratio"] = student["pixel_energy"] / reference["pixel_energy"]
        checks.append(result["pixel_ratio"] <= BEATS_PIXEL_RATIO)
    return {**result, "beats": all(checks)}
