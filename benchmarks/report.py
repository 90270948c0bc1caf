"""benchmarks/report.py — the benchmarks' output contract, and every results table rendered from it.

A benchmark writes its record with `write_results` (benchmarks/results/<name>.json) and prints its
headline last. In the documents, a results table is not typed by hand: it sits in a block whose content
is exactly what the renderer of that name makes of a committed JSON file:

    <!-- report:NAME -->
    ...the output of RENDERERS[NAME]...
    <!-- /report:NAME -->

    python benchmarks/report.py --check             # exit 1, naming every block that differs from its rendering
    python benchmarks/report.py --write             # rewrite every block in README.md, docs/guide.md, benchmarks/README.md, related/README.md
    python benchmarks/report.py --check related/README.md   # only these files

To add a table: write a function `record -> markdown` below, register it in RENDERERS with the results
file it reads, put an empty block with its name in a document, and run --write. tests/test_report.py
fails when a block is stale or names no renderer.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCUMENTS = ("README.md", "docs/guide.md", "benchmarks/README.md", "related/README.md")  # relative to ROOT


def headline_line(headline: dict) -> str:
    """The headline as the benchmarks print it last: one JSON object, numbers rounded to 4 decimals (a sweep's
    chosen value may also be a string or a bool)."""
    return json.dumps({key: value if value is None or isinstance(value, (str, bool)) else round(value, 4)
                       for key, value in headline.items()})


# A row label the benchmarks write and the renderers key on: the untrained LCM sampled by deterministic DDIM on
# its grid, the start of every `--lcm-update ddim` fine-tune (benchmarks/quality.py makes it a row of every base).
LCM_DDIM = "LCM through DDIM"


def has_critic(recipe: dict) -> bool:
    """Whether a recorded recipe ({"fields", "why"}) trains with a GAN term, either critic: its fields say so."""
    return recipe["fields"].get("gan_weight", 0) > 0


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (the platform's name where there is none), for a record."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def write_results(out: str, name: str, record: dict, headline: dict, start: float) -> None:
    """Write <out>/<name>.json (record + headline + wall time; the folder made if missing) and print the headline
    JSON last."""
    record = {**record, "headline": headline, "wall_seconds": time.time() - start}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"wall time {record['wall_seconds']:.0f}s; wrote {os.path.join(out, name)}.json/.png")
    print(headline_line(headline))


# ----------------------------------------------------------------------------------------------
# Number formatting: three significant digits, never an exponent, thousands separated.


def decimals(magnitude: float, digits: int = 3) -> int:
    """Decimal places that show `digits` significant digits of a number of this size (0 from 10**(digits-1) up)."""
    if magnitude == 0 or not math.isfinite(magnitude):
        return digits - 1
    return max(0, digits - 1 - math.floor(math.log10(abs(magnitude))))


def number(value) -> str:
    """One measured value: integers (counts) exactly, floats to three significant digits, none as '–'."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{decimals(value)}f}"


def mean_std(mean: float, std: float) -> str:
    """'mean ± std', both to the same decimals: the std to one significant digit (two when it starts with
    a 1), the larger of the two to at least three, the mean to at most four."""
    if math.isnan(mean):
        return "–"
    std_digits = 2 if std > 0 and f"{std:e}".startswith("1") else 1
    places = max(decimals(std, std_digits), decimals(max(abs(mean), std)))
    if mean:
        places = min(places, decimals(mean, 4))
    return f"{mean:,.{places}f} ± {std:,.{places}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def bold_lowest(rows: list[list[str]], means: list[list[float]]) -> list[list[str]]:
    """Rows with, in each column, the cell of the lowest mean in bold (lower is better)."""
    rows = [list(row) for row in rows]
    for column in range(len(means[0])):
        best = min(range(len(means)), key=lambda i: means[i][column])
        rows[best][column] = f"**{rows[best][column]}**"
    return rows


def headline_block(record: dict) -> str:
    """The run's last line, as a JSON code block."""
    return f"```json\n{headline_line(record['headline'])}\n```"


# ----------------------------------------------------------------------------------------------
# quickstart.json: a verbatim copy of the results.json that `python train_toy.py` writes
# ({"config": the resolved TrainConfig, "rows": [{model, nfe, cfd, pixel_energy, precision, recall}]}).

LOSS_NAMES = {"l1_weight": "L1", "l2_weight": "L2", "lpips_weight": "perceptual", "gan_weight": "GAN"}


def quickstart_table(record: dict) -> str:
    """The quickstart's evaluation table, and the run it came from in one line."""
    rows, config = record["rows"], record["config"]
    with_fid = any("inception_fid" in row for row in rows)
    header = ["model", "NFE", "CFD ↓", "pixel energy ↓", "precision ↑", "recall ↑"] + ["Inception FID ↓"] * with_fid
    body = [[row["model"], number(row["nfe"]), number(row["cfd"]), number(row["pixel_energy"]),
             number(row["precision"]), number(row["recall"])] + [number(row.get("inception_fid"))] * with_fid
            for row in rows]
    e2e = config["e2e"]
    loss = " + ".join(name if e2e[key] == 1 else f"{e2e[key]:g}·{name}" for key, name in LOSS_NAMES.items() if e2e[key])
    return (table(header, body) + f"\n\n`benchmarks/results/quickstart.json`: {config['dataset']}, {config['base']} base "
            f"pretrained {config['pretrain_steps']:,} steps, fine-tuned {config['finetune_steps']:,} steps per NFE "
            f"({e2e['coupling']} coupling, {loss}), {config['eval_samples']:,} samples per row, seed {config['seed']}.")


# commands.json (benchmarks/commands.py): README's two commands, timed from a fresh clone and a fresh venv.

def runs_of(record: dict, command: int) -> list[dict]:
    """The recorded runs of README's command 1 or 2, oldest first."""
    return [run for run in record["runs"] if run["command"] == command]


def minutes(seconds: float) -> str:
    """'13 min 3 s'."""
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60} s"


def projected(run: dict, steps: int) -> float | None:
    """Command 1 at this run's stage speeds with `steps` fine-tune steps per NFE: pip, pretraining and the other
    stages as this run measured them, its fine-tunes scaled by steps / its own; None without its stage times."""
    if "finetune_s" not in run:
        return None
    return run["total_s"] + run["finetune_s"] * (steps / run["finetune_steps"] - 1)


def measured_by(run: dict) -> str:
    """The commit a run measured, or (a run transcribed from a script's printed output) the one that reported it."""
    return f"`{run['commit']}`" if "commit" in run else f"`{run['reported_in']}` (transcribed)"


def commands_readme(record: dict) -> str:
    """README's line beside the two commands: the latest run of each, the range over the runs of the quickstart
    as it is, and command 1 at the slowest stage speeds measured."""
    first, second = runs_of(record, 1), runs_of(record, 2)
    latest, steps = first[-1], first[-1]["finetune_steps"]
    now = [run["total_s"] for run in first if run["finetune_steps"] == steps]
    slowest = max((value for value in (projected(run, steps) for run in first) if value is not None), default=None)
    tiers = {tier["name"]: tier["seconds"] for tier in second[-1]["tiers"]}
    totals = [run["total_s"] for run in second]
    return (f"Measured from a fresh clone and a fresh venv on 2 cores (`python benchmarks/commands.py 1 2`; every run "
            f"in [docs/guide.md](docs/guide.md#how-long-the-two-commands-take)): command 1 took {latest['total_s']:,.0f} s "
            f"on {latest['date']}{' on an ' + latest['cpu'] if 'cpu' in latest else ''} (pip {latest['install_s']:,.0f} s, the run {latest['run_s']:,.0f} s)"
            + (f", {min(now):,.0f}–{max(now):,.0f} s over the {len(now)} runs of the quickstart as it is" if len(now) > 1
               else "")
            + (f", ≈ {slowest:,.0f} s at the stage speeds of the slowest run measured" if slowest else "")
            + f"; command 2 took {minutes(totals[-1])} (default tier {tiers['default']:,.0f} s, slow tier "
            f"{tiers['slow']:,.0f} s)"
            + (f", {minutes(min(totals))} to {minutes(max(totals))} over {len(totals)} runs" if len(totals) > 1 else "")
            + ".")


