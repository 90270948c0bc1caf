"""Every bad input to either script fails at the boundary, before any work: one clear line on stderr
that names the flag (or the file), exit status 2, no traceback, within seconds, and nothing created or
changed on disk.

    pytest tests/test_bad_inputs.py      # about a minute on 2 CPU cores

The cases are generated from the scripts' config dataclasses, so every flag is tried, and a new flag
without a case fails `test_every_flag_has_a_bad_input_case`: per type a wrong type, NaN and infinity
for numbers, each side of a declared range, an unknown choice; per path flag a path that does not exist;
then the cases that need files (corrupt, foreign or unfinished checkpoints, wrong data folders). The
scripts run in this process (`main(argv)`), so that each case costs milliseconds; three of them also
run as real processes, to check the exit status and the whole of stderr as a user sees them.
"""
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import t2i_training
import toy_data
import toy_training
import train_utils

ROOT = Path(__file__).resolve().parent.parent
MISSING = "/no/such/path"
NOT_CHECKED = {  # fields whose every value is accepted at the boundary, and why
    "train_t2i.py": {"precompute_to": "any folder: created by the run (its clash with pre-computed --data has a case)"},
}


@dataclasses.dataclass
class Case:
    script: str  # "train_toy.py" or "train_t2i.py"
    argv: list  # the flags under test; the script's BASE flags come first
    expect: str | tuple  # the stderr line must contain this (the flag's name, or the file's), or each of these
    field: str = ""  # the config field this case tries ("" for a file case)
    setup: str = ""  # a name in SETUPS: files written into the run folder before the run

    @property
    def id(self):
        return f"{self.script[6:-3]} {' '.join(self.argv)}".replace(MISSING, "MISSING")


# --- the cases ---------------------------------------------------------------------------------


def out_of_range(valid: str, integer: bool) -> list[str]:
    """Values just outside an option()'s `valid` range: "> 0" -> 0, ">= 1" -> 0, "[0, 1)" -> -0.5 and 1."""
    if valid.startswith(">="):
        return [str(int(float(valid[2:])) - 1)]
    if valid.startswith(">"):
        return [valid[1:].strip()]
    low, high = (float(bound) for bound in valid[1:-1].split(","))
    step = 1 if integer else 0.5
    return [f"{low - step:g}", f"{high + step:g}" if valid[-1] == "]" else f"{high:g}"]


def generated_cases(script, config_class, hidden=(), paths=None):
    """Cases for every flag of config_class from its declaration (type, choices, range), and `paths`:
    {field: [bad values]} for the string flags whose bad values only the script knows."""
    cases = []
    for f, kind, _ in train_utils.flag_fields(config_class):
        if f.name in hidden:
            continue
        flag, valid = train_utils.flag(f.name), f.metadata.get("valid", "")
        values = []
        if kind is bool:
            cases.append(Case(script, [f"{flag}=maybe"], flag, f.name))
            continue
        if kind is int:
            values = ["abc", "1.5"] + (out_of_range(valid, integer=True) if valid else [])
        elif kind is float:
            values = ["abc", "nan", "inf"] + (out_of_range(valid, integer=False) if valid else [])
        elif kind != str:  # a tuple of ints
            values = ["abc", "", "1,,2"] + (out_of_range(valid, integer=True) if valid else [])
        elif "choices" in f.metadata:
            values = ["bogus"]
        elif valid == "non-empty":
            values = [""]
        cases += [Case(script, [flag, value], flag, f.name) for value in values]
        cases += [Case(script, [*extra, flag, value], flag, f.name) for *extra, value in (paths or {}).get(f.name, [])]
    return cases


TOY_PATHS = {
    "data_dir": [("--dataset", "cifar10", "--no-download", MISSING)],
    "device": [("tpu",), ("cuda:99",)],
    "inception_weights": [(MISSING,), (".",)],
    "metric_classifier": [(MISSING,), ("{run}/bad-classifier.pt",)],  # the second: setup truncated_classifier
}
T2I_PATHS = {
    name: [(MISSING,)] for name in ("pretrained", "transformer", "vae", "text_encoder", "tokenizer", "scheduler")
} | {
    "pretrained": [(MISSING,), ("nobody/no-such-model",)],  # a local path; a hub id not in the offline cache
    "data": [("",), (MISSING,), ("{run}",), ("{run}/shards-{{000..002}}.tar",)],
    "device": [("tpu",), ("cuda:99",)],
    "sample_prompts": [(MISSING,), ("{run}",)],
    "eval_data": [(MISSING,), ("{run}",)],
    "clip_model": [("--eval-data", "{eval}", MISSING)],
    "inception_weights": [(MISSING,)],
}

