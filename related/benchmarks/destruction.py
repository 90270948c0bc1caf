"""benchmarks/destruction.py — fixed (Brownian bridge) against learned destruction, T = 5, 10, 20.

For each target (GMM25, Funnel d = 10, Many-Well d = 32, ring8) and each seed, adaptive_destruction.train
runs every (destruction, T) pair with the same settings (trajectory balance, on-policy + replay; the
learned destruction with its stabilisers: adaptive_destruction's docstring). Per run: ELBO, EUBO, their
gap (lower is better: the Jeffreys divergence of the two path measures), importance-sampled log Z minus
the true log Z, W1 to exact samples, modes covered (GMM25, ring8), wall time, and the convergence curve.
An ablation on GMM25 at T = 5 adds: VarGrad for both destructions, the learned destruction with no
stabiliser (no target network, one learning rate, no replay, its loss the TB residual with log Z), with
only the last of those, and with TLM as its objective.

    python related/benchmarks/destruction.py            # full mode: 3 seeds, 600 iterations a run (about 25 min, 1 thread)
    python related/benchmarks/destruction.py --quick    # 1 seed, 30 iterations, T in 5, 20, no ablation (a smoke run)
    python related/benchmarks/destruction.py --spread   # seed 0 of the headline's runs under each CPU setting

Writes benchmarks/results/destruction[-quick].json and .png (EUBO - ELBO against iteration, mean over
seeds); the last line printed is one JSON object with, per target D, D/gap_learned5_vs_fixed5 and
D/gap_learned5_vs_fixed20 (mean gap of learned destruction at T = 5 over the fixed one's at T = 5 / 20)
and D/logz_error_learned5 (mean |log Z_hat - log Z| over seeds), plus diverged_runs. Goals (the issue):
gap_learned5_vs_fixed5 <= 0.7 on gmm25 and funnel, gap_learned5_vs_fixed20 <= 1, no divergence,
gmm25/logz_error_learned5 <= 0.1. Goals are reported, never tuned for.

--spread runs seed 0 of the runs behind the headline's ratios (fixed T = 5, learned T = 5, fixed T = 20 on
every target; `python related/adaptive_destruction.py`, the plan's budget) once under each setting of
benchmarks/cpu_settings.py, a subprocess each, and writes destruction-spread[-quick].json: each run's
metrics and each target's two gap ratios under every setting, and their relative spread (max - min) / max.
It says how far these numbers move on another CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import time

import torch

from benchmarks import cpu_settings
from benchmarks.report import write_results
from related import adaptive_destruction
from train_utils import command_line


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Every run setting, per mode; "why" in the comment. The full mode runs SamplerConfig's defaults (600
# iterations of batch 256: all 87 runs fit 30 minutes on one shared CPU thread; gfn-diffusion trains 25k).
PLANS = {
    "full": dict(
        targets=tuple(adaptive_destruction.TARGETS),
        steps=(5, 10, 20),  # the T
        seeds=(0, 1, 2),  # the minimum
        ablation=True,  # GMM25 at T = 5: the stabilisers and objectives one by one
    ),
    "quick": dict(targets=tuple(adaptive_destruction.TARGETS), steps=(5, 20), seeds=(0,), iterations=30, eval_every=15,
                  ablation=False, batch_size=64, eval_samples=64, final_samples=128, distance_samples=64),
}
# Ablation rows on GMM25 at T = 5: name -> SamplerConfig changes.
ABLATION = {
    "fixed, VarGrad": dict(destruction="fixed", objective="vargrad"),
    "learned, VarGrad": dict(destruction="learned", objective="vargrad"),
    "learned, no stabiliser": dict(destruction="learned", target_decay=0.0, destruction_lr_ratio=1.0, replay=False,
                                   destruction_objective="same"),
    "learned, destruction on TB (log Z)": dict(destruction="learned", destruction_objective="same"),
    "learned, TLM": dict(destruction="learned", destruction_objective="tlm"),
}
RUN_SETTINGS = ("iterations", "eval_every", "batch_size", "eval_samples", "final_samples", "distance_samples")
METRICS = ("elbo", "eubo", "gap", "log_Z_error", "w1", "modes", "seconds")
SPREAD_RUNS = (("fixed", 5), ("learned", 5), ("fixed", 20))  # what the headline's gap ratios are made of
GOALS = {"gap_learned5_vs_fixed5": 0.7, "gap_learned5_vs_fixed20": 1.0}


def mean_std(values) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run(config: adaptive_destruction.SamplerConfig) -> dict:
    """One training run -> its final metrics, wall time and curve (all plain numbers)."""
    _, record = adaptive_destruction.train(config)
    final = {**record["final"], "seconds": record["seconds"], "diverged": record["diverged"]}
    curve = [{key: point[key] for key in ("iteration", "gap", "elbo", "eubo")} for point in record["curve"]]
    return {"final": final, "curve": curve}


def summarise(runs: list[dict]) -> dict:
    """Mean and std over seeds of every metric (modes and W1 only where measured)."""
    finals = [r["final"] for r in runs]
    return {metric: mean_std([f.get(metric) for f in finals]) for metric in METRICS} | {
        "abs_log_Z_error": mean_std([abs(f["log_Z_error"]) for f in finals]),
        "diverged": sum(f["diverged"] for f in finals)}


def row(name: str, summary: dict) -> str:
    cells = [f"{summary[m][0]:.3f} ± {summary[m][1]:.3f}" for m in ("elbo", "eubo", "gap", "log_Z_error", "w1")]
    modes = "–" if math.isnan(summary["modes"][0]) else f"{summary['modes'][0]:.1f}"
    return f"| {name} | {' | '.join(cells)} | {modes} | {summary['seconds'][0]:.0f} | {summary['diverged']} |"


def plot(curves: dict, plan: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(plan["targets"]), figsize=(4.2 * len(plan["targets"]), 3.6))
    colours = dict(zip(plan["steps"], ("tab:blue", "tab:orange", "tab:green")))
    for axis, target in zip(axes, plan["targets"]):
        for destruction, style in (("fixed", "--"), ("learned", "-")):
            for steps in plan["steps"]:
                runs = curves[(target, destruction, steps)]
                iterations = [point["iteration"] for point in runs[0]]
                gaps = [mean_std([r[i]["gap"] if i < len(r) else None for r in runs]) for i in range(len(iterations))]
                mean = [g[0] for g in gaps]
                axis.plot(iterations, mean, style, color=colours[steps], label=f"{destruction}, T={steps}")
                axis.fill_between(iterations, [m - s for m, s in gaps], [m + s for m, s in gaps], color=colours[steps], alpha=0.1)
        axis.set(title=target, xlabel="iteration", ylabel="EUBO - ELBO", yscale="log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def spread(plan: dict, overrides: dict, settings: dict, start: float) -> tuple[dict, dict]:
    """Seed 0 of SPREAD_RUNS on every target under each CPU setting (a subprocess each): every metric and each
    target's two gap ratios, their values by setting and relative spread; the headline keeps the spreads of
    the ratios and the largest of any run's gap and W1."""
    finals = {}  # "target/destruction/T" -> setting -> final metrics
    for name, setting in settings.items():
        for target in plan["targets"]:
            for destruction, steps in SPREAD_RUNS:
                arguments = command_line({**overrides, "target": target, "destruction": destruction,
                                          "num_steps": steps, "seed": 0})
                finals.setdefault(f"{target}/{destruction}/T{steps}", {})[name] = cpu_settings.run_script(
                    "related/adaptive_destruction.py", arguments, setting)["final"]
        print(f"[{time.time() - start:.0f}s] {name}: gap " + ", ".join(
            f"{key} {by_setting[name]['gap']:.6g}" for key, by_setting in finals.items()), flush=True)

    runs = {key: {metric: cpu_settings.across(by_setting, lambda final: final[metric]) for metric in METRICS
                  if metric != "seconds" and next(iter(by_setting.values())).get(metric) is not None}
            for key, by_setting in finals.items()}
    ratios = {}
    for target in plan["targets"]:
        for reference in ("T5", "T20"):
            learned, fixed = finals[f"{target}/learned/T5"], finals[f"{target}/fixed/{reference}"]
            ratios[f"{target}/gap_learned5_vs_fixed{reference[1:]}"] = cpu_settings.entry(
                {name: learned[name]["gap"] / fixed[name]["gap"] for name in settings})
    headline = {f"destruction-spread/{key}": entry["relative"] for key, entry in ratios.items()}
    for metric in ("gap", "w1"):
        headline[f"destruction-spread/largest_run_{metric}"] = max(run[metric]["relative"] for run in runs.values())
    return {"runs": runs, "ratios": ratios}, headline