def tier_cell(tier: dict) -> str:
    """'719 passed in 80 s' from a pytest tier's summary (its counts were not always recorded)."""
    passed = tier["counts"] and ", ".join(re.findall(r"\d+ (?:passed|failed|errors?)", tier["counts"]))
    return f"{passed} in {tier['seconds']:,.0f} s" if passed else f"{tier['seconds']:,.0f} s"


def commands_tables(record: dict) -> str:
    """Every recorded run of each command."""
    steps = runs_of(record, 1)[-1]["finetune_steps"]
    first = []
    for run in runs_of(record, 1):
        scaled = projected(run, steps)
        first.append([run["date"], measured_by(run), number(run["finetune_steps"]), f"{run['install_s']:,.0f} s",
                      f"{run['run_s']:,.0f} s", f"{run['total_s']:,.0f} s",
                      "–" if "pretrain_s" not in run
                      else f"{run['pretrain_s']:,.0f} s ({run['pretrain_steps_per_s']:g} steps/s)",
                      "–" if "finetune_s" not in run else f"{run['finetune_s']:,.0f} s",
                      "–" if scaled is None else f"{scaled:,.0f} s",
                      same_as_committed(run), run.get("cpu", "–")])
    second = [[run["date"], measured_by(run), *(tier_cell(tier) for tier in run["tiers"]), minutes(run["total_s"]),
               run.get("cpu", "–")] for run in runs_of(record, 2)]
    return ("Command 1:\n\n" + table(["date", "commit", "fine-tune steps per NFE", "pip", "the run", "in all",
                                      "pretraining", "the fine-tunes", f"in all, at {steps:,} fine-tune steps",
                                      "results.json = quickstart.json", "CPU"], first)
            + "\n\nCommand 2 (`.ci/run`):\n\n" + table(["date", "commit", "default tier", "slow tier", "in all", "CPU"],
                                                          second))


def same_as_committed(run: dict) -> str:
    """Whether command 1's table came out as committed: 'yes' (identical), or its largest relative CFD difference
    and whether every column stayed within the training spread spread.py measured across CPU settings."""
    if "largest_relative_difference" not in run or run["same_as_committed"]:
        return {True: "yes", False: "**no**", None: "–"}[run.get("same_as_committed")]
    cfd = run["largest_relative_difference"]["cfd"]
    return (f"within the CPU spread (CFD {cfd:.1e})" if run["within_training_spread"]
            else f"**no**: beyond the CPU spread (CFD {cfd:.1e})")


def commands_cpus(record: dict) -> str:
    """Command 1's runs whose table differed from the committed one: how far, column by column."""
    rows = [[run["date"], measured_by(run), run.get("cpu", "–"),
             *(relative(run["largest_relative_difference"][column]) for column in SPREAD_COLUMNS),
             "yes" if run["within_training_spread"] else "**no**"]
            for run in runs_of(record, 1) if "largest_relative_difference" in run]
    same = sum(run.get("same_as_committed") is True for run in runs_of(record, 1))
    return (table(["date", "commit", "CPU", *SPREAD_COLUMNS.values(), "within the training spread"], rows)
            + f"\n\nLargest relative difference from the committed table over its rows (`benchmarks/results/commands.json`); "
              f"{same} other runs of command 1 reproduced it exactly.")


# spread.json (benchmarks/spread.py): the quickstart's columns under each CPU setting, and their spread.

SPREAD_COLUMNS = {"cfd": "CFD", "pixel_energy": "pixel energy", "precision": "precision", "recall": "recall"}


def relative(value: float) -> str:
    """A relative spread: 0 exactly as 0, else two significant digits in scientific notation."""
    return "0" if value == 0 else f"{value:.1e}"


def value_range(entry: dict) -> str:
    """'min–max' of a quantity measured under several settings (benchmarks/cpu_settings.py's entry)."""
    values = entry["values"].values()
    return f"{number(min(values))}–{number(max(values))}"


def settings_caption(record: dict) -> str:
    """'Settings: ...; Machine: ...' of a record measured under benchmarks/cpu_settings.py's settings."""
    def setting(name, env):
        variables = " ".join(f"{key}={value}" for key, value in env.items())
        return name if not env or variables in name else f"{name} (`{variables}`)"

    machine = record["machine"]
    return ("Settings: " + "; ".join(setting(name, env) for name, env in record["settings"].items())
            + f". Machine: {machine['cpu']}, torch {machine['torch']}.")


def spread_table(record: dict) -> str:
    """Per phase (evaluation of the same models; the whole quickstart trained again at a reduced budget) and
    row: the largest relative spread of each column across the CPU settings, and the goal's verdict."""
    parts = []
    for phase, title in (("evaluation", "the quickstart's models, evaluated under each setting"),
                         ("training", "the quickstart trained again under each setting, at a reduced budget ("
                          + " ".join(record["training_budget"]) + ")")):
        rows = [[row.replace("@-", "").replace("@", ", NFE "),
                 *(relative(columns[column]["relative"]) for column in SPREAD_COLUMNS)]
                for row, columns in record[phase].items()]
        parts.append(f"**{phase}**: {title}; (max − min) / max over the settings:\n\n"
                     + table(["row", *SPREAD_COLUMNS.values()], rows))
    largest = record["headline"]["evaluation/cfd_max_relative"]
    verdict = "met" if largest <= record["goal_relative_cfd"] else "**missed**"
    return (settings_caption(record) + "\n\n" + "\n\n".join(parts)
            + f"\n\nGoal: every CFD of the evaluation within {record['goal_relative_cfd']:.1%} across the settings: "
              f"largest {largest:.1e}, {verdict}. `python benchmarks/spread.py`: {record['wall_seconds']:.0f} s.")


def spread_gan(record: dict) -> str:
    """spread-gan.json: per row, each column's relative spread across the CPU settings, and the E2E row's
    range of CFD and critic AUC."""
    columns = {**SPREAD_COLUMNS, "critic_auc_warmup": "critic AUC after warm-up", "critic_auc": "critic AUC at the end"}
    rows = [[row.replace("@-", "").replace("@", ", NFE "),
             *(relative(cells[column]["relative"]) if column in cells else "–" for column in columns)]
            for row, cells in record["training_gan"].items()]
    student = next(cells for row, cells in record["training_gan"].items() if "critic_auc" in cells)
    return (settings_caption(record) + " The quickstart trained under each setting with the adversarial term ("
            + " ".join(record["training_budget"]) + "); (max − min) / max over the settings:\n\n"
            + table(["row", *columns.values()], rows)
            + f"\n\nThe fine-tuned student's CFD ranges over {value_range(student['cfd'])}, its critic's final AUC over "
              f"{value_range(student['critic_auc'])}. `python benchmarks/spread.py --gan`: {record['wall_seconds']:.0f} s.")