def checked_rules(config_class, rules, hidden=()):
    """The rules a script checks whose every field is one of its flags (the toy sets num_steps through --nfe,
    so the method's rules on num_steps reach it as the toy's own rules on --nfe)."""
    flags = {f.name for f, _, _ in train_utils.flag_fields(config_class)} - set(hidden)
    return [rule for rule in (*train_utils.END_TO_END_RULES, *rules) if set(rule.fields) <= flags]


def rule_cases(script, config_class, rules, hidden=()):
    """One case per rule (train_utils.Rule) the script checks: the rule's `breaking` values as flags; the line
    must name every flag of the rule (as "class-conditional", which --no-class-conditional contains too)."""
    return [Case(script, train_utils.command_line(rule.breaking),
                 tuple(train_utils.flag(name)[2:] for name in rule.fields), rule.fields[0])
            for rule in checked_rules(config_class, rules, hidden)]


CASES = [
    *generated_cases("train_toy.py", toy_training.Config, hidden=("num_steps",), paths=TOY_PATHS),
    *rule_cases("train_toy.py", toy_training.Config, toy_training.RULES, hidden=("num_steps",)),
    # inputs that are bad against the data
    Case("train_toy.py", ["--finetune-batch-size", "5000"], "--finetune-batch-size", "finetune_batch_size"),
    Case("train_toy.py", ["--pretrain-batch-size", "5000"], "--pretrain-batch-size", "pretrain_batch_size"),
    # checkpoints: corrupt, foreign, of another stage, unfinished, missing, or about to be overwritten
    Case("train_toy.py", ["--resume"], "mv {run}/pretrain.pt", setup="corrupt_pretrain"),
    Case("train_toy.py", ["--resume", "--stage", "finetune", "--nfe", "2"], "mv {run}/finetune-nfe2.pt",
         setup="corrupt_finetune"),
    Case("train_toy.py", [], "Pass --resume", setup="finished_pretrain"),
    Case("train_toy.py", ["--resume", "--model-channels", "16"], "--model-channels: checkpoint 32 vs now 16",
         setup="finished_pretrain"),
    Case("train_toy.py", ["--resume"], "is not a pretrain checkpoint", setup="finetune_as_pretrain"),
    # a checkpoint continued, kept as finished, or evaluated under another recipe than it was trained with
    Case("train_toy.py", ["--resume", "--pretrain-lr", "2e-3"], "--pretrain-lr: checkpoint 0.001 vs now 0.002",
         setup="finished_pretrain"),
    Case("train_toy.py", ["--resume", "--stage", "finetune", "--nfe", "2", "--gan-weight", "0.5"],
         "--gan-weight: checkpoint 0.0 vs now 0.5", setup="unfinished_finetune"),
    Case("train_toy.py", ["--stage", "eval", "--nfe", "2", "--finetune-lr", "2e-4"],
         "--finetune-lr: checkpoint 0.0001 vs now 0.0002", setup="finished_finetune"),
    Case("train_toy.py", ["--stage", "finetune", "--pretrain-lr", "2e-3"], "--pretrain-lr: checkpoint 0.001 vs now 0.002",
         setup="finished_pretrain"),
    Case("train_toy.py", ["--stage", "eval", "--nfe", "1", "--seed", "1"], "--seed: checkpoint 0 vs now 1",
         setup="finished_pretrain"),
    Case("train_toy.py", ["--stage", "finetune"], "no pretrain checkpoint at {run}/pretrain.pt"),
    Case("train_toy.py", ["--stage", "finetune"], "stopped at step 5 of 3000", setup="unfinished_pretrain"),
    Case("train_toy.py", ["--stage", "eval", "--nfe", "1"], "--stage finetune --nfe 1", setup="finished_pretrain"),
    Case("train_toy.py", ["--stage", "distill"], "--stage distill: the LCM is distilled for --base lcm"),
    Case("train_toy.py", ["--metric-classifier", "{run}/bad-classifier.pt"],
         ("--metric-classifier", "truncated", "toy_data.py --rebuild-metric-classifier"), setup="truncated_classifier"),
    Case("train_toy.py", [], ("--metric-classifier", "digits-classifier.pt", "sha256",
                              "toy_data.py --rebuild-metric-classifier"), setup="changed_instrument"),
    Case("train_toy.py", ["--stage", "finetune", "--base", "lcm"], "run --stage distill --base lcm first",
         setup="finished_pretrain"),
    Case("train_toy.py", ["--distill-batch-size", "5000", "--base", "lcm"], "--distill-batch-size",
         "distill_batch_size"),
    *generated_cases("train_t2i.py", t2i_training.Config, paths=T2I_PATHS),
    *rule_cases("train_t2i.py", t2i_training.Config, t2i_training.RULES),
    Case("train_t2i.py", ["--resolution", "100"], "--resolution", "resolution"),
    Case("train_t2i.py", ["--disc-conditional"], "--disc-conditional", "disc_conditional"),
    Case("train_t2i.py", ["--data", "{precomputed}", "--resolution", "512"], "--resolution", "resolution"),
    Case("train_t2i.py", ["--data", "{precomputed}", "--precompute-to", "{run}/again"], "--precompute-to"),
    Case("train_t2i.py", ["--zero-terminal-snr"], ("--prediction-type epsilon", "--zero-terminal-snr", "scheduler_config"),
         setup="lcm_scheduler"),  # epsilon comes from the base's scheduler config
    Case("train_t2i.py", ["--num-steps", "4"], ("--num-steps 4", "--spacing auto", "num_steps <= original_steps"),
         setup="lcm_scheduler_grid_of_2"),  # --spacing auto takes the LCM's grid of 2 steps
    Case("train_t2i.py", ["--resume"], "mv {run}/ckpt.pt", setup="corrupt_ckpt"),
    Case("train_t2i.py", ["--resume"], "--resume: no checkpoint at {run}/ckpt.pt"),
    Case("train_t2i.py", [], "{run}/ckpt.pt exists: pass --resume", setup="t2i_ckpt"),
    Case("train_t2i.py", [], "pip install -r requirements-t2i.txt", setup="missing_extra"),
]


