"""The toy's data and its metric's classifier, shared by train_toy.py, related/dsd.py and the benchmarks
(a script is never imported as a library: its shared pieces live here).

Both datasets become the same tensors in [-1, 1], (N, C, H, W), with class labels: scikit-learn's bundled
8x8 digits (offline) and CIFAR-10 (the python-pickle release). `fit_classifier` trains the small
classifier whose features the toy's metric (toy_nets.ClassifierFrechetDistance) compares, cached on disk.

On digits that classifier is a fixed instrument, as the Inception network is for FID: trained once, its
weights committed in metrics/digits-classifier.pt, checked against METRIC_CLASSIFIER_SHA256 before each
use (`load_metric_classifier`). Retrained on each machine, it would move every CFD by ~1 % from one CPU to
the next (floating-point differences grow through its 30 epochs). Rebuild it (a new instrument: every
committed CFD changes) with

    python toy_data.py --rebuild-metric-classifier
"""
from __future__ import annotations

import hashlib
import pickle
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from toy_nets import CIFAR10_FOLDER, Classifier
from train_utils import UsageError, descend, load_checkpoint, save_checkpoint

IMAGE_SIZE = {"digits": 8, "cifar10": 32}  # pixels per side of each dataset's images, as the loaders below return them
CHANNELS = {"digits": 1, "cifar10": 3}


@dataclass
class ImageData:
    name: str
    train_images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1]
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int

    @property
    def image_shape(self):
        return tuple(self.train_images.shape[1:])