def spread_summary(record: dict) -> str:
    """README's lines: per column, the largest relative spread across the CPU settings, per phase, and the goal."""
    rows = [[name, *(relative(record["headline"][f"{phase}/{column}_max_relative"]) for phase in ("evaluation", "training"))]
            for column, name in SPREAD_COLUMNS.items()]
    largest = record["headline"]["evaluation/cfd_max_relative"]
    return (table(["column", "evaluation of the same models", "training again (reduced budget)"], rows)
            + f"\n\nLargest relative spread over {len(record['settings'])} CPU settings (threads, ATEN_CPU_CAPABILITY, "
              f"DNNL_MAX_CPU_ISA, MKL_CBWR, all capped at AVX2). Goal: every CFD of the evaluation within "
              f"{record['goal_relative_cfd']:.1%}: {'met' if largest <= record['goal_relative_cfd'] else '**missed**'}.")


# ----------------------------------------------------------------------------------------------
# cost.json (benchmarks/cost.py): medians of interleaved repeats; memory probes in fresh processes.


def cost_table(record: dict) -> str:
    """Time, peak memory, held activations and page faults of one training step, per T."""
    seconds, memory, memory_mmap = record["median_seconds"], record["memory"], record["memory_mmap"]
    steps = sorted(int(key.removeprefix("plain_T")) for key in seconds if key.startswith("plain_T"))
    trained = ("plain", "ckpt", "sel")

    def mib(probes, mode, k, what):
        return number(probes[f"{mode}_T{k}"][what] / 2**20)

    header = ["T", "plain (s)", "ckpt (s)", "sel (s)", "trunc K=1 (s)", "floor (s)", "plain/floor", "ckpt/floor",
              "sel/floor", "peak MiB plain", "peak MiB ckpt", "peak MiB sel", "peak MiB ckpt, mmap", "peak MiB sel, mmap",
              "held MiB plain", "held MiB ckpt", "held MiB sel", "faults plain", "faults floor"]
    rows = [[str(k), *(number(seconds[f"{mode}_T{k}"]) for mode in (*trained, "trunc", "floor")),
             *(number(seconds[f"{mode}_T{k}"] / seconds[f"floor_T{k}"]) for mode in trained),
             *(mib(memory, mode, k, "peak_bytes") for mode in trained),
             mib(memory_mmap, "ckpt", k, "peak_bytes"), mib(memory_mmap, "sel", k, "peak_bytes"),
             *(mib(memory, mode, k, "held_bytes") for mode in trained),
             number(seconds[f"faults_plain_T{k}"]), number(seconds[f"faults_floor_T{k}"])] for k in steps]
    channels, height, width = record["image_shape"]
    return (f"{record['params'] / 1e6:.2f}M-parameter UNet, {height}×{width}×{channels}, batch {record['batch']}, "
            f"device {record['device']}, {record['threads']} threads, medians of {record['repeats']} interleaved repeats; "
            f"wall time {record['wall_seconds']:,.0f} s.\n\n" + table(header, rows))


# What each way of paying for the T-step graph keeps for the backward pass (scale.py's names; cost.py's below).
CHECKPOINT_KEEPS = {
    "plain": "everything autograd saves, for all T steps",
    "step": "each step's input; the whole step is recomputed in backward",
    "blocks": "each step's and each transformer / VAE-decoder block's input; every block recomputed",
    "selective": "the outputs of matmuls, convolutions and attention of all T steps; norms, activations and "
                 "elementwise ops recomputed",
    "truncated": "the last step's saved tensors (the T − 1 earlier steps run without a graph and get no gradient)",
}
CHECKPOINT_KEEPS.update(ckpt=CHECKPOINT_KEEPS["step"], sel=CHECKPOINT_KEEPS["selective"], trunc=CHECKPOINT_KEEPS["truncated"])


def cost_frontier(record: dict) -> str:
    """At T = 4: time against four single steps, held activations against one plain step (T = 1)."""
    seconds, memory, mmap = record["median_seconds"], record["memory"], record["memory_mmap"]
    plain_held = memory["plain_T1"]["held_bytes"]
    rows = [[mode, CHECKPOINT_KEEPS[mode], number(seconds[f"{mode}_T4"] / seconds["floor_T4"]),
             number(memory[f"{mode}_T4"]["held_bytes"] / plain_held), number(mmap[f"{mode}_T4"]["peak_bytes"] / 2**20)
             if mmap else "–"] for mode in ("plain", "sel", "ckpt", "trunc")]
    return table(["T = 4", "keeps for backward", "time / 4 single steps", "held / one plain step (T = 1)",
                  "peak MiB, mmap"], rows)


# ----------------------------------------------------------------------------------------------
# scale.json (benchmarks/scale.py): counts on the meta device for PixArt-XL-2 + SD VAE + LPIPS.

def flags_cell(flags: str) -> str:
    """A mode's flags as code, a trailing "(default)" outside it."""
    code = flags.removesuffix(" (default)")
    return f"`{code}`" + (" (default)" if code != flags else "")


SCALE_MODE_NAMES = {"plain": "plain", "step": "per step", "blocks": "per step + per block", "truncated": "truncated K = 1",
                    "selective": "selective"}


def scale_paper(record: dict) -> str:
    """The paper's setting per checkpointing mode: memory per GPU, the largest batch, seconds per step."""
    paper, gpus = record["paper"], list(record["gpus"])
    budgets = list(next(iter(record["paper_setting"].values()))["largest_batch"])
    rows = []
    for mode, flags in record["modes"].items():
        row, encoded = record["paper_setting"][f"precomputed/{mode}"], record["paper_setting"][f"encoded/{mode}"]
        rows.append([f"{SCALE_MODE_NAMES[mode]} ({flags_cell(flags)})", number(row["peak_bytes_batch1"] / 1e9),
                     number(row["peak_bytes"] / 1e9), number(encoded["peak_bytes"] / 1e9),
                     " / ".join(str(row["largest_batch"][gb]) for gb in budgets), number(row["flops"] / 1e12),
                     *(number(row["seconds"][gpu]) for gpu in gpus), number(encoded["seconds"][gpus[0]])])
    header = ["checkpointing", "GB, batch 1", f"GB, batch {paper['batch']}", f"GB, batch {paper['batch']}, T5 + VAE encoder in the step",
              f"largest batch in {' / '.join(budgets)} GB", "TFLOPs / step", *(f"s / step, {gpu}" for gpu in gpus),
              f"s / step, {gpus[0]}, T5 + VAE encoder"]
    return (f"Computed, not measured: PixArt-XL-2 ({record['params']['transformer'] / 1e6:.0f}M) at {paper['resolution']}², "
            f"T = {paper['num_steps']}, L2 + LPIPS, batch {paper['batch']} per GPU, bf16 autocast, "
            f"{paper['gpus']} GPUs (DDP); memory per GPU without the CUDA context and allocator slack; seconds at "
            f"{record['mfu']:.0%} of each GPU's dense bf16 peak (an assumption). Text and latents pre-computed unless "
            "the column says otherwise.\n\n" + table(header, rows))


def scale_readme(record: dict) -> str:
    """The paper's setting on an A100-80GB per checkpointing flag, in two rows: memory, seconds."""
    paper, rows = record["paper"], record["paper_setting"]
    gpu = next(name for name, spec in record["gpus"].items() if spec["memory_gb"] == 80)
    modes = list(record["modes"])
    memory = [f"{number(rows[f'precomputed/{m}']['peak_bytes'] / 1e9)} ({rows[f'precomputed/{m}']['largest_batch']['80']})"
              for m in modes]
    seconds = [number(rows[f"precomputed/{m}"]["seconds"][gpu]) for m in modes]
    return table([f"{paper['resolution']}², T = {paper['num_steps']}, L2 + LPIPS, batch {paper['batch']}, text pre-computed",
                  *(flags_cell(record["modes"][m]) for m in modes)],
                 [["GB per GPU (largest batch in 80 GB)", *memory],
                  [f"s / step at {record['mfu']:.0%} MFU", *seconds]])