# --- the world each case runs in -----------------------------------------------------------------


def fake_toy_checkpoint(path, stage, step, **config):
    """What the toy's preflight reads of a checkpoint: its stage, step and config."""
    torch.save({"stage": stage, "step": step, "config": dataclasses.asdict(toy_training.Config(**config))}, path)


def lcm_scheduler(pipeline, **fields):
    """PixArt-delta's scheduler config (an LCMScheduler, epsilon), as a pipeline folder holds it."""
    (pipeline / "scheduler").mkdir(exist_ok=True)
    (pipeline / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "LCMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
        "num_train_timesteps": 1000, "prediction_type": "epsilon", **fields}))


SETUPS = {
    "corrupt_pretrain": lambda run, monkeypatch: (run / "pretrain.pt").write_bytes(b"\x00" * 100),
    "corrupt_finetune": lambda run, monkeypatch: (
        fake_toy_checkpoint(run / "pretrain.pt", "pretrain", 3000), (run / "finetune-nfe2.pt").write_bytes(b"PK\x03")),
    "finished_pretrain": lambda run, monkeypatch: fake_toy_checkpoint(run / "pretrain.pt", "pretrain", 3000),
    "unfinished_finetune": lambda run, monkeypatch: (
        fake_toy_checkpoint(run / "pretrain.pt", "pretrain", 3000), fake_toy_checkpoint(run / "finetune-nfe2.pt", "finetune", 5)),
    "finished_finetune": lambda run, monkeypatch: (
        fake_toy_checkpoint(run / "pretrain.pt", "pretrain", 3000), fake_toy_checkpoint(run / "finetune-nfe2.pt", "finetune", 400)),
    "unfinished_pretrain": lambda run, monkeypatch: fake_toy_checkpoint(run / "pretrain.pt", "pretrain", 5),
    "finetune_as_pretrain": lambda run, monkeypatch: fake_toy_checkpoint(run / "pretrain.pt", "finetune", 600),
    "lcm_scheduler": lambda run, monkeypatch: lcm_scheduler(run.parent / "pipeline", original_inference_steps=50),
    "lcm_scheduler_grid_of_2": lambda run, monkeypatch: lcm_scheduler(run.parent / "pipeline", original_inference_steps=2),
    "truncated_classifier": lambda run, monkeypatch: (run / "bad-classifier.pt").write_bytes(
        toy_data.METRIC_CLASSIFIER.read_bytes()[:5000]),
    "changed_instrument": lambda run, monkeypatch: monkeypatch.setattr(toy_data, "METRIC_CLASSIFIER_SHA256", "0" * 64),
    "corrupt_ckpt": lambda run, monkeypatch: (run / "ckpt.pt").write_bytes(b"truncated"),
    "t2i_ckpt": lambda run, monkeypatch: torch.save({"step": 3}, run / "ckpt.pt"),
    "missing_extra": lambda run, monkeypatch: monkeypatch.setattr(
        t2i_training, "T2I_EXTRAS", t2i_training.T2I_EXTRAS + ("no_such_package_e2ediff",)),
}


