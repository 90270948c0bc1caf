"""benchmarks/commands.py — README's two commands as a new user meets them: timed, and recorded.

Each measurement starts from a fresh clone of this repository's HEAD and a fresh venv inside it:
  command 1: `python3 -m venv .venv`, `pip install -r requirements.txt`, `python train_toy.py`;
  command 2: `bash .ci/run`, its venv (E2EDIFF_VENV) a fresh one beside the clone.
A measurement that succeeds is appended to benchmarks/results/commands.json, which README.md and
docs/guide.md render (`python benchmarks/report.py --write`); one that fails prints its log's tail and
records nothing. Run it on an idle machine (whatever else runs is in the figure), from the project's venv like
every benchmark here: a venv made from inside another is still a fresh one (its home is the base Python).

    python benchmarks/commands.py 1          # 5-20 min on 2 cores, by CPU (every run: docs/guide.md)
    python benchmarks/commands.py 2          # 12-42 min on 2 cores, by CPU
    python benchmarks/commands.py 1 2 --work /tmp/e2ediff-commands
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.cpu_settings import relative_spread
from benchmarks.report import SPREAD_COLUMNS, cpu_name
from toy_data import cross_cpu_tolerance

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "benchmarks" / "results" / "commands.json"
INSTALL = "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt"  # command 1, then:
QUICKSTART = ". .venv/bin/activate && python train_toy.py"
CI = "E2EDIFF_VENV={venv} bash .ci/run"  # command 2
# pytest's last line: "719 passed, 18 deselected, 3 warnings in 77.32s (0:01:17)"
PYTEST_SUMMARY = re.compile(r"^=*\s*(?P<counts>\d+ \w+.*?) in (?P<seconds>[\d.]+)s", re.MULTILINE)


def timed(command: str, cwd: Path, log: Path) -> float:
    """Run `command` in bash in `cwd`, its output appended to `log`; its wall seconds. A failure raises, with
    the log's tail."""
    started = time.perf_counter()
    with log.open("a") as out:
        result = subprocess.run(["bash", "-c", f"set -euo pipefail; {command}"], cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT)
    if result.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"`{command}` exited {result.returncode} in {cwd}; nothing recorded. Its log's end "
                           f"({log}):\n{tail}")
    return time.perf_counter() - started


def quickstart_stages(out: Path) -> dict:
    """From the quickstart's metrics.jsonl: seconds of pretraining and of the fine-tunes (all NFEs together),
    and pretraining's steps per second (this machine's speed, which varies from day to day)."""
    last = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "seconds" in row:
            last[row["stage"]] = row
    return {"pretrain_s": round(last["pretrain"]["seconds"], 1),
            "finetune_s": round(sum(row["seconds"] for stage, row in last.items() if stage.startswith("finetune")), 1),
            "pretrain_steps_per_s": last["pretrain"]["steps_per_second"]}


def same_but_wall_time(results: dict, committed: dict) -> bool:
    """Whether the run's results.json equals the committed quickstart.json in every field but `wall_s` (its
    table, the config, the metric's checksum): the quickstart's numbers came out the same on this machine."""
    return {**results, "wall_s": None} == {**committed, "wall_s": None}


def largest_differences(results: dict, committed: dict) -> dict:
    """Per column of the quickstart table, the largest relative difference between the run's rows and the
    committed quickstart.json's (0.0 where every row is identical): what another CPU changed. Measured as
    spread.py measures the tolerance it is held to (`relative_spread` of the two values)."""
    keys = [(row["model"], row["nfe"]) for row in committed["rows"]]
    if [(row["model"], row["nfe"]) for row in results["rows"]] != keys:
        raise RuntimeError(f"the run's table has other rows than quickstart.json's {keys}; nothing recorded")
    columns = [key for key, value in committed["rows"][0].items() if isinstance(value, float)]
    return {column: max(relative_spread([ours[column], theirs[column]])
                        for ours, theirs in zip(results["rows"], committed["rows"]))
            for column in columns}


def within_training_spread(differences: dict) -> bool:
    """Whether each column spread.json measured differs from the committed table by no more than the spread
    of the quickstart trained again under the CPU settings (`toy_data.cross_cpu_tolerance`, training phase)."""
    return all(differences[column] <= cross_cpu_tolerance(column, "training") for column in SPREAD_COLUMNS)


def pytest_tiers(log: str) -> list[dict]:
    """The default and the slow tier's summary lines, in the order .ci/run runs them."""
    tiers = [{"counts": match["counts"], "seconds": round(float(match["seconds"]), 1)}
             for match in PYTEST_SUMMARY.finditer(log)]
    if len(tiers) != 2 or any(re.search(r"\d+ (failed|error)", tier["counts"]) for tier in tiers):
        raise RuntimeError(f"expected two green pytest summaries in .ci/run's log, found: {tiers}")
    return [dict(tier, name=name) for tier, name in zip(tiers, ("default", "slow"))]


def measure(number: int, work: Path) -> dict:
    """Clone HEAD into `work`, run command `number` there, and return its record."""
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=work, check=True, capture_output=True,
                            text=True).stdout.strip()
    log = work / "command.log"
    record = {"command": number, "date": datetime.date.today().isoformat(), "commit": commit,
              "cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
              "source": "benchmarks/commands.py"}
    if number == 1:
        install = timed(INSTALL, work, log)
        run = timed(QUICKSTART, work, log)
        results = json.loads((work / "runs" / "toy-digits" / "results.json").read_text())
        committed = json.loads((work / "benchmarks" / "results" / "quickstart.json").read_text())
        differences = largest_differences(results, committed)
        record.update(install_s=round(install, 1), run_s=round(run, 1), total_s=round(install + run, 1),
                      finetune_steps=results["config"]["finetune_steps"], threads=results["threads"],
                      **quickstart_stages(work / "runs" / "toy-digits"),
                      same_as_committed=same_but_wall_time(results, committed),
                      largest_relative_difference=differences,
                      within_training_spread=within_training_spread(differences))
    else:
        venv = work.with_name(work.name + "-venv")
        shutil.rmtree(venv, ignore_errors=True)
        total = timed(CI.format(venv=venv), work, log)
        record.update(total_s=round(total, 1), tiers=pytest_tiers(log.read_text()))
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("commands", nargs="+", type=int, choices=(1, 2), help="which of README's commands")
    parser.add_argument("--work", type=Path, default=Path("/tmp/e2ediff-commands"),
                        help="where the fresh clones go (emptied first)")
    args = parser.parse_args(argv)
    for number in args.commands:
        try:
            record = measure(number, args.work / f"command{number}")
        except (RuntimeError, subprocess.CalledProcessError) as error:
            print(f"commands.py: command {number}: {error}", file=sys.stderr)
            return 1
        runs = json.loads(RECORD.read_text())["runs"] if RECORD.is_file() else []
        RECORD.write_text(json.dumps({"runs": [*runs, record]}, indent=1) + "\n")
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