def scale_grid(record: dict) -> str:
    """Held and peak GB per GPU at batch 1 for every (resolution, loss, mode), against T."""
    grid = record["grid"]
    steps = sorted({int(key.split("/")[2][1:]) for key in grid})
    resolutions = sorted({int(key.split("/")[3]) for key in grid})
    rows = []
    for resolution in resolutions:
        for loss in ("l2", "l2+lpips"):
            for mode in record["modes"]:
                cells = [grid[f"{loss}/{mode}/T{k}/{resolution}"] for k in steps]
                rows.append([f"{resolution}²", "L2" if loss == "l2" else "L2 + LPIPS", SCALE_MODE_NAMES[mode],
                             *(number(c["held_bytes"] / 1e9) for c in cells), *(number(c["peak_bytes"] / 1e9) for c in cells),
                             *(number(c["flops"] / 1e12) for c in cells)])
    header = ["resolution", "loss", "checkpointing", *(f"held GB, T={k}" for k in steps),
              *(f"step peak GB, T={k}" for k in steps), *(f"TFLOPs, T={k}" for k in steps)]
    return ("Batch 1; \"held\": activations the forward leaves for backward; \"step peak\": the most bytes the step's own "
            "tensors (activations, recomputation, gradients, AdamW temporaries) occupy at once — add the static memory "
            "below for a GPU's total.\n\n" + table(header, rows))


def scale_static(record: dict) -> str:
    """Static memory per GPU in the paper's setting, with and without pre-computed text and latents."""
    parts = record["paper_setting"]["encoded/step"]["static_bytes"]
    precomputed = record["paper_setting"]["precomputed/step"]["static_bytes"]
    rows = [[name, number(value / 1e9), "yes" if name in precomputed else "no"] for name, value in parts.items()]
    rows.append(["total", number(sum(parts.values()) / 1e9), number(sum(precomputed.values()) / 1e9) + " GB"])
    return table(["part", "GB", "with --precompute-to"], rows)


def scale_frontier(record: dict) -> str:
    """The paper's setting per checkpointing mode at batch 1: FLOPs against plain, held and peak GB."""
    paper, grid = record["paper"], record["grid"]
    key = "{}/{}/T{}/{}".format("l2+lpips", "{}", paper["num_steps"], paper["resolution"])
    plain = grid[key.format("plain")]
    rows = [[SCALE_MODE_NAMES[mode], CHECKPOINT_KEEPS[mode], number(grid[key.format(mode)]["flops"] / plain["flops"]),
             number(grid[key.format(mode)]["held_bytes"] / 1e9), number(grid[key.format(mode)]["peak_bytes"] / 1e9)]
            for mode in record["modes"]]
    return (f"PixArt-XL-2, {paper['resolution']}², T = {paper['num_steps']}, L2 + LPIPS, batch 1:\n\n"
            + table(["checkpointing", "keeps for backward", "FLOPs / plain's", "held GB", "step peak GB"], rows))


def scale_validation(record: dict) -> str:
    """The meta-device count against the same step on real CPU tensors, and against saved_tensors_hooks."""
    rows = []
    for model, results in record["validation"].items():
        for key, r in results.items():
            rows.append([model, key, number(r["meta_held_bytes"] / 2**20), number(r["cpu_held_bytes"] / 2**20),
                         f"{r['meta_held_bytes'] / r['cpu_held_bytes'] - 1:+.2%}", number(r["cpu_saved_hooks_bytes"] / 2**20)])
    return table(["model", "loss / checkpointing", "held MiB, meta count", "held MiB, CPU run", "difference",
                  "saved_tensors_hooks MiB, CPU run"], rows)


# ----------------------------------------------------------------------------------------------
# dsd.json (related/benchmarks/dsd.py): per-seed results, and their mean ± std in "summary".


DSD_INDICATORS = ("latent_std", "effective_rank", "recon_mse")


def dsd_labels(equal_steps: int, finetune_nfe: int) -> dict:
    """Each training's row label."""
    return {"naive": "naive joint", "dsd": "DSD", "two_stage": "two-stage",
            "dsd_no_latent_norm": "DSD without latent LayerNorm",
            "dsd_equal_updates": f"DSD, equal updates ({equal_steps:,} steps)",
            "dsd+e2e": f"DSD + E2E (trained at {finetune_nfe} NFE)"}


def dsd_tables(record: dict) -> str:
    """Collapse indicators at the end of training, then CFD and pixel energy distance against NFE."""
    summary, nfes = record["summary"], record["config"]["nfe"]
    labels = dsd_labels(record["results"][0]["final"]["dsd_equal_updates"]["step"], record["config"]["finetune_nfe"])
    models = list(summary["parameters"])

    def cell(entry):
        return mean_std(entry["mean"], entry["std"])

    indicators = [[labels[m], number(summary["parameters"][m]),
                   *(cell(summary["final"][m][key]) for key in DSD_INDICATORS)]
                  for m in models]
    parts = [table(["model", "parameters", "latent std", f"effective rank (of {record['config']['latent_dim']})",
                    "recon MSE"], indicators)]
    for metric, title in (("cfd", "CFD"), ("energy", "Pixel energy distance")):
        cells = [[summary["quality"][f"{m}@{nfe}"][metric] for nfe in nfes] for m in models]
        rows = bold_lowest([[cell(entry) for entry in row] for row in cells], [[e["mean"] for e in row] for row in cells])
        parts.append(f"{title} (train split vs test: {cell(summary['reference'][metric])}; lower is better):")
        parts.append(table(["model", *(f"{nfe} NFE" for nfe in nfes)], [[labels[m], *row] for m, row in zip(models, rows)]))
    return "\n\n".join(parts)


# What each of dsd.json's goals (related/benchmarks/dsd.py's GOALS: headline key -> [relation, limit]) says.
DSD_GOALS = {
    "dsd/latent_std_naive_vs_two_stage": "naive joint training collapses the latents: its latent std ÷ the two-stage's",
    "dsd/cfd4_vs_two_stage": "DSD matches the two-stage baseline at 4 NFE with half the parameters: CFD ratio",
    "dsd/e2e_cfd4_vs_dsd4": "end-to-end fine-tuning improves DSD's own 4-NFE CFD: CFD ratio",
}


def dsd_goals(record: dict) -> str:
    """Each goal, the headline value it is measured by, met or missed."""
    meets = {"<=": lambda value, limit: value <= limit, "<": lambda value, limit: value < limit}
    rows = []
    for key, (relation, limit) in record["goals"].items():
        value = record["headline"][key]
        rows.append([DSD_GOALS[key], f"{relation.replace('<=', '≤')} {limit:g}", number(value),
                     "met" if meets[relation](value, limit) else "**missed**"])
    return table(["goal", "limit", "measured", ""], rows)


def dsd_spread(record: dict) -> str:
    """dsd-spread.json: per model, the largest relative spread of each column across the CPU settings."""
    labels = dsd_labels(2 * record["config"]["steps"], record["config"]["finetune_nfe"])  # dsd.py: twice the steps
    columns = ("cfd", "energy", *DSD_INDICATORS)
    rows = [[labels[model], *(relative(record["headline"][f"dsd-spread/{model}/{column}"]) for column in columns)]
            for model in record["final"]]
    return (settings_caption(record) + f" Seed {record['seed']}, `python related/dsd.py` under each, "
            f"`python related/benchmarks/dsd.py --spread`: {record['wall_seconds']:.0f} s. (max − min) / max over "
            "the settings; CFD and energy: the largest over NFE " + ", ".join(map(str, record["config"]["nfe"])) + ":\n\n"
            + table(["model", "CFD", "energy", "latent std", "effective rank", "recon MSE"], rows))