def measure_spread(args, plan: dict, overrides: dict, base, start: float) -> dict:
    """--spread: the runs under each CPU setting (two settings and GMM25 alone with --quick), written as
    destruction-spread[-quick].json; returns the headline."""
    settings = cpu_settings.quick_settings() if args.quick else cpu_settings.SETTINGS
    if args.quick:
        plan = {**plan, "targets": plan["targets"][:1]}
    measured, headline = spread(plan, overrides, settings, start)
    record = {"plan": plan, "seed": 0, "config": dataclasses.asdict(base), "settings": settings, "machine": cpu_settings.machine(), **measured}
    write_results(args.out, "destruction-spread-quick" if args.quick else "destruction-spread", record, headline, start)
    return headline


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 30 iterations, T in 5, 20: a smoke run")
    parser.add_argument("--spread", action="store_true", help="seed 0 of the headline's runs under each CPU setting")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="folder for the JSON and plot")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small MLPs: one thread is fastest; the machine is shared
    plan = PLANS["quick" if args.quick else "full"]
    overrides = {key: plan[key] for key in RUN_SETTINGS if key in plan}
    base = adaptive_destruction.SamplerConfig(**overrides)
    start = time.time()
    if args.spread:
        return measure_spread(args, plan, overrides, base, start)
    print(f"destruction benchmark: {'quick' if args.quick else 'full'}, {base.iterations} iterations a run, "
          f"seeds {plan['seeds']}, torch threads {torch.get_num_threads()}", flush=True)
    results, curves = {}, {}
    for target in plan["targets"]:
        for destruction in ("fixed", "learned"):
            for steps in plan["steps"]:
                runs = [run(dataclasses.replace(base, target=target, destruction=destruction, num_steps=steps, seed=seed))
                        for seed in plan["seeds"]]
                results[f"{target}/{destruction}/T{steps}"] = {"summary": summarise(runs), "runs": [r["final"] for r in runs]}
                curves[(target, destruction, steps)] = [r["curve"] for r in runs]
                summary = results[f"{target}/{destruction}/T{steps}"]["summary"]
                print(f"{target} {destruction} T={steps}: gap {summary['gap'][0]:.3f} ± {summary['gap'][1]:.3f}, "
                      f"log Z error {summary['log_Z_error'][0]:+.3f} ({time.time() - start:.0f}s)", flush=True)
    ablation = {}
    if plan["ablation"]:
        for name, changes in ABLATION.items():
            runs = [run(dataclasses.replace(base, target="gmm25", num_steps=5, seed=seed, **changes)) for seed in plan["seeds"]]
            ablation[name] = {"summary": summarise(runs), "runs": [r["final"] for r in runs]}
            print(f"ablation gmm25 T=5 {name}: gap {ablation[name]['summary']['gap'][0]:.3f} ({time.time() - start:.0f}s)",
                  flush=True)

    header = "| destruction, T | ELBO | EUBO | EUBO - ELBO | log Z_hat - log Z | W1 | modes | s/run | diverged |"
    for target in plan["targets"]:
        print(f"\n{target} (mean ± std over {len(plan['seeds'])} seeds)\n{header}\n|" + "---|" * 9)
        for destruction in ("fixed", "learned"):
            for steps in plan["steps"]:
                print(row(f"{destruction}, {steps}", results[f"{target}/{destruction}/T{steps}"]["summary"]))
    if ablation:
        print(f"\nablation: gmm25, T = 5 (TB, all stabilisers, unless named)\n{header.replace('destruction, T', 'variant')}\n|"
              + "---|" * 9)
        for name, entry in [("fixed", results["gmm25/fixed/T5"]), ("learned", results["gmm25/learned/T5"]), *ablation.items()]:
            print(row(name, entry["summary"]))

    headline = {}
    for target in plan["targets"]:
        gap = {key: results[f"{target}/{key}"]["summary"]["gap"][0] for key in ("learned/T5", "fixed/T5", "fixed/T20")}
        headline[f"{target}/gap_learned5_vs_fixed5"] = gap["learned/T5"] / gap["fixed/T5"]
        headline[f"{target}/gap_learned5_vs_fixed20"] = gap["learned/T5"] / gap["fixed/T20"]
        headline[f"{target}/logz_error_learned5"] = results[f"{target}/learned/T5"]["summary"]["abs_log_Z_error"][0]
    headline["diverged_runs"] = sum(entry["summary"]["diverged"] for entry in [*results.values(), *ablation.values()])
    print()
    for target in ("gmm25", "funnel"):
        for key, goal in GOALS.items():
            value = headline[f"{target}/{key}"]
            print(f"goal {target}/{key} <= {goal}: measured {value:.3f} -> {'met' if value <= goal else 'MISSED'}")
    value = headline["gmm25/logz_error_learned5"]
    print(f"goal gmm25/logz_error_learned5 <= 0.1: measured {value:.3f} -> {'met' if value <= 0.1 else 'MISSED'}")
    print(f"goal no divergence: {headline['diverged_runs']} diverged runs -> {'met' if headline['diverged_runs'] == 0 else 'MISSED'}")

    os.makedirs(args.out, exist_ok=True)
    name = "destruction-quick" if args.quick else "destruction"
    plot(curves, plan, os.path.join(args.out, f"{name}.png"))
    record = {"plan": plan, "config": dataclasses.asdict(base), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "results": results, "ablation": ablation,
              "curves": {f"{t}/{d}/T{k}": runs for (t, d, k), runs in curves.items()}}
    write_results(args.out, name, record, headline, start)
    return headline


if __name__ == "__main__":
    main()
