"""benchmarks/dsd.py — Diffusion as Self-Distillation at toy scale (dsd.py), over seeds: does naive joint
training collapse the latents, does DSD avoid it and match the two-stage baseline's few-step quality with
half the parameters, and does end-to-end fine-tuning through its own sampler and decoder improve it?

    python related/benchmarks/dsd.py            # full mode: 3 seeds, dsd.Config's defaults (~5 minutes, one thread, idle 2 cores)
    python related/benchmarks/dsd.py --quick    # 1 seed, tiny step counts: a smoke run of the contract (CI)
    python related/benchmarks/dsd.py --spread   # seed 0 under each CPU setting: how far the numbers move (~18 min)

Per seed, dsd.run trains naive joint, DSD and the two-stage baseline from scratch (same network, data order,
steps, learning rate), trains the DSD objective without the latent LayerNorm (the ablation behind our reading)
and for twice the steps (as many optimiser updates as the two-stage baseline's two stages together),
fine-tunes the DSD network end to end at 4 NFE, logs the collapse indicators during training and scores DDIM
samples at 1, 2, 4, 50 NFE (CFD and pixel energy distance against the test split).
One torch thread, seeds one after another.

Writes benchmarks/results/dsd[-quick].json (every row, the histories, the summary) and dsd[-quick].png (the
indicators over training, CFD vs NFE); the last line printed is one JSON object with the headline ratios
(means over seeds, divided):
  dsd/latent_std_naive_vs_two_stage  naive's final per-dimension latent std / two-stage's   (goal <= 0.1)
  dsd/cfd4_vs_two_stage              DSD's CFD at 4 NFE / two-stage's                          (goal <= 1)
  dsd/e2e_cfd4_vs_dsd4               fine-tuned DSD's CFD at 4 NFE / DSD's                     (goal < 1)
  dsd/latent_std_dsd_vs_two_stage    DSD's final latent std / two-stage's (no collapse: near 1)
  dsd/params_dsd_vs_two_stage        DSD's parameter count / two-stage's (encoder-decoder + denoiser)
  dsd/cfd4_equal_updates_vs_two_stage  as cfd4_vs_two_stage, DSD trained 2 x steps (as many updates as both stages)
Goals are reported, never tuned for.

--spread trains and measures seed 0 (`python related/dsd.py`, the plan's budget) once under each setting of
benchmarks/cpu_settings.py, a subprocess each, and writes dsd-spread[-quick].json: per (model, NFE) and per
model's final indicator, the values under each setting and their relative spread (max - min) / max. The
headline: per model, the largest spread of each column. It says how far a row here moves on another CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch

from benchmarks import cpu_settings
from benchmarks.report import write_results
from related import dsd
from train_utils import command_line


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLANS = {
    "full": dict(seeds=(0, 1, 2), config={}),  # dsd.Config's defaults
    "quick": dict(seeds=(0,), config=dict(steps=30, log_every=10, finetune_steps=5, eval_samples=100,
                                          inversion_steps=5, nfe=(1, 4))),
}
MODELS = ("naive", "dsd", "two_stage", "dsd_no_latent_norm", "dsd_equal_updates", "dsd+e2e")
INDICATORS = ("latent_std", "effective_rank", "recon_mse")
GOALS = {"dsd/latent_std_naive_vs_two_stage": ("<=", 0.1), "dsd/cfd4_vs_two_stage": ("<=", 1.0),
         "dsd/e2e_cfd4_vs_dsd4": ("<", 1.0)}


def mean_std(values):
    values = list(values)
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def summarise(results):
    """Mean ± std over seeds: per (model, NFE) of CFD and energy; per model of the final indicators,
    parameter counts and training seconds; per (training, step) of the indicators over training."""
    quality = {f"{model}@{nfe}": {metric: mean_std(r[metric] for res in results for r in res["rows"]
                                                   if r["model"] == model and r["nfe"] == nfe)
                                  for metric in ("cfd", "energy")}
               for model in MODELS for nfe in sorted({r["nfe"] for r in results[0]["rows"]})}
    final = {model: {name: mean_std(res["final"][model][name] for res in results) for name in INDICATORS}
             for model in MODELS}
    curves = {training: [{"step": row["step"], **{name: mean_std(res["history"][training][i][name] for res in results)
                                                  for name in INDICATORS}}
                         for i, row in enumerate(results[0]["history"][training])]
              for training in results[0]["history"]}
    return {"quality": quality, "final": final, "curves": curves,
            "parameters": results[0]["parameters"],
            "seconds": {model: mean_std(res["seconds"][model] for res in results) for model in MODELS},
            "reference": {metric: mean_std(res["reference"][metric] for res in results) for metric in ("cfd", "energy")}}


def headline_ratios(summary):
    quality, final, parameters = summary["quality"], summary["final"], summary["parameters"]
    return {
        "dsd/latent_std_naive_vs_two_stage": final["naive"]["latent_std"]["mean"] / final["two_stage"]["latent_std"]["mean"],
        "dsd/cfd4_vs_two_stage": quality["dsd@4"]["cfd"]["mean"] / quality["two_stage@4"]["cfd"]["mean"],
        "dsd/e2e_cfd4_vs_dsd4": quality["dsd+e2e@4"]["cfd"]["mean"] / quality["dsd@4"]["cfd"]["mean"],
        "dsd/latent_std_dsd_vs_two_stage": final["dsd"]["latent_std"]["mean"] / final["two_stage"]["latent_std"]["mean"],
        "dsd/params_dsd_vs_two_stage": parameters["dsd"] / parameters["two_stage"],
        "dsd/cfd4_equal_updates_vs_two_stage": quality["dsd_equal_updates@4"]["cfd"]["mean"] / quality["two_stage@4"]["cfd"]["mean"],
    }


def tables(summary, nfes):
    cell = lambda s, digits: f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"  # noqa: E731
    seeds = summary["reference"]["cfd"]["n"]
    lines = [f"mean ± std over {seeds} seed(s); lower is better for CFD, energy and recon MSE",
             "| model | parameters | train s | latent std | effective rank | recon MSE |", "|---|---|---|---|---|---|"]
    for model in MODELS:
        final = summary["final"][model]
        lines.append(f"| {model} | {summary['parameters'][model]:,} | {summary['seconds'][model]['mean']:.0f} | "
                     f"{cell(final['latent_std'], 3)} | {cell(final['effective_rank'], 2)} | {cell(final['recon_mse'], 4)} |")
    for metric, digits in (("cfd", 1), ("energy", 3)):
        reference = summary["reference"][metric]
        lines += ["", f"{metric} (train split vs test: {cell(reference, digits)})",
                  "| model | " + " | ".join(f"{k} NFE" for k in nfes) + " |", "|---" * (1 + len(nfes)) + "|"]
        for model in MODELS:
            lines.append(f"| {model} | " + " | ".join(cell(summary["quality"][f"{model}@{k}"][metric], digits) for k in nfes) + " |")
    return "\n".join(lines)


def plot(summary, nfes, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 3.9))
    labels = {"naive": "naive joint", "dsd": "DSD", "two_stage": "two-stage (autoencoder stage)",
              "dsd_no_latent_norm": "DSD without latent LayerNorm"}
    for axis, name in zip(axes, INDICATORS):
        for training, curve in summary["curves"].items():
            steps = [row["step"] for row in curve]
            mean = [row[name]["mean"] for row in curve]
            std = [row[name]["std"] for row in curve]
            axis.plot(steps, mean, label=labels[training])
            axis.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.25)
        axis.set(xlabel="training step", title=name.replace("_", " "), yscale="log" if name != "effective_rank" else "linear")
    axes[0].legend(fontsize=8)
    for model in MODELS:
        cells = [summary["quality"][f"{model}@{k}"]["cfd"] for k in nfes]
        axes[3].errorbar(nfes, [c["mean"] for c in cells], [c["std"] for c in cells], marker="o", capsize=2, label=model)
    axes[3].set(xlabel="NFE (DDIM steps)", ylabel="CFD (lower is better)", xscale="log", yscale="log", title="sample quality")
    axes[3].set_xticks(nfes, [str(k) for k in nfes])
    axes[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def spread(plan: dict, settings: dict, start: float) -> tuple[dict, dict]:
    """Seed 0 under each CPU setting (a subprocess each): per (model, NFE) column and per model's final
    indicator, the values and their relative spread; the headline keeps each model's largest per column."""
    runs = {}
    for name, setting in settings.items():
        runs[name] = cpu_settings.run_script("related/dsd.py", ["--seed", "0", *command_line(plan["config"])], setting)
        print(f"[{time.time() - start:.0f}s] {name}: 4-NFE CFD " + ", ".join(
            f"{row['model']} {row['cfd']:.6g}" for row in runs[name]["rows"] if row["nfe"] == 4), flush=True)

    across, first = cpu_settings.across, next(iter(runs.values()))
    rows = {f"{row['model']}@{row['nfe']}": {metric: across(runs, lambda run: run["rows"][i][metric]) for metric in ("cfd", "energy")}
            for i, row in enumerate(first["rows"])}
    final = {model: {key: across(runs, lambda run: run["final"][model][key]) for key in INDICATORS} for model in first["final"]}
    headline = {}
    for model in final:
        for metric in ("cfd", "energy"):
            headline[f"dsd-spread/{model}/{metric}"] = max(columns[metric]["relative"] for key, columns in rows.items()
                                                           if key.split("@")[0] == model)
        for key in INDICATORS:
            headline[f"dsd-spread/{model}/{key}"] = final[model][key]["relative"]
    return {"rows": rows, "final": final}, headline