# ----------------------------------------------------------------------------------------------
# destruction.json (related/benchmarks/destruction.py): per (target, destruction, T) a summary of [mean, std] over seeds.

DESTRUCTION_COLUMNS = {"elbo": "ELBO", "eubo": "EUBO", "gap": "EUBO − ELBO", "log_Z_error": "log Ẑ − log Z", "w1": "W1",
                       "modes": "modes"}


def destruction_cells(summary: dict) -> list[str]:
    return [mean_std(*summary[metric]) for metric in DESTRUCTION_COLUMNS]


def destruction_tables(record: dict) -> str:
    """Per target, fixed against learned destruction at every T; then the stabiliser ablation on GMM25, T = 5."""
    results, plan = record["results"], record["plan"]
    runs = sum(len(entry["runs"]) for entry in [*results.values(), *record["ablation"].values()])
    diverged = sum(entry["summary"]["diverged"] for entry in [*results.values(), *record["ablation"].values()])
    parts = [f"{runs} runs of {record['config']['iterations']:,} iterations, seeds {', '.join(map(str, plan['seeds']))}, "
             f"torch threads {record['threads']}; {diverged} diverged; wall time {record['wall_seconds']:,.0f} s."]
    header = ["destruction", "T", *DESTRUCTION_COLUMNS.values(), "s/run"]
    for target in plan["targets"]:
        first = results[f"{target}/fixed/T{plan['steps'][0]}"]["runs"][0]
        log_Z = first["log_Z_hat"] - first["log_Z_error"]
        rows = [[destruction, str(steps), *destruction_cells(summary), number(summary["seconds"][0])]
                for destruction in ("fixed", "learned") for steps in plan["steps"]
                for summary in [results[f"{target}/{destruction}/T{steps}"]["summary"]]]
        parts += [f"**{target}** (log Z = {log_Z:.2f})", table(header, rows)]
    if record["ablation"]:
        variants = {"fixed (TB)": results["gmm25/fixed/T5"], "learned (TB, all stabilisers)": results["gmm25/learned/T5"],
                    **record["ablation"]}
        rows = [[name, *destruction_cells(entry["summary"])] for name, entry in variants.items()]
        parts += ["**ablation (GMM25, T = 5)**", table(["variant", *DESTRUCTION_COLUMNS.values()], rows)]
    return "\n\n".join(parts)


# The goals (related/benchmarks/destruction.py's docstring): (goal, headline key, the largest value that meets it).
DESTRUCTION_GOALS = (
    ("learned T = 5 closes ≥ 30 % of fixed T = 5's EUBO − ELBO on GMM25 (ratio ≤ 0.7)", "gmm25/gap_learned5_vs_fixed5", 0.7),
    ("… on the Funnel", "funnel/gap_learned5_vs_fixed5", 0.7),
    ("learned T = 5 at least as good as fixed T = 20, GMM25 (ratio ≤ 1)", "gmm25/gap_learned5_vs_fixed20", 1.0),
    ("… Funnel", "funnel/gap_learned5_vs_fixed20", 1.0),
    ("no run diverges (NaN)", "diverged_runs", 0),
    ("\\|log Ẑ − log Z\\| ≤ 0.1 on GMM25, learned T = 5, mean over seeds", "gmm25/logz_error_learned5", 0.1),
)


def destruction_spread(record: dict) -> str:
    """destruction-spread.json: per target, each headline ratio's range over the CPU settings (seed 0), and the
    largest relative spread of its runs' metrics."""
    ratios, runs = record["ratios"], record["runs"]
    rows = []
    for target in record["plan"]["targets"]:
        cells = []
        for reference in ("fixed5", "fixed20"):
            ratio = ratios[f"{target}/gap_learned5_vs_{reference}"]
            cells += [value_range(ratio), relative(ratio["relative"])]
        mine = [run for key, run in runs.items() if key.split("/")[0] == target]
        cells += [relative(max(run[metric]["relative"] for run in mine)) for metric in ("gap", "w1")]
        rows.append([target, *cells])
    return (settings_caption(record) + f" Seed {record['seed']}, `python related/adaptive_destruction.py` per run "
            f"({record['config']['iterations']:,} iterations), `python related/benchmarks/destruction.py --spread`: "
            f"{record['wall_seconds']:.0f} s. Spread: (max − min) / max over the settings:\n\n"
            + table(["target", "learned T=5 ÷ fixed T=5 (gap)", "spread", "learned T=5 ÷ fixed T=20 (gap)", "spread",
                     "largest spread of a run's EUBO − ELBO", "… of its W1"], rows))


def destruction_goals(record: dict) -> str:
    """Each goal, the headline value it is measured by, met or missed."""
    rows = [[goal, number(record["headline"][key]), "met" if record["headline"][key] <= limit else "**missed**"]
            for goal, key, limit in DESTRUCTION_GOALS]
    return table(["goal", "measured", ""], rows)


# ----------------------------------------------------------------------------------------------
# quality.json, quality-table1.json, quality-tune.json (benchmarks/quality.py): the protocol's sweep, then
# every pre-declared recipe on the reporting seeds with its verdict against a reference.


def summary_of(record: dict) -> dict:
    """{(dataset, model, nfe): summary row} of a quality record."""
    return {(s["dataset"], s["model"], s["nfe"]): s for s in record["summary"]}


def quality_cells(entry: dict, distance: str) -> list[str]:
    """mean ± std of the distance, and (digits) pixel energy, precision, recall."""
    names = [distance] + (["pixel_energy"] if distance == "cfd" else []) + ["precision", "recall"]
    return [mean_std(entry[f"{name}_mean"], entry[f"{name}_std"]) for name in names]


def verdict_cells(result: dict, pixels: bool) -> list[str]:
    """The verdict rule's three comparisons (means over seeds of per-seed values) and the verdict."""
    cells = [mean_std(result["distance_ratio_mean"], result["distance_ratio_std"])]
    cells += [number(result["pixel_ratio_mean"])] if pixels else []
    return cells + [f"{result['recall_delta_mean']:+.3f}", "**beats**" if result["beats"] else "no"]


def quality_tables(record: dict) -> str:
    """Per dataset: the base's rows, then every recipe at every NFE with its verdict against the base's
    50-step DDIM (the verdict rule in the caption)."""
    summary, parts = summary_of(record), []
    for dataset, distance in (("digits", "cfd"), ("ring2d", "energy")):
        if dataset not in record["recipes"]:  # a study of digits only
            continue
        pixels = distance == "cfd"
        metric_header = [f"{'CFD' if pixels else 'energy'} ↓"] + ["pixel energy ↓"] * pixels + ["precision ↑", "recall ↑"]
        ratio_header = [f"{'CFD' if pixels else 'energy'} ratio"] + ["pixel ratio"] * pixels + ["recall Δ", "verdict"]
        rows = []
        for (name, model, nfe), entry in summary.items():
            if name == dataset and model in ("real data", "base DDIM"):
                rows.append([model, number(nfe)] + quality_cells(entry, distance) + [""] * len(ratio_header))
        for recipe in record["recipes"][dataset]:
            for nfe in record["plan"]["nfe"]:
                result = record["verdicts"][f"{dataset}/{recipe}/nfe{nfe} vs base DDIM 50"]
                rows.append([f"`{recipe}`", number(nfe)] + quality_cells(summary[dataset, recipe, nfe], distance)
                            + verdict_cells(result, pixels))
        seeds = record["protocol"]["reporting_seeds"]
        parts.append(f"**{dataset}**, test split, mean ± std over reporting seeds {', '.join(map(str, seeds))}; "
                     f"ratios and recall Δ against the same seed's base at 50 DDIM steps:\n\n"
                     + table(["model", "NFE"] + metric_header + ratio_header, rows))
    rule = record["verdict_rule"]
    parts.append(f"Verdict rule: **beats** = CFD (ring: energy) ratio ≤ {rule['cfd_ratio_at_most']}, pixel ratio ≤ "
                 f"{rule['pixel_ratio_at_most']} and recall ≥ the base's − {rule['recall_drop_at_most']}, on the seed means.")
    return "\n\n".join(parts)


