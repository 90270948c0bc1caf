"""train_utils.py: config flags, atomic checkpoints, RNG state, stop signals."""
import os
import random
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import e2ediff
import train_utils


@dataclass
class RunConfig:
    steps: int = e2ediff.option(10, "how long")
    mode: str = e2ediff.option("fast", "how", ("fast", "slow"))
    sizes: tuple[int, ...] = e2ediff.option((1, 2), "which")
    e2e: e2ediff.EndToEndConfig = field(default_factory=lambda: e2ediff.EndToEndConfig(coupling="inversion"))


def test_flags_of_a_nested_method_config_keep_their_names_and_the_scripts_defaults():
    config = train_utils.parse_config(RunConfig, ["--steps", "3", "--sizes", "4,8", "--l2-weight", "0.5",
                                                  "--no-grad-checkpoint"])
    assert (config.steps, config.sizes, config.mode) == (3, (4, 8), "fast")
    assert config.e2e.l2_weight == 0.5 and not config.e2e.grad_checkpoint
    assert config.e2e.coupling == "inversion"  # the script's default, not EndToEndConfig's
    assert train_utils.flat_config(config)["coupling"] == "inversion"
    other = train_utils.changed(config, steps=4, ema_decay=0.5)
    assert (other.steps, other.sizes, other.e2e.ema_decay, other.e2e.l2_weight) == (4, (4, 8), 0.5, 0.5)


def test_presets_fill_unset_flags_and_bad_values_exit_naming_the_valid_choices(capsys):
    presets = {"slow": {"steps": 99, "ema_decay": 0.5}}
    config = train_utils.parse_config(RunConfig, ["--mode", "slow"], presets=presets, preset_flag="mode")
    assert config.steps == 99 and config.e2e.ema_decay == 0.5
    config = train_utils.parse_config(RunConfig, ["--mode", "slow", "--steps", "5"], presets=presets, preset_flag="mode")
    assert config.steps == 5
    for argv, message in [(["--coupling", "nearest"], "--coupling: invalid choice: 'nearest' (choose from 'independent', "
                                                     "'inversion', 'teacher')"),
                          (["--backprop-steps", "9"], "--backprop-steps 9 with --num-steps 4: need backprop_steps <= num_steps "
                                                     "(the last K of the T sampler steps)"),
                          (["--ema-decay", "nan"], "--ema-decay: got nan, need a finite number in [0, 1]"),
                          (["--steps", "2.5"], "--steps: got '2.5', need an integer")]:
        with pytest.raises(train_utils.UsageError) as error:
            train_utils.parse_config(RunConfig, argv)
        assert str(error.value) == message


def test_checkpoint_round_trip_is_weights_only_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    train_utils.save_checkpoint({"step": 1, "weights": torch.arange(3.0), "config": {"lr": 1e-4}}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert train_utils.load_checkpoint(path)["config"] == {"lr": 1e-4}

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train_utils.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert train_utils.load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind
    with pytest.raises(train_utils.UsageError, match="no checkpoint"):
        train_utils.load_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(train_utils.UsageError, match=r"could not read checkpoint .*garbage.pt \(.*\)\. Move it$") as error:
        train_utils.load_checkpoint(str(tmp_path / "garbage.pt"), hint="Move it")
    assert "\n" not in str(error.value)  # one line, however long torch's own message is


def test_stop_request_turns_sigint_and_sigterm_into_a_flag_and_a_second_ctrl_c_interrupts():
    def deliver(signum):
        os.kill(os.getpid(), signum)
        time.sleep(0.05)  # Python runs the handler at the next bytecode boundary of the main thread

    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    with train_utils.StopRequest() as stop:
        assert not stop.requested
        deliver(signal.SIGTERM)
        assert stop.requested  # the loop saves at the end of its step instead of dying mid-step
        with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
            deliver(signal.SIGINT)
    assert {signum: signal.getsignal(signum) for signum in before} == before  # handlers restored


def test_rng_state_round_trip_replays_every_generator(tmp_path):
    state = train_utils.rng_state()
    train_utils.save_checkpoint({"rng": state}, str(tmp_path / "rng.pt"))
    first = (torch.rand(3), random.random(), np.random.rand(3))
    train_utils.set_rng_state(train_utils.load_checkpoint(str(tmp_path / "rng.pt"))["rng"])
    second = (torch.rand(3), random.random(), np.random.rand(3))
    torch.testing.assert_close(first[0], second[0])
    assert first[1] == second[1] and np.array_equal(first[2], second[2])