def load_digits_data(test_fraction=0.2):
    """scikit-learn's bundled UCI digits (1,797 images, 8x8, values 0-16), kept at 8x8, 1 channel."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16 * 2 - 1  # (N, 1, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train, test = train_test_split(np.arange(len(labels)), test_size=test_fraction, random_state=0,
                                   stratify=digits.target)
    return ImageData("digits", images[train], labels[train], images[test], labels[test], 10)


def load_cifar10(data_dir, download: bool):
    """CIFAR-10 from <data_dir>/cifar-10-batches-py (the python-pickle release), downloaded if missing.

    torchvision only downloads; the batches are read here because torchvision's reader insists on
    the release's md5 sums, which a small test folder cannot have.
    """
    folder = Path(data_dir) / CIFAR10_FOLDER
    if not folder.is_dir() and download:
        import torchvision
        created = not Path(data_dir).exists()
        try:
            torchvision.datasets.CIFAR10(data_dir, train=True, download=True)
        except OSError as error:  # offline: urllib's URLError
            print(f"CIFAR-10 download failed: {error}", file=sys.stderr)
            if created:  # leave no empty folder behind
                shutil.rmtree(data_dir, ignore_errors=True)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--data-dir: CIFAR-10 not found: expected {folder}/ with data_batch_1 ... data_batch_5 and test_batch. "
            f"Offline, fetch cifar-10-python.tar.gz (the 'CIFAR-10 python version' from the CIFAR "
            f"homepage) elsewhere and unpack it into {data_dir}/, or run with network and --download.")

    def read(names):
        images, labels = [], []
        for name in names:
            with open(folder / name, "rb") as file:
                batch = pickle.load(file, encoding="latin1")
            images.append(batch["data"])  # (n, 3072) uint8, channel-major
            labels.extend(batch["labels"])
        images = torch.from_numpy(np.concatenate(images)).view(-1, 3, 32, 32)
        return images.float() / 255 * 2 - 1, torch.tensor(labels, dtype=torch.int64)

    train_images, train_labels = read([f"data_batch_{i}" for i in range(1, 6)])
    test_images, test_labels = read(["test_batch"])
    return ImageData("cifar10", train_images, train_labels, test_images, test_labels, 10)


VALIDATION_FRACTION = 0.2  # of the train split, with --eval-split validation (digits: 288 of 1,437 images)


def validation_split(data, fraction=VALIDATION_FRACTION):
    """The train split cut in two, stratified by class with a fixed seed: (the rest, validation) as
    (train, test). The test split is not touched."""
    from sklearn.model_selection import train_test_split
    train, validation = train_test_split(np.arange(len(data.train_labels)), test_size=fraction, random_state=0,
                                         stratify=data.train_labels.numpy())
    train, validation = torch.from_numpy(train), torch.from_numpy(validation)
    return ImageData(data.name, data.train_images[train], data.train_labels[train], data.train_images[validation],
                     data.train_labels[validation], data.num_classes)


def fit_classifier(classifier, path, data, device, seed, epochs, eval_batch_size=500):
    """Train `classifier` with cross-entropy for `epochs` on the train split (AdamW, batch
    64, order seeded by `seed`), or load it from `path` when that holds the same training; frozen."""
    key = {"dataset": data.name, "train_size": len(data.train_images), "epochs": epochs,
           "seed": seed, "seeded_init": True}
    classifier, path = classifier.to(device), Path(path)
    if path.exists():
        checkpoint = load_checkpoint(path)
        if checkpoint["key"] == key:
            classifier.load_state_dict(checkpoint["model"])
            return classifier.eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-3)
    batch_size = 64
    for _ in tqdm(range(epochs), desc=path.stem, dynamic_ncols=True):
        order = torch.randperm(len(data.train_images), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            indices = order[start:start + batch_size]
            logits = classifier(data.train_images[indices].to(device))
            loss = F.cross_entropy(logits, data.train_labels[indices].to(device))
            descend(optimizer, loss)
    classifier.eval().requires_grad_(False)
    with torch.no_grad():
        predictions = torch.cat([classifier(chunk.to(device)).argmax(1).cpu()
                                 for chunk in data.test_images.split(eval_batch_size)])
    accuracy = (predictions == data.test_labels).float().mean().item()
    print(f"{path.stem}: test accuracy {accuracy:.3f}")
    save_checkpoint({"model": classifier.state_dict(), "key": key, "test_accuracy": accuracy}, path)
    return classifier


# The digits metric's fixed instrument: what it is, how it was made, how to make it again.
ROOT = Path(__file__).resolve().parent
METRIC_CLASSIFIER = ROOT / "metrics" / "digits-classifier.pt"
METRIC_CLASSIFIER_SHA256 = "5147815c27aaf2c01033458266394f37526460549dda87e092c36de144ba9735"
METRIC_CLASSIFIER_SEED = 0  # train_toy's default --seed: the classifier the quickstart trained before it was fixed
METRIC_CLASSIFIER_EPOCHS = 30  # train_toy's --classifier-epochs default
REBUILD_METRIC_CLASSIFIER = "python toy_data.py --rebuild-metric-classifier"


SPREAD = ROOT / "benchmarks" / "results" / "spread.json"  # python benchmarks/spread.py: the instrument across CPUs


def cross_cpu_tolerance(column: str = "cfd", phase: str = "evaluation") -> float:
    """The largest relative spread of a quickstart table `column` (cfd, pixel_energy, precision, recall) across
    the CPU settings benchmarks/spread.py measured, in its `phase`: "evaluation" (one set of models evaluated)
    or "training" (the quickstart trained again, at a reduced budget). The tightest tolerance with which a
    number computed now may be compared with a committed one."""
    import json
    rows = json.loads(SPREAD.read_text())[phase]
    return max(row[column]["relative"] for row in rows.values())


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_metric_classifier(path=None, device=torch.device("cpu"), in_channels=1, num_classes=10):
    """The metric's classifier, frozen, and what it is: (Classifier, {"path", "sha256", "test_accuracy"}).
    path None: the committed instrument METRIC_CLASSIFIER, checked against METRIC_CLASSIFIER_SHA256; a path:
    a file `fit_classifier` wrote (python toy_data.py --rebuild-metric-classifier --out PATH). A missing,
    truncated or foreign file, a digest mismatch or weights of another shape raise UsageError: one line
    naming the file and the command that rebuilds it."""
    committed = path is None
    path = Path(METRIC_CLASSIFIER if committed else path)
    rebuild = REBUILD_METRIC_CLASSIFIER + ("" if committed else f" --out {path}")

    def fail(problem):
        raise UsageError(f"metric classifier {path}: {problem}; rebuild it with `{rebuild}`")
    if not path.is_file():
        fail("no such file")
    if committed and sha256(path) != METRIC_CLASSIFIER_SHA256:
        fail(f"sha256 {sha256(path)[:12]}... is not the committed instrument's {METRIC_CLASSIFIER_SHA256[:12]}... "
             "(git checkout metrics/ restores it)")
    try:
        checkpoint = load_checkpoint(path)
    except UsageError:
        fail("unreadable (truncated, or not a torch.save file)")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        fail("not a classifier file (no 'model' state dict)")
    classifier = Classifier(in_channels, num_classes)
    try:
        classifier.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        fail(f"weights of another shape ({str(error).splitlines()[-1].strip()[:120]})")
    record = {"path": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path), "sha256": sha256(path),
              "test_accuracy": checkpoint.get("test_accuracy")}
    return classifier.to(device).eval().requires_grad_(False), record


def classifier_accuracy(classifier, images, labels, batch_size=500) -> float:
    """Share of `images` the classifier labels as `labels`."""
    device = next(classifier.parameters()).device
    with torch.no_grad():
        predictions = torch.cat([classifier(chunk.to(device)).argmax(1).cpu() for chunk in images.split(batch_size)])
    return (predictions == labels).float().mean().item()


def rebuild_metric_classifier(out):
    """Train the digits metric's classifier as the committed one was made (seed, epochs, full train split, CPU)."""
    out = Path(out)
    out.unlink(missing_ok=True)  # fit_classifier would load a file with the same training key
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(METRIC_CLASSIFIER_SEED)  # the initialisation, as the toy script seeded it before the file existed
    fit_classifier(Classifier(1, 10), out, load_digits_data(), torch.device("cpu"), METRIC_CLASSIFIER_SEED,
                   METRIC_CLASSIFIER_EPOCHS)
    print(f"{out}: sha256 {sha256(out)}")


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Rebuild the digits metric's classifier (a new instrument: "
                                     "every committed CFD changes, and METRIC_CLASSIFIER_SHA256 must be updated).")
    parser.add_argument("--rebuild-metric-classifier", action="store_true", required=True)
    parser.add_argument("--out", default=str(METRIC_CLASSIFIER), help="where to write it (default: the committed file)")
    rebuild_metric_classifier(parser.parse_args().out)