def quality_table1(record: dict) -> str:
    """The LCM at its own 1/2/4 steps, and each E2E-from-LCM recipe at 4 NFE against the LCM's 4 steps."""
    summary, rows = summary_of(record), []
    for (dataset, model, nfe), entry in summary.items():
        if dataset == "digits" and model in ("base DDIM", "LCM") and (model == "LCM" or nfe in (4, 50)):
            rows.append([model, number(nfe)] + quality_cells(entry, "cfd") + [""] * 4)
    for recipe in record["recipes"]["table1"]:
        result = record["verdicts"][f"table1/{recipe}/nfe4 vs LCM 4"]
        cells = verdict_cells(result, True)
        rows.append([f"`{recipe}`", "4"] + quality_cells(summary["digits", recipe, 4], "cfd") + cells[:-1]
                    + [f"{cells[-1]}{' (goal met)' if result['meets_goal'] else ''}"])
    seeds = record["protocol"]["reporting_seeds"]
    return (f"digits, test split, mean ± std over reporting seeds {', '.join(map(str, seeds))}; ratios and recall Δ "
            f"of each recipe against the same seed's LCM at 4 steps (goal: CFD ratio ≤ 0.85 with the verdict rule's "
            f"pixel and recall checks):\n\n"
            + table(["model", "NFE", "CFD ↓", "pixel energy ↓", "precision ↑", "recall ↑", "CFD ratio", "pixel ratio",
                     "recall Δ", "verdict"], rows))


def quality_tune(record: dict) -> str:
    """The sweep: each stage's values, their validation distance and recall, and the value chosen."""
    summary, rows = summary_of(record), []
    for stage, spec in record["sweep"].items():
        dataset = spec["dataset"]
        distance = "cfd" if dataset == "digits" else "energy"
        base = summary[dataset, "base DDIM", 50]
        for value in spec["values"]:
            entry = summary[dataset, f"{stage}={value}", record["plan"]["tune_nfe"]]
            shown = f"`{value}`" if isinstance(value, (str, bool)) else f"{value:g}"  # layer names, flags, numbers
            rows.append([f"`{stage}`", shown, mean_std(entry[f"{distance}_mean"], entry[f"{distance}_std"]),
                         mean_std(entry["recall_mean"], entry["recall_std"]), f"{base['recall_mean']:.3f}",
                         "**chosen**" if record["chosen"][stage] == value else ""])
    protocol = record["protocol"]
    return (f"Validation split, tuning seeds {', '.join(map(str, protocol['tuning_seeds']))}, "
            f"{record['plan']['tune_nfe']} NFE; rule: {protocol['selection']}.\n\n"
            + table(["stage", "value", "distance ↓ (digits CFD, ring energy)", "recall ↑", "base 50-step recall",
                     ""], rows))


GAN_GOALS = {1: 1.5, 2: 1.0, 4: 0.9}  # issue 22: the CFD ratio to the base's 50 steps each NFE must reach


def quality_gan_goals(record: dict) -> str:
    """Every recipe of the GAN study at every NFE against its goal: CFD ratio <= GAN_GOALS[nfe], pixel ratio
    <= 1.0 and recall >= the base's - 0.05 (the verdict rule's other two checks), on the seed means."""
    rule, rows = record["verdict_rule"], []
    for recipe in record["recipes"]["digits"]:
        cells = []
        for nfe in record["plan"]["nfe"]:
            result = record["verdicts"][f"digits/{recipe}/nfe{nfe} vs base DDIM 50"]
            met = (result["distance_ratio_mean"] <= GAN_GOALS[nfe]
                   and result["pixel_ratio_mean"] <= rule["pixel_ratio_at_most"]
                   and result["recall_delta_mean"] >= -rule["recall_drop_at_most"])
            cells.append(f"{number(result['distance_ratio_mean'])} / {number(result['pixel_ratio_mean'])} / "
                         f"{result['recall_delta_mean']:+.3f}: {'met' if met else '**missed**'}")
        rows.append([f"`{recipe}`", *cells])
    goals = ", ".join(f"{nfe} NFE ≤ {GAN_GOALS[nfe]}×" for nfe in record["plan"]["nfe"])
    return (f"Goals: CFD ratio to the same seed's base at 50 DDIM steps {goals}, each with pixel ratio ≤ "
            f"{rule['pixel_ratio_at_most']} and recall Δ ≥ −{rule['recall_drop_at_most']} (seed means). Cells: CFD "
            f"ratio / pixel ratio / recall Δ.\n\n"
            + table(["recipe", *[f"{nfe} NFE" for nfe in record["plan"]["nfe"]]], rows))


CRITIC_AUC_GOAL = 0.8  # issue 32: every critic's held-out AUC at the end of its warm-up


def critic_goal_cells(record: dict, key: str, prefix: str, goal_met: bool, anchor: str | None) -> list[str]:
    """hf ratio (and whether it is nearer 1 than the regression anchor's), the critic's AUC after its warm-up and at
    the end (and whether the first reaches CRITIC_AUC_GOAL), and the CFD goal's verdict."""
    headline, cells = record["headline"], []
    hf = headline[f"{prefix}/hf_ratio"]
    if anchor is None:
        cells.append(f"{hf:.4f}")
    else:
        closer = abs(hf - 1) < abs(headline[f"{anchor}/hf_ratio"] - 1)
        cells.append(f"{hf:.4f} ({'nearer 1' if closer else '**not nearer 1**'})")
    if f"{prefix}/critic_auc_warmup" in headline:
        warm, end = headline[f"{prefix}/critic_auc_warmup"], headline[f"{prefix}/critic_auc"]
        cells.append(f"{warm:.3f}{'' if warm >= CRITIC_AUC_GOAL else ' (**< 0.8**)'} → {end:.3f}")
    else:
        cells.append("–")
    return cells + ["met" if goal_met else "**missed**"]


def where(record: dict) -> str:
    """What a critic-study record measured against: the report's test split, or a pilot's validation split."""
    seeds = ", ".join(map(str, record["protocol"]["reporting_seeds"]))
    if record.get("pilot"):
        return f"validation split, tuning seed {seeds} (a pilot, not a report)"
    return f"test split, means over reporting seeds {seeds}"


def quality_critic_goals(record: dict) -> str:
    """The critic study's goals, per recipe: Table 2's shape against the base's 50 steps (CFD ratio <= 0.9, pixel
    <= 1.0, recall >= -0.05), Table 1's against the LCM's 4 steps (<= 0.85 under the same checks); the GAN rows'
    hf ratio against their regression anchor's; the critics' AUC."""
    rule, rows = record["verdict_rule"], []
    for recipe in record["recipes"]["digits"]:
        result = record["verdicts"][f"digits/{recipe}/nfe4 vs base DDIM 50"]
        anchor = "digits/teacher-L2/nfe4" if has_critic(record["recipes"]["digits"][recipe]) else None
        rows.append([f"`{recipe}`", ratio_cells(result),
                     *critic_goal_cells(record, recipe, f"digits/{recipe}/nfe4", result["beats"], anchor)])
    return (f"4 NFE, {where(record)}. "
            f"Goal: CFD ratio to the same seed's base at 50 DDIM steps ≤ {rule['cfd_ratio_at_most']} with pixel ratio "
            f"≤ {rule['pixel_ratio_at_most']} and recall Δ ≥ −{rule['recall_drop_at_most']}; a GAN row's hf ratio "
            f"(Laplacian power of samples / real) nearer 1 than `teacher-L2`'s; every critic's held-out AUC ≥ "
            f"{CRITIC_AUC_GOAL} after its warm-up.\n\n"
            + table(["recipe", "CFD ratio / pixel ratio / recall Δ", "hf ratio", "critic AUC: warm-up → end", "goal"],
                    rows))