@pytest.fixture(scope="module", autouse=True)
def warm_imports():
    """Import once what the scripts import lazily (scikit-learn's digits, the hub client, brace expansion),
    so that each case's time is the checking itself, not a first import on a busy machine."""
    import braceexpand  # noqa: F401
    import huggingface_hub  # noqa: F401
    toy_data.load_digits_data()


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A run folder, the folders the t2i flags point at (an imagefolder, a pre-computed folder, an
    evaluation set, a pipeline folder), and a working directory for flags that default to a relative path."""
    folders = {name: tmp_path / name for name in ("run", "images", "precomputed", "eval", "pipeline", "cwd")}
    for folder in folders.values():
        folder.mkdir()
    (folders["images"] / "metadata.jsonl").write_text("")
    (folders["eval"] / "metadata.jsonl").write_text("")
    (folders["precomputed"] / "meta.json").write_text('{"resolution": 64}')
    monkeypatch.chdir(folders["cwd"])
    return folders


def base_argv(script, world):
    """Flags under which the script would start work; each case adds its bad ones after them."""
    if script == "train_toy.py":
        return ["--out-dir", str(world["run"])]
    return ["--out-dir", str(world["run"]), "--data", str(world["images"]), "--pretrained", str(world["pipeline"]),
            "--resolution", "64"]


def snapshot(root):
    return {str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(root.rglob("*"))}


def resolve(text, world):
    return text.format(run=world["run"], eval=world["eval"], precomputed=world["precomputed"])


def run_in_process(case, world, monkeypatch, capsys):
    """(exit status, stdout, stderr, seconds) of the script's main() on the case."""
    main = toy_training.main if case.script == "train_toy.py" else t2i_training.main
    argv = base_argv(case.script, world) + [resolve(arg, world) for arg in case.argv]
    monkeypatch.setattr(sys, "argv", [case.script])
    capsys.readouterr()
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    seconds = time.perf_counter() - started
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err, seconds


# --- the tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_fails_at_once_in_one_line_naming_the_flag_and_touches_nothing(case, world, monkeypatch, capsys,
                                                                              tmp_path):
    if case.setup:
        SETUPS[case.setup](world["run"], monkeypatch)
    before = snapshot(tmp_path)
    status, out, err, seconds = run_in_process(case, world, monkeypatch, capsys)
    assert status == 2, (status, err)
    assert out == "" and err.count("\n") == 1 and err.startswith(f"{case.script}: error: "), err
    for expect in case.expect if isinstance(case.expect, tuple) else (case.expect,):
        assert resolve(expect, world) in err, err
    assert "Traceback" not in err and "usage:" not in err
    assert seconds < 10, f"took {seconds:.1f}s to reject"  # the late checks this replaces took 60-75 s
    assert snapshot(tmp_path) == before, "a file was created or changed"


def test_every_flag_has_a_bad_input_case():
    for script, config_class, hidden in [("train_toy.py", toy_training.Config, ("num_steps",)),
                                         ("train_t2i.py", t2i_training.Config, ())]:
        flags = {f.name for f, _, _ in train_utils.flag_fields(config_class)} - set(hidden)
        tried = {case.field for case in CASES if case.script == script}
        assert flags - tried == set(NOT_CHECKED.get(script, {})), sorted(flags - tried)


@pytest.mark.parametrize("script, config_class, rules, hidden", [
    ("train_toy.py", toy_training.Config, toy_training.RULES, ("num_steps",)), ("train_t2i.py", t2i_training.Config, t2i_training.RULES, ())])
def test_each_rule_holds_by_default_and_its_breaking_values_break_it_and_no_earlier_rule(world, script, config_class,
                                                                                      rules, hidden):
    """So that each rule's case tries that rule: the defaults keep it, its `breaking` values trip it first."""
    base = train_utils.flat_config(train_utils.parse_config(config_class, base_argv(script, world)))
    config = train_utils.make_config(config_class, **base)
    for rule in checked_rules(config_class, rules, hidden):
        assert rule.holds(config.e2e if rule in train_utils.END_TO_END_RULES else config), rule.fields
        with pytest.raises(train_utils.RuleError) as error:
            train_utils.make_config(config_class, **{**base, **rule.breaking})
        assert error.value.rule is rule


