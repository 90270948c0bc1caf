"""benchmarks/spread.py — how far the quickstart's numbers move from one CPU to another, measured on one machine.

A CPU changes the numbers through the kernels that PyTorch, oneDNN and MKL pick for it, and through the
thread count; benchmarks/cpu_settings.py switches each on one machine (SETTINGS). Two measurements, each a
subprocess per setting:

- evaluation: the quickstart's own evaluation (`train_toy.py --stage eval`) of one set of trained models,
  the quickstart's (runs/toy-digits, trained first with plain `python train_toy.py` when it is missing):
  how far the table moves when only the evaluation runs on another CPU — what the fixed metric
  instrument (toy_data.METRIC_CLASSIFIER) is for;
- training: the whole quickstart at a reduced budget (REDUCED) under each setting: how far training drifts.

With --gan, a third measurement of its own (spread-gan.json): the quickstart trained again at a reduced
budget with the critic study's adversarial term (GAN_BUDGET: benchmarks/quality.py's PatchGAN term, warmed up,
two critic updates per step, and the perceptual loss), under each setting, the critic's held-out AUCs included:
how far the numbers of an adversarial fine-tune move to another CPU.

Every table column's spread is (max - min) / max |value| over the settings, per row (0 when all are 0). The goal (issue 31):
every CFD of the evaluation within GOAL (0.1 %).

    python benchmarks/spread.py            # ~15 min on 2 cores, plus the quickstart when runs/toy-digits lacks it
    python benchmarks/spread.py --quick    # smoke: tiny budgets, two settings -> benchmarks/results/spread-quick.json
    python benchmarks/spread.py --gan      # the adversarial fine-tune under each setting (~15 min) -> spread-gan.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.cpu_settings import SETTINGS, entry, environment, machine, quick_settings
from benchmarks.report import write_results

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("cfd", "pixel_energy", "precision", "recall")
GOAL = 1e-3  # relative spread of every CFD of the evaluation across SETTINGS

REDUCED = ["--pretrain-steps", "400", "--finetune-steps", "60"]  # the training measurement's budget (~1 min a run)
# quality.py's critic term (CRITIC_TERM: gan_weight 0.1, 200 critic-only steps, 2 critic updates per step) on the
# quickstart's inversion coupling with L2 + LPIPS, 200 generator steps after the warm-up
GAN_TERM = ["--nfe", "4", "--base-nfe", "4", "--lpips-weight", "1.0", "--gan-weight", "0.1"]
GAN_BUDGET = ["--pretrain-steps", "400", "--finetune-steps", "400", *GAN_TERM, "--critic-warmup-steps", "200", "--disc-steps", "2"]
GAN_QUICK = ["--pretrain-steps", "20", "--finetune-steps", "6", *GAN_TERM, "--critic-warmup-steps", "2", "--disc-steps", "2",
             "--eval-samples", "200"]
GAN_COLUMNS = (*COLUMNS, "critic_auc_warmup", "critic_auc")
QUICK = ["--pretrain-steps", "20", "--finetune-steps", "3", "--nfe", "1", "--base-nfe", "1,2", "--eval-samples", "200"]


def train_toy(args: list[str], env: dict, log: Path) -> None:
    """Run train_toy.py with `args`; its output goes to `log`; a failure ends the benchmark with the log's tail."""
    with open(log, "a") as out:
        completed = subprocess.run([sys.executable, str(ROOT / "train_toy.py"), *args], cwd=ROOT, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    if completed.returncode != 0:
        sys.exit(f"train_toy.py {' '.join(args)} failed ({completed.returncode}):\n{log.read_text()[-3000:]}")


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def train_under_each(settings: dict, budget: list[str], work: Path, log: Path, start: float, what: str) -> dict:
    """train_toy.py with `budget` once under each setting, in a folder of its own under `work`: setting -> results."""
    runs = {}
    for name, setting in settings.items():
        folder = work / f"train-{len(runs)}"
        train_toy(["--out-dir", str(folder), *budget], environment(setting), log)
        runs[name] = results(folder)
        print(f"[{time.time() - start:.0f}s] {what} under {name}: " + ", ".join(
            f"CFD {row['cfd']:.6g}" + (f", AUC {row['critic_auc']:.4g}" if row.get("critic_auc") is not None else "")
            for row in runs[name]["rows"]), flush=True)
    return runs


def spread(runs: dict[str, dict], columns: tuple = COLUMNS) -> dict:
    """Per row "model@nfe" and column (where the row has it): the values under each setting, and (max - min) / max |value|."""
    table = {}
    for setting, record in runs.items():
        for row in record["rows"]:
            for column in columns:
                if row.get(column) is not None:
                    table.setdefault(f"{row['model']}@{row['nfe'] or '-'}", {}).setdefault(column, {})[setting] = row[column]
    return {row: {column: entry(values) for column, values in columns.items()} for row, columns in table.items()}


def largest(spreads: dict, column: str) -> float:
    return max(entry[column]["relative"] for entry in spreads.values() if column in entry)


def gan_spread(args, settings: dict, start: float) -> None:
    """--gan: the adversarial fine-tune (GAN_BUDGET) trained under each setting -> spread-gan[-quick].json."""
    budget = GAN_QUICK if args.quick else GAN_BUDGET
    with tempfile.TemporaryDirectory(prefix="spread-gan-") as work:
        runs = train_under_each(settings, budget, Path(work), Path(work) / "train_toy.log", start, "adversarial fine-tune")
    measured = spread(runs, GAN_COLUMNS)
    record = {"mode": "quick" if args.quick else "full", "settings": settings, "training_budget": budget,
              "machine": machine(), "training_gan": measured}
    headline = {f"training_gan/{column}_max_relative": largest(measured, column) for column in GAN_COLUMNS}
    write_results(args.out, "spread-gan-quick" if args.quick else "spread-gan", record, headline, start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets and two settings (a smoke test)")
    parser.add_argument("--run", default=str(ROOT / "runs" / "toy-digits"),
                        help="the quickstart's run folder to evaluate (trained there first when unfinished)")
    parser.add_argument("--gan", action="store_true", help="only the adversarial fine-tune under each setting")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the JSON")
    args = parser.parse_args(argv)
    start = time.time()
    settings = quick_settings() if args.quick else SETTINGS
    if args.gan:
        return gan_spread(args, settings, start)
    budget = QUICK if args.quick else []
    with tempfile.TemporaryDirectory(prefix="spread-") as work:
        work, log = Path(work), Path(work) / "train_toy.log"
        run = work / "quick-run" if args.quick else Path(args.run)
        print(f"[{time.time() - start:.0f}s] the models to evaluate: {run} (the quickstart, trained if unfinished)")
        train_toy(["--out-dir", str(run), "--resume", *budget], environment({}), log)
        evaluation = {}
        for name, setting in settings.items():
            folder = work / f"eval-{len(evaluation)}"
            folder.mkdir()
            for checkpoint in run.glob("*.pt"):
                shutil.copy(checkpoint, folder / checkpoint.name)
            train_toy(["--stage", "eval", "--out-dir", str(folder), *budget], environment(setting), log)
            evaluation[name] = results(folder)
            print(f"[{time.time() - start:.0f}s] evaluation under {name}: CFD "
                  + ", ".join(f"{row['cfd']:.6g}" for row in evaluation[name]["rows"]), flush=True)
        training = train_under_each(settings, budget or REDUCED, work, log, start, "training")
    measured = {"evaluation": spread(evaluation), "training": spread(training)}
    record = {
        "mode": "quick" if args.quick else "full", "settings": settings, "goal_relative_cfd": GOAL,
        "evaluated_run": {"config": evaluation[next(iter(settings))]["config"],
                          "metric_classifier": evaluation[next(iter(settings))]["metric_classifier"]},
        "training_budget": budget or REDUCED, "machine": machine(),
        **measured,
    }
    headline = {f"{phase}/{column}_max_relative": largest(measured[phase], column)
                for phase in measured for column in COLUMNS}
    headline["evaluation/cfd_goal_met"] = headline["evaluation/cfd_max_relative"] <= GOAL
    write_results(args.out, "spread-quick" if args.quick else "spread", record, headline, start)


if __name__ == "__main__":
    main()