def quality_critic_table1(record: dict) -> str:
    """Table 1 of the critic study: each recipe from the LCM against the LCM's own 4 steps (goal <= 0.85 with the
    pixel and recall checks), its hf ratio against its update's L2 + P row, its critic's AUC; a DDIM recipe also
    against its own start, the untrained LCM through DDIM (where the record has that control)."""
    controlled = f"table1/{LCM_DDIM}/nfe4 vs LCM 4" in record["verdicts"]
    rows = []
    for recipe in record["recipes"]["table1"]:
        result = record["verdicts"][f"table1/{recipe}/nfe4 vs LCM 4"]
        arm = recipe.split("-teacher")[0].split("-GAN")[0]  # lcm or lcm-ddim: the update it trains through
        anchor = f"table1/{arm}-teacher-L2+P/nfe4" if has_critic(record["recipes"]["table1"][recipe]) else None
        cells = [f"`{recipe}`", ratio_cells(result)]
        if controlled:
            own = record["verdicts"].get(f"table1/{recipe}/nfe4 vs {LCM_DDIM} 4")
            cells.append("–" if own is None else ratio_cells(own) + (" (beats it)" if own["beats"] else " (**does not beat it**)"))
        rows.append(cells + critic_goal_cells(record, recipe, f"table1/{recipe}/nfe4", result["meets_goal"], anchor))
    header = ["recipe", "CFD ratio / pixel ratio / recall Δ vs the LCM"] + (
        ["… vs the untrained LCM through DDIM"] if controlled else []) + [
        "hf ratio", "critic AUC: warm-up → end", "goal (vs the LCM)" if controlled else "goal"]
    caption = ""
    if controlled:
        own = record["verdicts"][f"table1/{LCM_DDIM}/nfe4 vs LCM 4"]
        caption = (f" The control: the untrained LCM sampled through deterministic DDIM on its grid is "
                   f"{ratio_cells(own)} its own update's (CFD ratio / pixel ratio / recall Δ), so a `lcm-ddim-` row "
                   "improves on its own start only where it beats that control.")
    return (f"{where(record)[0].upper()}{where(record)[1:]}. From each seed's LCM at 4 NFE (`lcm-`: through its own "
            "update, fresh noise between steps; `lcm-ddim-`: "
            "through deterministic DDIM on its grid), against the same seed's LCM at its own 4 steps. Goal: CFD ratio "
            "≤ 0.85 with pixel ratio ≤ 1.0 and recall Δ ≥ −0.05; hf ratio nearer 1 than the same update's "
            f"`teacher-L2+P`.{caption}\n\n" + table(header, rows))


def critic_table1_summary(record: dict) -> str:
    """README's sentence on the critic study's Table 1: what the DDIM rows gain against the LCM, what the sampler
    switch alone gains (the untrained LCM through DDIM), their recall against that start, and whether any recipe
    beats the model it starts from (the LCM under its own update, or that control for a DDIM recipe)."""
    verdicts, recipes = record["verdicts"], record["recipes"]["table1"]
    ddim = [recipe for recipe in recipes if recipe.startswith("lcm-ddim-")]
    start = {recipe: f"{LCM_DDIM} 4" if recipe in ddim else "LCM 4" for recipe in recipes}
    against_start = {recipe: verdicts[f"table1/{recipe}/nfe4 vs {start[recipe]}"] for recipe in recipes}
    gains = [verdicts[f"table1/{recipe}/nfe4 vs LCM 4"]["distance_ratio_mean"] for recipe in ddim]
    losing = sum(against_start[recipe]["recall_delta_mean"] < 0 for recipe in ddim)
    winners = [f"`{recipe}`" for recipe in recipes if against_start[recipe]["beats"]]
    recall = "every DDIM recipe loses" if losing == len(ddim) else f"{losing} of {len(ddim)} DDIM recipes lose"
    beat = "beats" if len(winners) == 1 else "beat"
    verdict = (f"only {', '.join(winners)} {beat} the model it starts from" if winners
               else "no recipe enhances the model it starts from")
    control = verdicts[f"table1/{LCM_DDIM}/nfe4 vs LCM 4"]["distance_ratio_mean"]
    return (f"From a distilled LCM, what looked like a gain through DDIM ({number(min(gains))}–{number(max(gains))}× "
            f"its CFD) is mostly the switch of sampler (the untrained LCM through DDIM: {number(control)}×), and "
            f"against that start {recall} recall: {verdict} "
            "([the critic study](benchmarks/README.md#the-adversarial-term-acting-qualitypy---study-critic)).")


def spread_sentence(record: dict) -> str:
    """README's sentence on the spread across CPU settings: the largest relative spread of any column."""
    largest = max(record["headline"][f"{phase}/{column}_max_relative"]
                  for phase in ("evaluation", "training") for column in SPREAD_COLUMNS)
    return (f"The quickstart's numbers are the same on every CPU setting we could vary, to {relative(largest)} relative "
            "([docs/guide.md](docs/guide.md#the-same-numbers-on-every-machine)).")


def spread_gan_sentence(record: dict) -> str:
    """README's sentence on an adversarial fine-tune's spread across CPU settings."""
    headline = record["headline"]
    return (f"An adversarial fine-tune's are not: its CFD moves by {headline['training_gan/cfd_max_relative']:.1%} "
            f"across the same settings, its critic's final AUC by {headline['training_gan/critic_auc_max_relative']:.0%} "
            "([benchmarks/README.md](benchmarks/README.md#an-adversarial-fine-tune-is-not-this-stable)).")


def critic_warmup_table(record: dict) -> str:
    """critic_warmup.json (and critic_warmup-stronger.json): per critic and frozen student, the held-out AUC after
    the critic study's warm-up and at the end of this probe's, its mean ± std over the probe's last half, and the
    first logged step at which it reached the goal; the caption gives the held-out batch and the AUC's standard
    error near the goal."""
    headline, rows = record["headline"], []
    for result in record["results"]:
        prefix = f"{result['critic']}/{result['student']}"
        reached = headline[f"{prefix}/steps_to_goal"]
        rows.append([result["critic"], result["student"], f"{headline[f'{prefix}/auc_at_study_warmup']:.3f}",
                     number(result["warmup_steps"]), f"{headline[f'{prefix}/auc_final']:.3f}",
                     mean_std(headline[f"{prefix}/auc_last_half_mean"], headline[f"{prefix}/auc_last_half_std"]),
                     "**never**" if reached is None else number(reached), number(round(result["seconds"]))])
    (samples,) = {result["auc_samples"] for result in record["results"]}
    return (f"Tuning seed {record['seed']}, {record['split']} split, {record['nfe']} NFE; the critic alone, its held-out "
            f"AUC logged every {record['log_every']} steps on the same {samples} real digits and {samples} samples of "
            f"the student; each run's own time in the last column"
            + (" (runs finished earlier in the work folder were read, not trained again)" if "reused_work" in record
               else f" ({number(round(record['wall_seconds']))} s in all on {record['cores']} cores)") + ". "
            f"On another held-out batch of that size an AUC near {record['auc_goal']} would move by "
            f"{headline['auc_standard_error_at_goal']:.3f} (one standard error, `critics.auc_standard_error`), at "
            "every step of a curve alike.\n\n"
            + table(["critic", "frozen student", f"AUC after {record['study_warmup_steps']} steps (the study's warm-up)",
                     "probe's warm-up (steps)", "AUC at its end", "AUC over its last half (mean ± std)",
                     f"first step at AUC ≥ {record['auc_goal']}", "seconds (one thread)"], rows))


