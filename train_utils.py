"""train_utils — the run plumbing that train_toy.py and train_t2i.py share, kept out of the method module.

Command-line flags from a config dataclass, atomic checkpoints, every RNG's state for an exact resume,
Ctrl-C / SIGTERM as a flag the training loop reads between steps, one clipped optimiser step, device choice,
and where the Inception FID weights live. Nothing here is E2EDiff; e2ediff.py holds the method.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import signal
import sys
import threading
import typing
import zipfile
from typing import Any, Callable

import numpy as np
import torch

from e2ediff import EndToEndConfig

# ----------------------------------------------------------------------------------------------
# Checking a config: each field against its e2ediff.option() declaration, and Rules across fields.


class OptionError(ValueError):
    """A config field holds a value it cannot take. `name` is the field, so that a command line can
    name its flag: "--finetune-lr: got nan, need a finite number > 0"."""

    def __init__(self, name: str, value: Any, need: str):
        self.name, self.value, self.need = name, value, need
        super().__init__(f"{name}: got {value!r}, need {need}")


def _within(value, valid: str) -> bool:
    """Whether a number satisfies a `valid` range of option()."""
    if valid.startswith(">="):
        return value >= float(valid[2:])
    if valid.startswith(">"):
        return value > float(valid[1:])
    low, high = (float(bound) for bound in valid[1:-1].split(","))
    return (low <= value if valid[0] == "[" else low < value) and (value <= high if valid[-1] == "]" else value < high)


def check_options(config) -> None:
    """OptionError for the first field of `config` whose value its option() declaration rules out:
    not one of its choices, not finite, outside its `valid` range, an empty tuple or string."""
    for f in dataclasses.fields(config):
        value, valid = getattr(config, f.name), f.metadata.get("valid", "")
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            raise OptionError(f.name, value, "one of " + ", ".join(map(repr, f.metadata["choices"])))
        if valid == "non-empty" or isinstance(value, tuple) and not value:
            if not value:
                raise OptionError(f.name, value, "a non-empty value")
            continue
        numbers = value if isinstance(value, tuple) else (value,)
        if isinstance(value, bool) or not all(isinstance(n, (int, float)) for n in numbers):
            continue
        need = ("comma-separated integers, each" if isinstance(value, tuple) else
                "a finite number" if isinstance(f.default, float) else "an integer")
        need += "" if not valid else f" {valid}" if valid[0] == ">" else f" in {valid}"
        if not all(math.isfinite(n) and (not valid or _within(n, valid)) for n in numbers):
            raise OptionError(f.name, value, need)


@dataclasses.dataclass(frozen=True)
class Rule:
    """A constraint across options: a combination that a later part of a run would reject with a
    ValueError (the sampler's grid, a network's input size, a missing condition), checked instead when
    the config is made, before a model is built or a file written. `holds(config)` says whether the
    config keeps it; `breaking` is one combination of values that breaks it (tests/test_bad_inputs.py
    runs each rule's `breaking` through each script, so a new rule gets its bad-input case for free)."""

    fields: tuple[str, ...]  # the options involved, the one to change first
    need: str  # what they must satisfy together, as a user reads it
    holds: Callable[[Any], bool]
    breaking: dict[str, Any]


class RuleError(OptionError):
    """A config breaks a Rule; the scripts name every flag of it: "--a 5 with --b 4: need ..."."""

    def __init__(self, rule: Rule, config):
        self.rule, self.config = rule, config
        super().__init__(rule.fields[0], getattr(config, rule.fields[0], None), rule.need)


def check_rules(config, rules: tuple[Rule, ...]) -> None:
    """RuleError for the first rule in `rules` that `config` breaks."""
    for rule in rules:
        if not rule.holds(config):
            raise RuleError(rule, config)


def _needs_reconstruction(config) -> bool:
    return max(config.loss_weights.values()) > 0 or (config.gan_weight > 0 and not config.gan_adaptive)


# check_prediction_type (section 2) as a Rule, for the scripts' configs, which hold both fields
PREDICTION_RULE = Rule(("prediction_type", "zero_terminal_snr"), "--prediction-type v_prediction or sample with zero "
                       "terminal SNR (epsilon cannot recover x0 where alpha_T = 0)",
                       lambda c: not (c.prediction_type == "epsilon" and c.zero_terminal_snr),
                       {"prediction_type": "epsilon", "zero_terminal_snr": True})

END_TO_END_RULES = (
    Rule(("backprop_steps", "num_steps"), "backprop_steps <= num_steps (the last K of the T sampler steps)",
         lambda c: c.backprop_steps <= c.num_steps, {"backprop_steps": 4, "num_steps": 2}),
    Rule(("l2_weight", "l1_weight", "lpips_weight", "gan_weight", "gan_adaptive"),
         "a reconstruction weight > 0 (l1, l2 or lpips), or a GAN weight with --no-gan-adaptive (the adaptive "
         "weight is a ratio to the reconstruction loss)", _needs_reconstruction,
         {"l1_weight": 0.0, "l2_weight": 0.0, "lpips_weight": 0.0}),
    Rule(("original_steps", "num_steps", "spacing"), "num_steps <= original_steps with spacing lcm (T steps are "
         "picked from the LCM's grid of original_steps)",
         lambda c: c.spacing != "lcm" or c.num_steps <= c.original_steps,
         {"spacing": "lcm", "original_steps": 2, "num_steps": 4}),
    Rule(("checkpoint_policy", "grad_checkpoint"), "grad_checkpoint on with checkpoint_policy selective (the policy "
         "says what a checkpointed step keeps)", lambda c: c.grad_checkpoint or c.checkpoint_policy == "full",
         {"checkpoint_policy": "selective", "grad_checkpoint": False}),
    Rule(("disc_feature_layers", "disc_kind"), "--disc-feature-layers auto unless --disc-kind basefeat (only its heads "
         "read the base's blocks)", lambda c: c.disc_kind == "basefeat" or c.disc_feature_layers == "auto",
         {"disc_feature_layers": "middle.0", "disc_kind": "patch"}),
    Rule(("disc_t_distribution", "disc_kind"), "--disc-t-distribution logit_normal unless --disc-kind basefeat (only it "
         "re-noises its inputs)", lambda c: c.disc_kind == "basefeat" or c.disc_t_distribution == "logit_normal",
         {"disc_t_distribution": "uniform", "disc_kind": "patch"}),
    Rule(("critic_warmup_steps", "gan_weight"), "--critic-warmup-steps 0 without a GAN term (--gan-weight > 0): it "
         "warms up the discriminator", lambda c: c.critic_warmup_steps == 0 or c.gan_weight > 0,
         {"critic_warmup_steps": 10, "gan_weight": 0.0}),
    Rule(("disc_train_backbone", "disc_kind"), "--no-disc-train-backbone unless --disc-kind basefeat (only it has a "
         "backbone: the base)", lambda c: c.disc_kind == "basefeat" or not c.disc_train_backbone,
         {"disc_train_backbone": True, "disc_kind": "patch"}),
)


def validate(config, rules: tuple[Rule, ...] = ()) -> None:
    """OptionError (or RuleError) for the first bad value: first in each nested config, then in `config`'s
    own fields, then the first of `rules` it breaks (an EndToEndConfig: END_TO_END_RULES first)."""
    for f in dataclasses.fields(config):
        if dataclasses.is_dataclass(inner := getattr(config, f.name)):
            validate(inner)
    check_options(config)
    check_rules(config, (*END_TO_END_RULES, *rules) if isinstance(config, EndToEndConfig) else rules)


# ----------------------------------------------------------------------------------------------
# Config -> command line. Every field becomes --field-name with its "why" as help; the fields of a
# nested config dataclass (the scripts embed e2ediff.EndToEndConfig) become flags of their own names.


def _nested(config_class) -> dict[str, Any]:
    """{field: its default instance} for every field of config_class that is itself a config dataclass."""
    return {f.name: nested for f in dataclasses.fields(config_class)
            if f.default is dataclasses.MISSING and dataclasses.is_dataclass(nested := f.default_factory())}


def flag_fields(config_class) -> list[tuple[dataclasses.Field, type, Any]]:
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


class UsageError(ValueError):
    """Bad input found before any work starts: a flag's value, a missing file, an unavailable device.
    The scripts report it in one line on stderr and exit with status 2 (see exit_with)."""


def flag(name: str) -> str:
    """The command-line flag of a config field: learning_rate -> --learning-rate."""
    return "--" + name.replace("_", "-")


def exit_with(error: UsageError) -> typing.NoReturn:
    """End the program on a usage error: one line on stderr, no usage block, no traceback, status 2."""
    print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr)
    sys.exit(2)


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError("--flag: ...") where argparse would print its usage block and exit."""

    def error(self, message):
        raise UsageError(message.removeprefix("argument "))


def _typed(kind, what: str):
    """An argparse type that says what it expected: "got 'abc', need an integer"."""
    def convert(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text!r}, need {what}") from None
    convert.__name__ = kind.__name__
    return convert


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


ARGUMENT_TYPES = {int: _typed(int, "an integer"), float: _typed(float, "a number"), str: str}


def parse_config(config_class, argv=None, description: str = "", presets: dict | None = None,
                 preset_flag: str = "", hidden: tuple[str, ...] = ()):
    """Command line -> config_class. Flags override the preset that the `preset_flag` field selects (a
    dict of flat field names), which overrides the defaults. `hidden` fields get no flag. Every bad value
    (type, choice, range: the fields' option() declarations) raises UsageError naming its flag."""
    presets = presets or {}
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                     argument_default=argparse.SUPPRESS)  # only the flags given reach the namespace
    for f, kind, default in flag_fields(config_class):
        if f.name in hidden:
            continue
        text = f.metadata["help"] + f" [default: {_show(default)}"
        text += "".join(f"; {name}: {_show(p[f.name])}" for name, p in presets.items() if f.name in p)
        text += f"; valid: {f.metadata['valid']}" if "valid" in f.metadata else ""
        text += "]"
        name, choices = flag(f.name), f.metadata.get("choices")
        if kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, help=text)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(name, type=_typed(_int_tuple, "comma-separated integers, e.g. 1,2,4"),
                                metavar="N[,N...]", help=text)
        else:
            parser.add_argument(name, type=ARGUMENT_TYPES[kind], choices=choices, help=text)
    given = vars(parser.parse_args(argv))
    try:
        return make_config(config_class, **{**presets.get(given.get(preset_flag), {}), **given})
    except RuleError as error:  # options that are bad together: name every one of them
        values = flat_config(error.config)
        first, *others = (as_flags(name, values[name]) for name in error.rule.fields)
        raise UsageError(f"{first}{' with ' if others else ''}{', '.join(others)}: need {error.rule.need}") from None
    except OptionError as error:
        raise UsageError(f"{flag(error.name)}: got {_show(error.value)}, need {error.need}") from None