def measure_spread(args, mode: str, start: float) -> dict:
    """--spread: seed 0 under each CPU setting (two with --quick), written as dsd-spread[-quick].json;
    returns the headline."""
    plan, settings = PLANS[mode], cpu_settings.quick_settings() if args.quick else cpu_settings.SETTINGS
    measured, headline = spread(plan, settings, start)
    record = {"mode": mode, "seed": 0, "config": dataclasses.asdict(dsd.Config(seed=0, **plan["config"])),
              "settings": settings, "machine": cpu_settings.machine(), **measured}
    write_results(args.out, "dsd-spread-quick" if args.quick else "dsd-spread", record, headline, start)
    return headline


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny step counts: a smoke run")
    parser.add_argument("--spread", action="store_true", help="seed 0 under each CPU setting (benchmarks/cpu_settings.py)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="folder for the JSON and plot")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a small MLP: one thread is fastest, and leaves a core to whatever runs beside
    start, mode = time.time(), "quick" if args.quick else "full"
    plan = PLANS[mode]
    if args.spread:
        return measure_spread(args, mode, start)
    configs = [dsd.Config(seed=seed, **plan["config"]) for seed in plan["seeds"]]
    results = [dsd.run(config, log=lambda line: print(f"[{time.time() - start:.0f}s] {line}", flush=True))
               for config in configs]
    summary = summarise(results)
    nfes = list(configs[0].nfe)
    print(tables(summary, nfes))
    headline = headline_ratios(summary)
    for key, (relation, goal) in GOALS.items():
        met = headline[key] <= goal if relation == "<=" else headline[key] < goal
        print(f"goal {key} {relation} {goal}: measured {headline[key]:.3f} -> {'met' if met else 'MISSED'}")
    os.makedirs(args.out, exist_ok=True)
    name = "dsd-quick" if args.quick else "dsd"
    plot(summary, nfes, os.path.join(args.out, f"{name}.png"))
    record = {"mode": mode, "seeds": plan["seeds"], "config": dataclasses.asdict(configs[0]) | {"seed": None},
              "torch": torch.__version__, "threads": torch.get_num_threads(), "results": results, "summary": summary,
              "goals": GOALS}
    write_results(args.out, name, record, headline, start)
    return headline


if __name__ == "__main__":
    main()
