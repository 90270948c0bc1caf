"""perceptual — the perceptual distances of the loss zoo (Eq. 7's LPIPS term), with their weights' loading.

- LPIPS: the `lpips` package's metric (Zhang et al. 2018) on an ImageNet backbone whose torchvision weights
  must be on disk (offline: a clear error names the file and where it goes; never random weights silently).
- FeatureDistance: LPIPS's distance in the features of any frozen network (the toy trains its own).

e2ediff.reconstruction_loss takes either as its `lpips` argument: any (B, ...) x2 -> (B,) module.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from e2ediff import LPIPS_NETS, check_choice

LPIPS_BACKBONE_FILES = {  # what torchvision downloads into $TORCH_HOME/hub/checkpoints, per LPIPS_NETS
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
        check_choice("LPIPS net", net, LPIPS_NETS)
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
