"""benchmarks/quality.py — how good the few-step samples are: base DDIM against end-to-end fine-tuning,
with each coupling and each loss of the zoo (L2, GAN, the toy's trained perceptual distance).

Two datasets, several seeds (lower is better unless marked):
  - ring2d: toy2d's ring of 8 Gaussians; energy distance of 2D samples to fresh ring points;
  - digits: train_toy's 8x8 digits, through train_toy's own evaluation path, against the test split:
    the classifier Fréchet distance (CFD, in the metric classifier's features; one classifier per seed),
    and metrics no trained network shapes, in pixel space: the energy distance ("pixel"), and k-NN
    precision (fidelity, higher is better) and recall (diversity, higher is better; it falls when
    modes are dropped). A loss in learned features could game the CFD; it cannot game these.
Per seed, one base model is pretrained and every fine-tune starts from it. Rows of part "main":
  - base model, DDIM at 1, 2, 4, 50 NFE;
  - end-to-end fine-tuned, by coupling and loss, at 1 and 4 NFE (the headline's; 2 left out for the budget):
    independent pairs with L2 (Algorithm 1 as written: collapses) and with the GAN alone; inversion and
    teacher pairs with L2, L2+GAN, and on digits L2+P and L2+P+GAN (P: the perceptual term in the
    toy's trained backbone, train_toy --perceptual-net trained). The GAN is train_toy's recipe
    (TOY_METHOD: non-saturating, fixed weight, projection discriminator on the labels, its own lr, no
    R1) and toy2d's (RING_METHOD); its real samples are data with every coupling;
  - the paper's Table 2 at toy scale, inversion coupling at 4 NFE: L1, L2, P, L2+P, L2+P+GAN (digits;
    P in the trained backbone), L1, L2, L2+GAN (ring2d: no perceptual term in 2D);
  - the GAN ablation (digits, inversion, L2+GAN, 4 NFE, on ABLATION_SEEDS): one change of the recipe
    per row — the adaptive weight, R1, the slower lr of the previous default, an unconditional
    discriminator, a larger weight — the measurements that led to the recipe.
Part "table1", the paper's Table 1 at toy scale (digits, 3 seeds): the seed's base distilled into a
few-step LCM (train_toy --base lcm), the LCM at 1, 2, 4 NFE on its grid, and the LCM fine-tuned
end-to-end (inversion and teacher pairs from the diffusion base, L2), with the LCM's own update and
with deterministic DDIM steps on its grid (inversion pairs only). Part "leakage" (digits): inversion/L2
fine-tuning with (a) zero terminal SNR + trailing spacing against (b) the plain linear schedule +
leading spacing, each base trained with its own schedule.

    python benchmarks/quality.py                 # part main (the README's tables; about an hour on 2 CPU cores)
    python benchmarks/quality.py --only table1   # the Table 1 rows -> quality-table1.json/.png
    python benchmarks/quality.py --only leakage  # the schedule comparison -> quality-leakage.json/.png
    python benchmarks/quality.py --quick         # every part, 1 seed, tiny step counts (a smoke run)

Digits seeds run in parallel subprocesses (one torch thread each), each in its own work folder (--work,
default a temporary one): <work>/digits-seed<S>/<schedule>/base holds the base, the metric's classifier
and the perceptual backbone; every fine-tune gets its own folder with hard links to them.

Writes benchmarks/results/quality[-part][-quick].json and .png (distance vs NFE: base DDIM against the
best end-to-end setting per coupling); the last line printed is one JSON object with the headline
ratios, the best end-to-end setting (by its mean over seeds) divided by the base's mean:
D/e2e4_vs_base50, D/e2e1_vs_base50, D/e2e4_vs_base4 for D in ring2d, digits (digits: CFD), and
digits/pixel_e2e4_vs_base50, digits/pixel_e2e1_vs_base50 (the pixel energy distance of the same
settings); from part table1 digits/e2e_from_lcm4_vs_lcm4, digits/e2e_from_lcm4_vs_base50 and the same
two with _ddim. Goals (the issues): e2e4_vs_base50 <= 0.9 (pixel_e2e4_vs_base50 <= 1.0 with it),
e2e1_vs_base50 <= 1.0, e2e4_vs_base4 <= 0.25, e2e_from_lcm4_vs_lcm4 <= 0.85, e2e_from_lcm4_vs_base50
<= 1.0. Goals are reported, never tuned for.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import toy2d  # noqa: E402
import toy_nets  # noqa: E402
import train_toy  # noqa: E402
from report import write_results  # noqa: E402
from train_utils import changed, make_config  # noqa: E402

# Every run setting, per mode; "why" in the comment.
PLANS = {
    "full": dict(
        ring_seeds=(0, 1, 2),  # the ring is cheap: three seeds
        ring_pretrain_steps=2000,  # toy2d's default
        ring_finetune_steps=500,  # toy2d's default
        ring_nfe=(1, 4),  # the headline's NFE; 2 left out to fit the budget
        ring_eval_samples=2000,  # toy2d's default
        digits_seeds=(0, 1, 2),  # three seeds: the minimum
        digits_pretrain_steps=1500,  # half the quickstart's 3000, to fit the budget
        digits_finetune_steps=200,  # a third of the quickstart's 600, to fit the budget
        digits_nfe=(1, 4),  # 2 NFE left out on digits to fit the budget
        digits_eval_samples=500,
        classifier_epochs=30,  # train_toy's default (the metric's classifier and the perceptual backbone)
        teacher_steps=25,  # the teacher's DDIM runs on every batch; 25 steps instead of 50 halves its cost
        ablation_seeds=(0,),  # the GAN ablation: one seed fits the budget
        table1_seeds=(0, 1, 2),  # the Table 1 rows (fine-tuning an LCM): three seeds
        table1_nfe=(1, 2, 4),  # the paper's Table 1 is at 4 NFE; 1 and 2 show the trend
        distill_steps=500, distill_batch_size=64,  # train_toy's defaults
    ),
    "quick": dict(
        ring_seeds=(0,), ring_pretrain_steps=300, ring_finetune_steps=40, ring_nfe=(1, 4), ring_eval_samples=1000,
        digits_seeds=(0,), digits_pretrain_steps=100, digits_finetune_steps=5, digits_nfe=(1, 4),
        digits_eval_samples=100, classifier_epochs=2, teacher_steps=5, ablation_seeds=(0,),
        table1_seeds=(0,), table1_nfe=(4,), distill_steps=5, distill_batch_size=16,
    ),
}
BASE_NFE = (1, 2, 4, 50)
COUPLINGS = ("independent", "inversion", "teacher")
# The loss zoo: name -> config fields on top of the toy's defaults (train_toy.TOY_METHOD / toy2d.RING_METHOD,
# which hold the GAN recipe: its kind, weighting, discriminator and lr). P = the perceptual term.
GAN_WEIGHT = {"digits": train_toy.GAN_WEIGHT, "ring2d": 0.1}  # with L2; alone, 1
LOSSES = {
    "L2": dict(gan_weight=0.0),
    "L2+GAN": dict(gan_weight=GAN_WEIGHT["digits"]),
    "L2+P": dict(gan_weight=0.0, lpips_weight=1.0),
    "L2+P+GAN": dict(gan_weight=GAN_WEIGHT["digits"], lpips_weight=1.0),
    "GAN": dict(l2_weight=0.0, gan_weight=1.0),  # the GAN alone: a fixed weight 1 (nothing else to weigh it against)
    "L1": dict(l1_weight=1.0, l2_weight=0.0, gan_weight=0.0),
    "P": dict(l2_weight=0.0, lpips_weight=1.0, gan_weight=0.0),
}
# (coupling, loss) of each fine-tune at every NFE. Independent pairs: L2 shows Algorithm 1's collapse, the
# GAN alone is the loss that makes them work; the perceptual term is a regression too (it needs pairs).
DIGITS_RUNS = [("independent", "L2"), ("independent", "GAN")] + [
    (coupling, loss) for coupling in ("inversion", "teacher") for loss in ("L2", "L2+GAN", "L2+P", "L2+P+GAN")]
RING_RUNS = [("independent", "L2"), ("independent", "GAN")] + [
    (coupling, loss) for coupling in ("inversion", "teacher") for loss in ("L2", "L2+GAN")]
# Table 2 at toy scale (inversion coupling, 4 NFE): the rows not already among the runs above.
DIGITS_TABLE2 = ("L1", "L2", "P", "L2+P", "L2+P+GAN")
RING_TABLE2 = ("L1", "L2", "L2+GAN")
# The GAN ablation (digits, inversion, L2+GAN, 4 NFE): one change to the recipe per row.
GAN_ABLATION = {
    "adaptive weight (taming)": dict(gan_adaptive=True),
    "R1 0.1": dict(r1_weight=0.1),
    "D lr 1e-4": dict(disc_lr=1e-4),
    "unconditional D": dict(disc_conditional=False),
    "GAN weight 2": dict(gan_weight=2.0),
}
SCHEDULES = {  # leakage comparison: name -> Config fields
    "zero-SNR, trailing": dict(zero_terminal_snr=True, spacing="trailing"),
    "linear, leading": dict(zero_terminal_snr=False, spacing="leading"),
}
MAIN_SCHEDULE = "zero-SNR, trailing"
GOALS = {"e2e4_vs_base50": 0.9, "e2e1_vs_base50": 1.0, "e2e4_vs_base4": 0.25,
         "pixel_e2e4_vs_base50": 1.0, "pixel_e2e1_vs_base50": 1.0}
# Table 1 at toy scale: end-to-end fine-tuning of a few-step LCM distilled from the base. Algorithm 1 as
# written pairs independent noise with the data, which collapses under L2 (README); both couplings here
# pair the noise with the diffusion base's ODE, the one the LCM was distilled from.
TABLE1_COUPLINGS = ("inversion", "teacher")
# The LCM's sampler: its own update (fresh noise between steps: PixArt-delta's, and Alg. 1 line 9 as we
# read it) or deterministic DDIM steps on the same grid (L1/L2 pairs then have one answer per z_T).
TABLE1_UPDATES = {"lcm": "LCM", "ddim": "LCM, DDIM update"}
# (update, coupling) of each fine-tune from the LCM; the teacher's 25-step DDIM on every batch is the
# costly part, so the deterministic update gets the inversion pairs only (to fit the time budget).
TABLE1_RUNS = (("lcm", "inversion"), ("lcm", "teacher"), ("ddim", "inversion"))
TABLE1_GOALS = {"e2e_from_lcm4_vs_lcm4": 0.85, "e2e_from_lcm4_vs_base50": 1.0}
PARTS = ("main", "table1", "leakage")
METRICS = ("distance", "pixel", "precision", "recall")  # digits: distance = CFD; ring2d: distance only


def row(dataset, group, model, nfe, seed, metrics, coupling=None, loss=None, schedule=MAIN_SCHEDULE):
    """One measured row; `metrics`: {"distance": ., and on digits "pixel", "precision", "recall"}."""
    return dict(dataset=dataset, group=group, model=model, coupling=coupling, loss=loss, schedule=schedule,
                nfe=nfe, seed=seed, **metrics)


# ----------------------------------------------------------------------------------------------
# ring2d: toy2d's pretrain / finetune / score.


def ring2d_rows(plan, seed):
    """Every ring2d row for one seed (energy distance to fresh ring points)."""
    n = plan["ring_eval_samples"]
    score = lambda model, k: {"distance": toy2d.score(model, k, n, seed=1000 + seed)}  # noqa: E731
    base = toy2d.pretrain(steps=plan["ring_pretrain_steps"], seed=seed)
    rows = [row("ring2d", "base", "base DDIM", k, seed, score(base, k)) for k in BASE_NFE]

    def finetune(k, coupling, loss):
        fields = {**LOSSES[loss], **({"gan_weight": GAN_WEIGHT["ring2d"]} if loss == "L2+GAN" else {})}
        return toy2d.finetune(base, num_steps=k, steps=plan["ring_finetune_steps"], seed=seed, coupling=coupling, **fields)

    for coupling, loss in RING_RUNS:
        for k in plan["ring_nfe"]:
            rows.append(row("ring2d", "coupling", "E2E", k, seed, score(finetune(k, coupling, loss), k), coupling, loss))
    for loss in RING_TABLE2:
        if ("inversion", loss) not in RING_RUNS:
            rows.append(row("ring2d", "table2", "E2E", 4, seed, score(finetune(4, "inversion", loss), 4), "inversion", loss))
    return rows


# ----------------------------------------------------------------------------------------------
# digits: train_toy's stages, one folder per fine-tune sharing the seed's base, classifier and backbone.


def digits_config(plan, seed, out_dir, schedule, nfe, **fields):
    return make_config(
        train_toy.Config, dataset="digits", out_dir=str(out_dir), seed=seed, device="cpu", nfe=tuple(nfe),
        pretrain_steps=plan["digits_pretrain_steps"], finetune_steps=plan["digits_finetune_steps"],
        eval_samples=plan["digits_eval_samples"], classifier_epochs=plan["classifier_epochs"],
        teacher_steps=plan["teacher_steps"], log_every=10**9, save_every=10**9,
        resume=True,  # a --work folder run again skips what is done
        **SCHEDULES[schedule], **fields)


def digits_rows(plan, seed, work, parts=("main",)):
    """Every digits row of `parts` for one seed (CFD, pixel energy, precision, recall vs the test split)."""
    device = torch.device("cpu")
    data = train_toy.build_dataset(train_toy.Config(dataset="digits"))
    rows, cfd = [], None
    shared = ("pretrain.pt", "classifier.pt", "perceptual.pt")

    def measure(config, model, k):
        images = train_toy.generate(model, config, data, train_toy.build_schedule(config, device), k,
                                    config.eval_samples, device, lcm=config.base == "lcm")
        pixel = train_toy.pixel_metrics(images, data.test_images)
        return {"distance": cfd(images), "pixel": pixel["pixel_energy"], "precision": pixel["precision"],
                "recall": pixel["recall"]}

    def run_folder(schedule, name, files):
        """<work>/<schedule>/<name>, with hard links to `files` of the base's folder (lcm.pt: the LCM's)."""
        folder = os.path.join(work, schedule.replace(", ", "-"))
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for file in files:
            link, source = os.path.join(folder, name, file), os.path.join(folder, "lcm" if file == "lcm.pt" else "base", file)
            if not os.path.exists(link) and os.path.exists(source):
                os.link(source, link)
        return os.path.join(folder, name)

    def finetune(schedule, name, nfe, **fields):
        """Fine-tune in <work>/<schedule>/<name> (hard links to the base, and the LCM) -> {k: metrics}."""
        files = shared + (("lcm.pt",) if fields.get("base") == "lcm" else ())
        config = digits_config(plan, seed, run_folder(schedule, name, files), schedule, nfe, **fields)
        train_toy.finetune(config, data, device)
        return {k: measure(config, train_toy.load_finetuned(config, data, device, k), k) for k in nfe}

    schedules = (MAIN_SCHEDULE,) + (("linear, leading",) if "leakage" in parts else ())
    for schedule in schedules:
        base_config = digits_config(plan, seed, os.path.join(work, schedule.replace(", ", "-"), "base"), schedule, plan["digits_nfe"])
        train_toy.pretrain(base_config, data, device)
        if cfd is None:  # one metric classifier and one perceptual backbone per seed, in the main schedule's base folder
            classifier = train_toy.train_classifier(base_config, data, device)
            train_toy.train_perceptual(base_config, data, device)
            cfd = toy_nets.ClassifierFrechetDistance(classifier, data.test_images, base_config.eval_batch_size)
            main_base = base_config.out
        else:
            for file in ("classifier.pt", "perceptual.pt"):
                if not (base_config.out / file).exists():
                    os.link(main_base / file, base_config.out / file)
        base = train_toy.load_base(base_config, data, device)
        group = "base" if schedule == MAIN_SCHEDULE else "leakage"
        for k in (BASE_NFE if schedule == MAIN_SCHEDULE else (1, 4, 50)):
            rows.append(row("digits", group, "base DDIM", k, seed, measure(base_config, base, k), schedule=schedule))
    if "main" in parts:
        for coupling, loss in DIGITS_RUNS:
            measured = finetune(MAIN_SCHEDULE, f"{coupling}-{loss}", plan["digits_nfe"], coupling=coupling, **LOSSES[loss])
            rows += [row("digits", "coupling", "E2E", k, seed, m, coupling, loss) for k, m in measured.items()]
        for loss in DIGITS_TABLE2:
            if ("inversion", loss) not in DIGITS_RUNS:
                measured = finetune(MAIN_SCHEDULE, f"inversion-{loss}", (4,), coupling="inversion", **LOSSES[loss])
                rows.append(row("digits", "table2", "E2E", 4, seed, measured[4], "inversion", loss))
        for name, fields in GAN_ABLATION.items() if seed in plan["ablation_seeds"] else ():
            measured = finetune(MAIN_SCHEDULE, f"ablation-{name.replace(' ', '-')}", (4,), coupling="inversion",
                                **{**LOSSES["L2+GAN"], **fields})
            rows.append(row("digits", "gan ablation", f"E2E, {name}", 4, seed, measured[4], "inversion", "L2+GAN"))
    if "leakage" in parts:
        for schedule in SCHEDULES:
            measured = finetune(schedule, "inversion-L2", plan["digits_nfe"], coupling="inversion", **LOSSES["L2"])
            rows += [row("digits", "leakage", "E2E", k, seed, m, "inversion", "L2", schedule) for k, m in measured.items()]
    if "table1" in parts:  # distil the base into an LCM (train_toy --base lcm), then Alg. 1 from it
        lcm_fields = dict(base="lcm", distill_steps=plan["distill_steps"], distill_batch_size=plan["distill_batch_size"])
        lcm_folder = run_folder(MAIN_SCHEDULE, "lcm", shared)
        config = digits_config(plan, seed, lcm_folder, MAIN_SCHEDULE, plan["table1_nfe"], **lcm_fields)
        train_toy.distill(config, data, device)
        lcm = train_toy.load_lcm(config, data, device)
        for update, name in TABLE1_UPDATES.items():
            sampler = changed(config, lcm_update=update)
            rows += [row("digits", "table1", name, k, seed, measure(sampler, lcm, k)) for k in plan["table1_nfe"]]
        for update, coupling in TABLE1_RUNS:
            measured = finetune(MAIN_SCHEDULE, f"lcm-{update}-{coupling}-L2", plan["table1_nfe"], coupling=coupling,
                                lcm_update=update, **lcm_fields, **LOSSES["L2"])
            rows += [row("digits", "table1", f"E2E from {TABLE1_UPDATES[update]}", k, seed, m, coupling, "L2")
                     for k, m in measured.items()]
    return rows


def worker_parts(plan, parts) -> dict:
    """{seed: the parts that seed runs}: main and leakage on digits_seeds, table1 on table1_seeds."""
    seeds = {}
    for part, key in (("main", "digits_seeds"), ("table1", "table1_seeds"), ("leakage", "digits_seeds")):
        for seed in plan[key] if part in parts else ():
            seeds.setdefault(seed, []).append(part)
    return seeds


def start_digits_workers(plan_name, plan, work, threads, parts):
    """One subprocess per digits seed; each prints its rows as the last line of stdout."""
    workers = []
    for seed, seed_parts in worker_parts(plan, parts).items():
        command = [sys.executable, os.path.abspath(__file__), "--digits-worker",
                   f"{plan_name},{seed},{work},{threads},{'+'.join(seed_parts)}"]
        log = open(os.path.join(work, f"digits-seed{seed}.log"), "w")
        environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        workers.append((seed, log, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=environment)))
    return workers


def collect(workers, timeout):
    rows = []
    for seed, log, process in workers:
        stdout, _ = process.communicate(timeout=timeout)
        log.close()
        if process.returncode != 0:
            raise RuntimeError(f"digits seed {seed} failed (exit {process.returncode}); see {log.name}")
        rows += json.loads(stdout.strip().splitlines()[-1])
    return rows


# ----------------------------------------------------------------------------------------------
# Aggregation, tables, headline, plot.


def aggregate(rows):
    """Mean and std over seeds of every (dataset, group, model, coupling, loss, schedule, nfe): "mean",
    "std" of the distance, "<metric>_mean", "<metric>_std" of the other metrics a row has."""
    groups = {}
    for r in rows:
        key = tuple(r[name] for name in ("dataset", "group", "model", "coupling", "loss", "schedule", "nfe"))
        groups.setdefault(key, []).append(r)
    summary = []
    for key, members in groups.items():
        entry = dict(zip(("dataset", "group", "model", "coupling", "loss", "schedule", "nfe"), key), n=len(members))
        for metric in (m for m in METRICS if m in members[0]):
            values = [r[metric] for r in members]
            prefix = "" if metric == "distance" else f"{metric}_"
            entry[prefix + "mean"] = statistics.fmean(values)
            entry[prefix + "std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def best_e2e(summary, dataset, nfe, coupling=None):
    """The end-to-end setting (main schedule) with the lowest mean distance at this NFE."""
    candidates = [s for s in summary if s["dataset"] == dataset and s["model"] == "E2E" and s["nfe"] == nfe
                  and s["schedule"] == MAIN_SCHEDULE and (coupling is None or s["coupling"] == coupling)]
    return min(candidates, key=lambda s: s["mean"]) if candidates else None


def base_ddim(summary, dataset, nfe, schedule=MAIN_SCHEDULE):
    return next(s for s in summary if s["dataset"] == dataset and s["model"] == "base DDIM" and s["nfe"] == nfe and s["schedule"] == schedule)


def table1_entries(summary, model, nfe):
    """The Table 1 rows of `model` (see TABLE1_UPDATES: "LCM", "E2E from LCM", ...) at this NFE."""
    return [s for s in summary if s["group"] == "table1" and s["model"] == model and s["nfe"] == nfe]


def headline_ratios(summary, parts):
    headline = {}
    for dataset in ("ring2d", "digits") if "main" in parts else ():
        base50, base4 = base_ddim(summary, dataset, 50)["mean"], base_ddim(summary, dataset, 4)["mean"]
        headline[f"{dataset}/e2e4_vs_base50"] = best_e2e(summary, dataset, 4)["mean"] / base50
        headline[f"{dataset}/e2e1_vs_base50"] = best_e2e(summary, dataset, 1)["mean"] / base50
        headline[f"{dataset}/e2e4_vs_base4"] = best_e2e(summary, dataset, 4)["mean"] / base4
        if dataset == "digits":  # the pixel-space energy distance of the same settings (chosen by CFD)
            for k in (4, 1):
                pixel = best_e2e(summary, dataset, k)["pixel_mean"]
                headline[f"digits/pixel_e2e{k}_vs_base50"] = pixel / base_ddim(summary, dataset, 50)["pixel_mean"]
    if "table1" in parts:  # the LCM's own sampler (Alg. 1 as the paper runs it), best coupling, vs the LCM and base 50
        best = min(table1_entries(summary, "E2E from LCM", 4), key=lambda s: s["mean"])["mean"]
        (lcm,) = table1_entries(summary, "LCM", 4)
        headline["digits/e2e_from_lcm4_vs_lcm4"] = best / lcm["mean"]
        headline["digits/e2e_from_lcm4_vs_base50"] = best / base_ddim(summary, "digits", 50)["mean"]
        deterministic = min(table1_entries(summary, "E2E from LCM, DDIM update", 4), key=lambda s: s["mean"])["mean"]
        (lcm_ddim,) = table1_entries(summary, "LCM, DDIM update", 4)
        headline["digits/e2e_from_lcm4_ddim_vs_lcm4_ddim"] = deterministic / lcm_ddim["mean"]
        headline["digits/e2e_from_lcm4_ddim_vs_base50"] = deterministic / base_ddim(summary, "digits", 50)["mean"]
    return headline


def tables(summary, metric_names):
    """Markdown tables, one per dataset and metric: every row, mean ± std over seeds, by NFE."""
    lines = []
    for dataset, names in metric_names.items():
        entries = [s for s in summary if s["dataset"] == dataset]
        nfes = sorted({s["nfe"] for s in entries})
        seeds = max(s["n"] for s in entries)
        settings = {}
        for s in entries:
            settings.setdefault((s["group"], s["model"], s["coupling"], s["loss"], s["schedule"]), {})[s["nfe"]] = s
        for metric, name in names.items():
            prefix = "" if metric == "distance" else f"{metric}_"
            lines += [f"\n{dataset}: {name}, mean ± std over {seeds} seed(s)",
                      "| group | model | coupling | loss | schedule | " + " | ".join(f"{k} NFE" for k in nfes) + " |",
                      "|" + "---|" * (5 + len(nfes))]
            for (group, model, coupling, loss, schedule), by_nfe in settings.items():
                cells = [f"{by_nfe[k][prefix + 'mean']:.4g} ± {by_nfe[k][prefix + 'std']:.2g}" if k in by_nfe else "–" for k in nfes]
                lines.append(f"| {group} | {model} | {coupling or '–'} | {loss or '–'} | {schedule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary, metric_names, parts, path):
    """Distance vs NFE: per dataset (main), base DDIM against the best E2E setting per coupling; for
    table1, base DDIM, the LCM and E2E from the LCM per coupling; for leakage, base and E2E per schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(dataset, names["distance"]) for dataset, names in metric_names.items() if "main" in parts]
    panels += [(f"digits, {part}", metric_names["digits"]["distance"]) for part in ("table1", "leakage") if part in parts]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    by_nfe = lambda entries: sorted(entries, key=lambda s: s["nfe"])  # noqa: E731
    for axis, (title, metric) in zip(axes[0], panels):
        dataset = title.split(",")[0]
        curves = {"base, DDIM": by_nfe(s for s in summary if s["dataset"] == dataset and s["model"] == "base DDIM"
                                       and s["schedule"] == MAIN_SCHEDULE)}
        if title == dataset:
            for coupling in COUPLINGS:
                nfes = sorted({s["nfe"] for s in summary if s["dataset"] == dataset and s["model"] == "E2E" and s["coupling"] == coupling})
                curves[f"E2E best, {coupling}"] = [best_e2e(summary, dataset, k, coupling) for k in nfes]
        elif title.endswith("table1"):
            table1 = by_nfe(s for s in summary if s["group"] == "table1")
            for name in TABLE1_UPDATES.values():
                curves[name] = [s for s in table1 if s["model"] == name]
            for update, coupling in TABLE1_RUNS:
                name = f"E2E from {TABLE1_UPDATES[update]}"
                curves[f"{name}, {coupling}"] = [s for s in table1 if s["model"] == name and s["coupling"] == coupling]
        else:
            leakage = by_nfe(s for s in summary if s["group"] == "leakage")
            curves = {f"{model}, {schedule}": [s for s in leakage if s["model"] == model and s["schedule"] == schedule]
                      for model in ("base DDIM", "E2E") for schedule in SCHEDULES}
        for label, entries in curves.items():
            axis.errorbar([s["nfe"] for s in entries], [s["mean"] for s in entries], [s["std"] for s in entries],
                          marker="s", capsize=2, label=label)
        axis.set(xlabel="NFE (sampler steps)", ylabel=metric, xscale="log", yscale="log", title=title)
        axis.set_xticks(BASE_NFE, [str(k) for k in BASE_NFE])
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every part, 1 seed, tiny step counts: a smoke run")
    parser.add_argument("--only", choices=PARTS, default="main", help="the part to run (default main; results: "
                        "quality.json for main, quality-<part>.json for the others)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="folder for the JSON and plot")
    parser.add_argument("--work", default=None, help="folder for the digits checkpoints, kept (a run again in it skips "
                        "finished stages); default a temporary one, deleted after")
    parser.add_argument("--digits-worker", default=None, help=argparse.SUPPRESS)  # internal: plan,seed,work,threads,parts
    args = parser.parse_args(argv)
    if args.digits_worker:
        plan_name, seed, work, threads, parts = args.digits_worker.split(",")
        torch.set_num_threads(int(threads))
        print(json.dumps(digits_rows(PLANS[plan_name], int(seed), os.path.join(work, f"digits-seed{seed}"), parts.split("+"))))
        return {}

    start = time.time()
    plan_name = "quick" if args.quick else "full"
    parts = PARTS if args.quick else (args.only,)
    plan = PLANS[plan_name]
    cores = os.cpu_count() or 1
    seeds = worker_parts(plan, parts)
    threads = max(1, cores // (len(seeds) + ("main" in parts)))  # + 1: the ring runs here meanwhile; more threads than cores stalls OpenMP
    print(f"quality benchmark ({plan_name}, parts {', '.join(parts)}): {cores} cores, digits seeds {sorted(seeds)} in "
          f"parallel ({threads} thread(s) each), ring2d seeds {plan['ring_seeds'] if 'main' in parts else '-'}; "
          f"perceptual term P: train_toy --perceptual-net trained (toy_nets.PerceptualNet, seed + "
          f"{train_toy.PERCEPTUAL_SEED_OFFSET})", flush=True)
    temporary = tempfile.TemporaryDirectory(prefix="quality-") if args.work is None else None
    work = args.work or temporary.name
    os.makedirs(work, exist_ok=True)
    workers = start_digits_workers(plan_name, plan, work, threads, parts)
    torch.set_num_threads(1)  # the ring shares the cores with the digits workers
    rows = [r for seed in plan["ring_seeds"] for r in ring2d_rows(plan, seed)] if "main" in parts else []
    print(f"ring2d done at {time.time() - start:.0f}s; waiting for digits (logs in {work})", flush=True)
    rows += collect(workers, timeout=3 * 3600)
    if temporary is not None:
        temporary.cleanup()

    summary = aggregate(rows)
    digits_metrics = {"distance": "CFD (lower is better)", "pixel": "pixel energy distance (lower is better)",
                      "precision": "k-NN precision in pixel space (higher is better)",
                      "recall": "k-NN recall in pixel space (higher is better)"}
    metric_names = {**({"ring2d": {"distance": "energy distance (lower is better)"}} if "main" in parts else {}),
                    "digits": digits_metrics}
    print(tables(summary, metric_names))
    headline = headline_ratios(summary, parts)
    print()
    goals = {**{f"{dataset}/{key}": goal for dataset in metric_names for key, goal in GOALS.items()
                if f"{dataset}/{key}" in headline},
             **({f"digits/{key}": goal for key, goal in TABLE1_GOALS.items()} if "table1" in parts else {})}
    for dataset in metric_names if "main" in parts else ():
        for nfe in (1, 4):
            best = best_e2e(summary, dataset, nfe)
            print(f"{dataset}: best E2E at {nfe} NFE: {best['coupling']}, {best['loss']} ({best['mean']:.4g} ± {best['std']:.2g})")
    for key, goal in goals.items():
        print(f"goal {key} <= {goal}: measured {headline[key]:.3f} -> {'met' if headline[key] <= goal else 'MISSED'}")
    os.makedirs(args.out, exist_ok=True)
    name = "quality" + ("" if args.quick or args.only == "main" else f"-{args.only}") + ("-quick" if args.quick else "")
    plot(summary, metric_names, parts, os.path.join(args.out, f"{name}.png"))
    record = {"mode": plan_name, "parts": parts, "plan": plan, "losses": LOSSES, "toy_method": train_toy.TOY_METHOD,
              "ring_method": toy2d.RING_METHOD, "gan_ablation": GAN_ABLATION, "table1_couplings": TABLE1_COUPLINGS,
              "schedules": SCHEDULES, "metrics": metric_names,
              "leakage": "digits only: toy2d fixes its schedule (zero terminal SNR, trailing)",
              "digits_config": asdict(digits_config(plan, 0, "<work>", MAIN_SCHEDULE, plan["digits_nfe"])),
              "torch": torch.__version__, "cores": cores, "rows": rows, "summary": summary, "goals": goals}
    write_results(args.out, name, record, headline, start)
    return headline


if __name__ == "__main__":
    main()