def flag_arguments(name: str, value) -> list[str]:
    """The arguments that set a field to `value`: ["--nfe", "1,2"], ["--no-class-conditional"]."""
    if isinstance(value, bool):
        return [flag(name) if value else "--no-" + name.replace("_", "-")]
    return [flag(name), ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]


def as_flags(name: str, value) -> str:
    """How a command line sets a field to `value`: "--nfe 1,2", "--no-class-conditional"."""
    return " ".join(flag_arguments(name, value))


def command_line(values: dict) -> list[str]:
    """The arguments that parse_config reads back as these field values: a config handed to a script that
    runs as a subprocess."""
    return [part for name, value in values.items() for part in flag_arguments(name, value)]


def make_config(config_class, **values):
    """config_class from flat {field: value}, named as the flags are: the fields of a nested config go
    into it, on top of the defaults that the outer config gives it. Validated (OptionError, RuleError)."""
    top = {}
    for name, nested in _nested(config_class).items():
        inner = {f.name for f in dataclasses.fields(nested)}
        top[name] = dataclasses.replace(nested, **{k: v for k, v in values.items() if k in inner})
        values = {k: v for k, v in values.items() if k not in inner}
    config = config_class(**values, **top)
    validate(config)  # every field against its option(), a nested EndToEndConfig against END_TO_END_RULES too
    return config


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
# One optimiser step of the stages outside Algorithm 1 (e2ediff.train_step has its own).


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float = 0.0) -> None:
    """Backpropagate loss and step the optimiser, the gradient norm of its parameters clipped at grad_clip (0: off)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
    optimizer.step()


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


def load_checkpoint(path, map_location="cpu", *, hint: str = "", mmap: bool = False) -> dict:
    """Load a checkpoint with torch.load(weights_only=True) (no arbitrary code from the file); mmap=True
    maps the tensors instead of reading them (a cheap check that a large file is whole). A missing or
    unreadable file raises UsageError, one line, ending with `hint`: how to recover."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}. {hint}".strip())
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # truncated file, foreign pickle, ...
        reason = ("truncated, or not a torch.save file" if not zipfile.is_zipfile(path)
                  else (str(error).strip().splitlines() or [type(error).__name__])[0][:200])
        raise UsageError(f"could not read checkpoint {path} ({reason}). {hint}".strip()) from error


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


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def select_device(name: str = "auto") -> torch.device:
    """"auto" picks cuda, then mps, then cpu; otherwise the named device (cpu, cuda, cuda:1, mps), which
    must be available here: UsageError for --device otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": _mps_available()}
    valid = ", ".join(["auto"] + [kind for kind, present in available.items() if present])
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: got {name!r}, need one of {valid} (here)") from None
    if not available.get(device.type, False):
        raise UsageError(f"--device: got {name!r}, which this machine does not have; valid here: {valid}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device: got {name!r}, but there are {torch.cuda.device_count()} CUDA devices")
    return device


def check_readable_file(path: str, name: str, what: str) -> None:
    """UsageError for flag `name` unless `path` is a readable file."""
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        problem = "is a folder" if os.path.isdir(path) else "no such file" if not os.path.exists(path) else "unreadable"
        raise UsageError(f"{flag(name)}: got {path!r} ({problem}), need {what}")


INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's port of TF Inception (FID)


def inception_weights_path(path: str = "") -> str:
    """Where the Inception FID weights are expected: `path` if given, else $TORCH_HOME/hub/checkpoints."""
    return path or os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS)


def missing_inception_message(path: str) -> str:
    """What to do when the Inception FID weights are not at `path`."""
    return (f"torch-fidelity's Inception weights {INCEPTION_WEIGHTS} are not at {path} (torch-fidelity "
            f"downloads them on first use when online). Offline, copy the file to "
            f"{os.path.dirname(path)}/ or pass --inception-weights PATH.")