def test_the_base_flags_pass_every_check(world):
    """The cases fail because of what they add, not because of the flags they start from."""
    _, finished = toy_training.preflight(toy_training.parse_config(base_argv("train_toy.py", world)))
    assert finished is False
    t2i = train_utils.parse_config(t2i_training.Config, base_argv("train_t2i.py", world))
    assert t2i_training.preflight(t2i) is None


def test_the_guide_quotes_the_number_of_cases():
    assert f"{len(CASES)} bad-input cases" in (ROOT / "docs" / "guide.md").read_text()


@pytest.mark.parametrize("script, argv, expect", [
    ("train_toy.py", ["--finetune-lr", "nan"], "train_toy.py: error: --finetune-lr: got nan, need a finite number > 0"),
    ("train_toy.py", ["--device", "tpu"], "train_toy.py: error: --device: got 'tpu', need one of auto"),
    ("train_t2i.py", ["--data", ".", "--pretrained", MISSING], f"train_t2i.py: error: --pretrained: got '{MISSING}', "
                                                               f"which is not a folder"),
])
def test_a_real_process_prints_one_line_and_exits_2(tmp_path, script, argv, expect):
    if script == "train_t2i.py":
        (tmp_path / "metadata.jsonl").write_text("")
    completed = subprocess.run([sys.executable, str(ROOT / script), "--out-dir", str(tmp_path / "run"), *argv],
                               capture_output=True, text=True, timeout=120, cwd=tmp_path,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 2 and completed.stdout == "", completed
    assert completed.stderr.startswith(expect) and completed.stderr.count("\n") == 1, completed.stderr
    assert not (tmp_path / "run").exists()


def test_a_finished_t2i_run_resumed_does_nothing(world, capsys):
    run = world["run"]
    torch.save({"step": 5}, run / "ckpt.pt")
    (run / "transformer_ema").mkdir()
    before = snapshot(run)
    t2i_training.main(base_argv("train_t2i.py", world) + ["--resume", "--max-steps", "5"])
    assert "is finished (step 5 of --max-steps 5); nothing to do" in capsys.readouterr().out
    assert snapshot(run) == before


def command_lines() -> list[str]:
    """Every file a user runs (`if __name__ == "__main__":`): the tests' own helpers aside, but for
    tests/tiny_t2i.py, which its docstring tells a user to run."""
    def runs(path):
        folders = path.relative_to(ROOT).parts[:-1]
        user_facing = not any(folder.startswith(".") or folder == "tests" for folder in folders)
        return (user_facing or path == ROOT / "tests" / "tiny_t2i.py") and '__name__ == "__main__"' in path.read_text()
    files = [path for pattern in ("*.py", "*/*.py", "*/*/*.py") for path in ROOT.glob(pattern)]
    return sorted(path.relative_to(ROOT).as_posix() for path in files if runs(path))


def test_the_command_lines_are_found():
    found = command_lines()
    assert {"train_toy.py", "train_t2i.py", "toy2d.py", "benchmarks/quality.py", "related/dsd.py",
            "tests/tiny_t2i.py"} <= set(found)
    assert "tests/ddp_probe.py" not in found


@pytest.mark.parametrize("script", command_lines())
def test_every_command_line_answers_help_and_does_nothing_else(script, tmp_path, monkeypatch, capsys):
    """`python <script> --help` prints its usage and exits 0, before any work: nothing written where it runs,
    nor among the committed results (toy2d.py once ran its benchmark and rewrote toy2d.json)."""
    import runpy
    committed = {path: path.stat().st_mtime_ns for path in (ROOT / "benchmarks" / "results").iterdir()}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), "--help"])
    threads = torch.get_num_threads()  # some scripts set one thread before they parse
    try:
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    assert exit_.value.code in (0, None), capsys.readouterr()
    assert capsys.readouterr().out.startswith("usage:")
    assert list(tmp_path.iterdir()) == []
    assert {path: path.stat().st_mtime_ns for path in (ROOT / "benchmarks" / "results").iterdir()} == committed


def test_toy2d_refuses_an_out_folder_that_does_not_exist_before_it_trains(capsys):
    import toy2d
    with pytest.raises(SystemExit) as exit_:
        toy2d.main(["--out", f"{MISSING}/toy2d.json"])
    assert exit_.value.code == 2
    assert f"--out: got '{MISSING}/toy2d.json', whose folder does not exist" in capsys.readouterr().err