def ratio_cells(result: dict) -> str:
    """CFD ratio / pixel ratio / recall Δ of one comparison's seed means."""
    return f"{number(result['distance_ratio_mean'])} / {number(result['pixel_ratio_mean'])} / {result['recall_delta_mean']:+.3f}"


# ----------------------------------------------------------------------------------------------
# toy2d.json (python toy2d.py): the README's "Which coupling" table on the ring.


def toy2d_table(record: dict) -> str:
    """Energy distance at 1 and 4 NFE per sampler, the lowest per column in bold, and the run's time."""
    rows, names, means = record["rows"], [], []
    for name, scores in rows.items():
        names.append(f"{name} (50 NFE: {number(scores['50'])})" if "50" in scores else name)
        means.append([scores["1"], scores["4"]])
    cells = bold_lowest([[number(a), number(b)] for a, b in means], means)
    return table(["sampler", "1 NFE", "4 NFE"], [[name, *row] for name, row in zip(names, cells)]) + f"\n\n`python toy2d.py`: {record['wall_seconds']:.0f} s."


# ----------------------------------------------------------------------------------------------
# The registry: block name -> (the file in benchmarks/results/ it reads, the function that renders it).

RENDERERS = {
    "quickstart": ("quickstart.json", quickstart_table),
    "commands": ("commands.json", commands_readme),
    "commands-runs": ("commands.json", commands_tables),
    "commands-cpus": ("commands.json", commands_cpus),

    "cost": ("cost.json", cost_table),
    "cost-headline": ("cost.json", headline_block),
    "cost-frontier": ("cost.json", cost_frontier),
    "scale-paper": ("scale.json", scale_paper),
    "scale-readme": ("scale.json", scale_readme),
    "scale-frontier": ("scale.json", scale_frontier),
    "scale-grid": ("scale.json", scale_grid),
    "scale-static": ("scale.json", scale_static),
    "scale-validation": ("scale.json", scale_validation),
    "scale-headline": ("scale.json", headline_block),
    "dsd": ("dsd.json", dsd_tables),
    "dsd-headline": ("dsd.json", headline_block),
    "dsd-goals": ("dsd.json", dsd_goals),
    "dsd-spread": ("dsd-spread.json", dsd_spread),
    "destruction": ("destruction.json", destruction_tables),
    "destruction-goals": ("destruction.json", destruction_goals),
    "destruction-spread": ("destruction-spread.json", destruction_spread),
    "destruction-headline": ("destruction.json", headline_block),
    "toy2d": ("toy2d.json", toy2d_table),
    "spread": ("spread.json", spread_table),
    "spread-summary": ("spread.json", spread_summary),
    "spread-gan": ("spread-gan.json", spread_gan),
    "quality": ("quality.json", quality_tables),
    "quality-headline": ("quality.json", headline_block),
    "quality-table1": ("quality-table1.json", quality_table1),
    "quality-tune": ("quality-tune.json", quality_tune),
    "quality-tune-instrument": ("quality-tune-instrument.json", quality_tune),
    "quality-gan-tune": ("quality-gan-tune.json", quality_tune),
    "quality-gan": ("quality-gan.json", quality_tables),
    "quality-gan-headline": ("quality-gan.json", headline_block),
    "quality-gan-goals": ("quality-gan.json", quality_gan_goals),
    "quality-gan-table1": ("quality-gan-table1.json", quality_table1),
    "quality-critic-pilot": ("quality-critic-pilot.json", quality_critic_goals),
    "quality-critic-pilot-table1": ("quality-critic-pilot-table1.json", quality_critic_table1),
    "quality-critic": ("quality-critic.json", quality_tables),
    "quality-critic-goals": ("quality-critic.json", quality_critic_goals),
    "quality-critic-table1": ("quality-critic-table1.json", quality_critic_table1),
    "critic-warmup": ("critic_warmup.json", critic_warmup_table),
    "critic-stronger": ("critic_warmup-stronger.json", critic_warmup_table),
    "critic-table1-summary": ("quality-critic-table1.json", critic_table1_summary),
    "spread-sentence": ("spread.json", spread_sentence),
    "spread-gan-sentence": ("spread-gan.json", spread_gan_sentence),
}
# Blocks whose JSON is not measured yet: they must stay empty. When it lands, the block moves to RENDERERS.
PENDING: dict = {}

# A marker is a line of its own (a marker quoted inside a sentence is not one).
BLOCK = re.compile(r"^<!-- report:(?P<name>[\w.-]+) -->\n(?P<body>.*?)^<!-- /report:(?P=name) -->$", re.DOTALL | re.MULTILINE)
MARKER = re.compile(r"^<!-- /?report:([\w.-]+) -->$", re.MULTILINE)


def render(name: str, results: Path = RESULTS) -> str:
    """The markdown of block `name`, from its JSON in `results`."""
    if name in PENDING:
        return ""
    if name not in RENDERERS:
        raise ValueError(f"no renderer named {name!r} (known: {', '.join([*RENDERERS, *PENDING])})")
    file, renderer = RENDERERS[name]
    path = Path(results) / file
    if not path.is_file():
        raise FileNotFoundError(f"block {name!r} renders {path}, which is missing: run the benchmark that writes it "
                                "(or restore the committed file)")
    return renderer(json.loads(path.read_text()))


def block(name: str, body: str) -> str:
    """A whole block: its markers, and between them `body` (nothing for an empty body)."""
    return f"<!-- report:{name} -->\n" + (f"{body}\n" if body else "") + f"<!-- /report:{name} -->"


def refresh(text: str, results: Path = RESULTS) -> tuple[str, list[str]]:
    """`text` with every block re-rendered, and the names of the blocks whose content changed."""
    markers = MARKER.findall(text)
    paired = [match["name"] for match in BLOCK.finditer(text)]
    if markers != [name for name in paired for _ in range(2)]:
        raise ValueError(f"unpaired report marker(s) for {sorted(set(markers) - set(paired)) or markers}; "
                         "each <!-- report:NAME --> needs its <!-- /report:NAME --> after it")
    stale = []

    def rerender(match):
        fresh = block(match["name"], render(match["name"], results))
        if fresh != match[0]:
            stale.append(match["name"])
        return fresh

    return BLOCK.sub(rerender, text), stale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", action="store_true", help="exit 1 if a block differs from its rendering")
    action.add_argument("--write", action="store_true", help="rewrite every block from its JSON")
    parser.add_argument("files", nargs="*", help=f"markdown files (default: {', '.join(DOCUMENTS)})")
    args = parser.parse_args(argv)
    stale, count = [], 0
    try:
        files = {name: Path(name) for name in args.files} or {name: ROOT / name for name in DOCUMENTS}
        for file, path in files.items():
            text = path.read_text()
            fresh, changed = refresh(text)
            count += len(BLOCK.findall(text))
            stale += [f"{file}: {name}" for name in changed]
            if args.write and changed:
                path.write_text(fresh)
    except (OSError, ValueError) as error:
        print(f"report.py: error: {error}", file=sys.stderr)
        return 2
    for line in stale:
        print(f"{'rewrote' if args.write else 'stale'}: {line}")
    print(f"{count} blocks, {len(stale)} {'rewritten' if args.write else 'stale'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
