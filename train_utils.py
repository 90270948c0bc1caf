"""train_utils — the run plumbing that train_toy.py and train_t2i.py share, kept out of the method module.

Command-line flags from a config dataclass, atomic checkpoints, every RNG's state for an exact resume,
Ctrl-C / SIGTERM as a flag the training loop reads between steps, device choice, and where the
Inception FID weights live. Nothing here is E2EDiff; e2ediff.py holds the method.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import signal
import sys
import threading
import typing
from typing import Any, Callable

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------
# Config -> command line. Every field becomes --field-name with its "why" as help; the fields of a
# nested config dataclass (the scripts embed e2ediff.EndToEndConfig) become flags of their own names.


def _nested(config_class) -> dict[str, Any]:
    """{field: its default instance} for every field of config_class that is itself a config dataclass."""
    return {f.name: nested for f in dataclasses.fields(config_class)
            if f.default is dataclasses.MISSING and dataclasses.is_dataclass(nested := f.default_factory())}


def _flags(config_class) -> list[tuple[dataclasses.Field, type, Any]]:
    """(field, type, default) for every flag of config_class, the nested configs' fields flattened in."""
    nested, rows = _nested(config_class), []
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        if f.name in nested:
            inner = typing.get_type_hints(type(nested[f.name]))
            rows += [(g, inner[g.name], getattr(nested[f.name], g.name)) for g in dataclasses.fields(nested[f.name])]
        else:
            rows.append((f, hints[f.name], f.default))
    return rows


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else repr(value)


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def parse_config(config_class, argv=None, description: str = "", presets: dict | None = None,
                 preset_flag: str = "", hidden: tuple[str, ...] = ()):
    """Command line -> config_class. Flags override the preset that the `preset_flag` field selects (a
    dict of flat field names), which overrides the defaults. `hidden` fields get no flag."""
    presets = presets or {}
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)  # only the flags given reach the namespace
    for f, kind, default in _flags(config_class):
        if f.name in hidden:
            continue
        text = f.metadata["help"] + f" [default: {_show(default)}"
        text += "".join(f"; {name}: {_show(p[f.name])}" for name, p in presets.items() if f.name in p) + "]"
        name, choices = "--" + f.name.replace("_", "-"), f.metadata.get("choices")
        if kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, help=text)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(name, type=_int_tuple, metavar="N[,N...]", help=text)
        else:
            parser.add_argument(name, type=kind, choices=choices, help=text)
    given = vars(parser.parse_args(argv))
    try:
        return make_config(config_class, **{**presets.get(given.get(preset_flag), {}), **given})
    except ValueError as error:
        parser.error(str(error))


def make_config(config_class, **values):
    """config_class from flat {field: value}, named as the flags are: the fields of a nested config go
    into it, on top of the defaults that the outer config gives it."""
    top = {}
    for name, nested in _nested(config_class).items():
        inner = {f.name for f in dataclasses.fields(nested)}
        top[name] = dataclasses.replace(nested, **{k: v for k, v in values.items() if k in inner})
        values = {k: v for k, v in values.items() if k not in inner}
    return config_class(**values, **top)


def changed(config, **values):
    """A copy of config with some flat fields changed (as make_config names them)."""
    return make_config(type(config), **{**flat_config(config), **values})


def flat_config(config) -> dict:
    """A config (with nested configs) as one flat {field: value} dict, as the flags name them."""
    flat = {}
    for name, value in dataclasses.asdict(config).items():
        flat.update(value if isinstance(value, dict) else {name: value})
    return flat


# ----------------------------------------------------------------------------------------------
# Checkpoints and RNG state: a stopped run resumes exactly.


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Call write(binary file) on a temp file in the same folder, fsync, then rename over `path`, so a
    crash mid-write never leaves a truncated file (the previous one stays intact)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(state: dict, path) -> None:
    """torch.save(state) to `path` atomically (see atomic_write)."""
    atomic_write(str(path), lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint with torch.load(weights_only=True) (no arbitrary code from the file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated file, foreign pickle, ...
        raise ValueError(f"could not read checkpoint {path}: {error}") from error


def rng_state() -> dict:
    """Every global RNG a training loop touches (torch CPU, CUDA, python, numpy), as tensors/tuples."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": int(numpy_state[2]),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))


# ----------------------------------------------------------------------------------------------
# Stopping cleanly, and where things run.


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (torchrun shutting down, a cluster preempting the job) turned into a
    flag, `requested`, that a training loop reads between steps, so that it stops at a step boundary
    with a consistent checkpoint instead of dying mid-step. A second Ctrl-C interrupts at once. Only
    the main thread can install signal handlers; in any other thread this is a flag nobody sets.

        with StopRequest() as stop:
            for step in ...:
                train_step(); if stop.requested: save(); break
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.requested, self.previous = False, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self.handle) for signum in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt("second Ctrl-C: stopped at once, without saving")
        self.requested = True

    def __exit__(self, *exc):
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)

    @staticmethod
    def exit(message: str) -> None:
        """End the program after a stop: the message on stderr, exit status 130 (the shell's "SIGINT")."""
        print(f"\n{message}", file=sys.stderr)
        sys.exit(130)


def select_device(name: str = "auto") -> torch.device:
    """"auto" picks cuda, then mps, then cpu; otherwise the named device, which must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available; valid here: 'auto', 'cpu'")
    return device


INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's port of TF Inception (FID)


def inception_weights_path(path: str = "") -> str:
    """Where the Inception FID weights are expected: `path` if given, else $TORCH_HOME/hub/checkpoints."""
    return path or os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS)


def missing_inception_message(path: str) -> str:
    """What to do when the Inception FID weights are not at `path`."""
    return (f"torch-fidelity's Inception weights {INCEPTION_WEIGHTS} are not at {path} (torch-fidelity "
            f"downloads them on first use when online). Offline, copy the file to "
            f"{os.path.dirname(path)}/ or pass --inception-weights PATH.")
