"""benchmarks/critic_warmup.py — how long must a critic warm up before it sees a good student?

The critic study (quality.py --study critic) gave every critic CRITIC_WARMUP_STEPS = 200 critic-only steps. Against
the diffusion base's 4-step samples that was plenty (held-out AUC 0.997 for the PatchGAN, 0.957 for the base-feature
critic, on the reporting seeds); against the distilled LCM's, which are close to the data, it left every critic at
0.59-0.67, short of the issue's 0.8. This probe trains each critic alone against a frozen student for
WARMUP_STEPS[critic] steps and logs its held-out AUC every LOG_EVERY steps (toy_training.CriticHealth: 256
held-out real digits against the student's samples from fixed noise): how many steps each critic needs to reach
AUC_GOAL, or where it levels off (each curve's mean and std over its last half), and how far the held-out batch
alone moves an AUC near the goal (critics.auc_standard_error).

The setting is the critic study's (quality.CRITIC_TERM: its GAN weight and CRITIC_DISC_STEPS critic updates per
step; the toy's PatchGAN or the base-feature critic, quality.BASEFEAT), at 4 NFE, on tuning seed 100 against the
validation split: a warm-up length is a tuning choice, never made on the test split. Students, all frozen: the
diffusion base through 4-step DDIM, the LCM through its own update, the LCM through deterministic DDIM. Each run is a
fine-tune whose warm-up is all but its last step; that one generator step is ignored.

    python benchmarks/critic_warmup.py --work W   # -> results/critic_warmup.json; W may already hold seed 100's base
                                                  #    (quality.py --study critic --pilot --work W makes it)
    python benchmarks/critic_warmup.py --quick    # tiny step counts: a smoke run (-quick file)

--stronger asks the next question: is it the critic's length of training that falls short against the LCM, or
the critic itself? The study's PatchGAN and three stronger ones, one change each (STRONGER: 4x wider, 3x the
learning rate, 4x the batch), each warmed up for STRONGER_STEPS against the two LCM students:

    python benchmarks/critic_warmup.py --stronger --work W   # -> results/critic_warmup-stronger.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time

import numpy as np
import torch

import toy_training
from benchmarks import quality
from benchmarks.report import write_results
from critics import auc_standard_error
from train_utils import changed

# 15 and 5 times the critic study's CRITIC_WARMUP_STEPS: a first run of 1,000 steps each left the PatchGAN still
# rising against the LCM (0.75-0.78), the base-feature critic level from step 500 on (0.71-0.72) at twice the cost
WARMUP_STEPS = {"PatchGAN": 3000, "basefeat": 1000}
LOG_EVERY = 50
AUC_GOAL = 0.8  # issue 32: a critic's held-out AUC at the end of its warm-up
SEED = quality.PROTOCOL["tuning_seeds"][0]
STUDENTS = {  # the frozen student whose samples are the critic's fakes, and the learning rate its recipe would use
    "base DDIM": dict(finetune_lr=quality.TUNED["teacher_lr"]),
    "LCM": dict(base="lcm", lcm_update="lcm", finetune_lr=quality.TUNED["lcm_lr"]),
    quality.LCM_DDIM: dict(base="lcm", lcm_update="ddim", finetune_lr=quality.TUNED["lcm_lr"]),
}
CRITICS = {"PatchGAN": {}, "basefeat": quality.BASEFEAT}
# --stronger: the study's PatchGAN (64 channels, one strided layer, the most that fits 8x8 digits; lr 1e-3, batch 64)
# and one change each. The batch is the fine-tune's (its critic's real and fake batches), unused by a frozen student.
STRONGER = {"PatchGAN": {}, "PatchGAN 256 wide": dict(disc_channels=256), "PatchGAN lr 3e-3": dict(disc_lr=3e-3),
            "PatchGAN batch 256": dict(finetune_batch_size=256)}
STRONGER_STEPS = 1000  # the length of the PatchGAN's first probe, where it stood at 0.75-0.78 against the LCM, rising
STRONGER_STUDENTS = ("LCM", quality.LCM_DDIM)


def probe(plan, work, student, critic, critic_fields, warmup, log_every) -> dict:
    """One critic (`critic_fields` over the study's) warmed up against one student:
    {"student", "critic", "curve": [[step, AUC], ...], "seconds"}."""
    torch.set_num_threads(1)
    name = f"warmup{warmup}-{critic}-{student}".replace(" ", "-")
    log = os.path.join(work, "logs", f"{name}.log")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    fields = {"coupling": "teacher", **quality.CRITIC_TERM, **critic_fields, **STUDENTS[student],
              "critic_warmup_steps": warmup, "finetune_steps": warmup + 1}
    folder = quality.recipe_folder(work, "validation", SEED, name)
    config = changed(quality.digits_config(plan, SEED, "validation", folder, nfe=(4,), **fields), log_every=log_every)
    if config.e2e.critic_warmup_steps != warmup:
        raise ValueError(f"{name}: the warm-up is {config.e2e.critic_warmup_steps} steps, not {warmup}")
    data = toy_training.build_dataset(config)
    with open(log, "w") as stream:
        sys.stdout = sys.stderr = stream
        try:
            toy_training.finetune(config, data, torch.device("cpu"))
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    stage = toy_training.finetune_name(config, 4)
    with open(os.path.join(folder, "metrics.jsonl")) as file:
        rows = [row for row in map(json.loads, file) if row.get("stage") == stage and "critic_auc" in row]
    warmed = [row for row in rows if row["step"] <= config.e2e.critic_warmup_steps]
    return {"student": student, "critic": critic, "warmup_steps": warmup,
            "curve": [[row["step"], row["critic_auc"]] for row in warmed], "seconds": warmed[-1]["seconds"],
            "auc_samples": toy_training.critic_auc_samples(data)}


def headline(results: list) -> dict:
    """Per critic and student: the first logged step at which the AUC reaches AUC_GOAL (None: never within the
    warm-up), the AUC at the critic study's warm-up length and at the end of this one, and its mean and standard
    deviation over the last half of the warm-up (how much it moves from step to step once level). And how far an
    AUC near the goal would move on another held-out batch of the size measured (critics.auc_standard_error): the
    same batch at every step, so a curve's points share that error."""
    values = {}
    for result in results:
        prefix, curve = f"{result['critic']}/{result['student']}", dict(map(tuple, result["curve"]))
        values[f"{prefix}/steps_to_goal"] = next((step for step, auc in sorted(curve.items()) if auc >= AUC_GOAL), None)
        values[f"{prefix}/auc_at_study_warmup"] = curve.get(min(quality.CRITIC_WARMUP_STEPS, result["warmup_steps"]))
        values[f"{prefix}/auc_final"] = curve[max(curve)]
        last_half = [auc for step, auc in curve.items() if step > result["warmup_steps"] / 2]
        values[f"{prefix}/auc_last_half_mean"] = float(np.mean(last_half))
        values[f"{prefix}/auc_last_half_std"] = float(np.std(last_half))
    (samples,) = {result["auc_samples"] for result in results}
    values["auc_standard_error_at_goal"] = auc_standard_error(AUC_GOAL, samples, samples)
    return values


def plot(results: list, path: str, by: str = "critic") -> None:
    """Held-out AUC against critic-only steps, one panel per critic (or per student: by="student"), one line per
    student (or critic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    line = "student" if by == "critic" else "critic"
    panels = list(dict.fromkeys(result[by] for result in results))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, panel in zip(axes, panels):
        for result in (r for r in results if r[by] == panel):
            steps, aucs = zip(*result["curve"])
            ax.plot(steps, aucs, marker=".", label=result[line])
        ax.axhline(AUC_GOAL, color="grey", linestyle="--", linewidth=1)
        ax.axvline(quality.CRITIC_WARMUP_STEPS, color="grey", linestyle=":", linewidth=1)
        ax.set(title=panel if by == "critic" else f"against the {panel}", xlabel="critic-only steps", ylim=(0.4, 1.02))
    axes[0].set_ylabel("held-out AUC (validation)")
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny base, 1 warm-up step each: a smoke run")
    parser.add_argument("--stronger", action="store_true", help="the study's PatchGAN and three stronger ones "
                        f"(STRONGER) against the LCM's students for {STRONGER_STEPS} steps -> critic_warmup-stronger.json")
    parser.add_argument("--out", default=quality.RESULTS, help="folder for the JSON")
    parser.add_argument("--work", default=None, help="folder for the checkpoints, kept (seed 100's base is reused "
                        "from it when there); default a temporary one, deleted after")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="one-thread worker processes")
    args = parser.parse_args(argv)
    start = time.time()
    plan = {**quality.PLANS["quick" if args.quick else "full"], "nfe": (4,)}
    critics, students = (STRONGER, STRONGER_STUDENTS) if args.stronger else (CRITICS, tuple(STUDENTS))
    steps = {critic: STRONGER_STEPS for critic in STRONGER} if args.stronger else WARMUP_STEPS
    warmup, log_every = ({critic: 1 for critic in critics}, 1) if args.quick else (steps, LOG_EVERY)
    work, temporary, reused = quality.work_folder(args.work, "critic-warmup-")
    os.makedirs(args.out, exist_ok=True)
    print(f"critic warm-up probe: seed {SEED}, validation split, critic-only steps {warmup}, work folder {work}",
          flush=True)
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        pool.apply(quality.run_job, (quality.prepare_jobs(plan, (SEED,), "validation", work, ("digits",), lcm=True,
                                                          couplings=("teacher",))[0],))
        jobs = [(plan, work, student, critic, fields, warmup[critic], log_every)
                for critic, fields in critics.items() for student in students]
        results = pool.starmap(probe, jobs)
        pool.close()
        pool.join()
    if temporary is not None:
        temporary.cleanup()
    for result in results:
        print(f"{result['critic']:>9} vs {result['student']:<17} AUC " + " ".join(f"{auc:.2f}" for _, auc in result["curve"]))
    record = {"mode": "quick" if args.quick else "full", "seed": SEED, "split": "validation", "nfe": 4,
              "critics": critics, "warmup_steps": warmup, "log_every": log_every, "auc_goal": AUC_GOAL,
              "study_warmup_steps": quality.CRITIC_WARMUP_STEPS, "critic_term": quality.CRITIC_TERM,
              "torch": torch.__version__, "cores": os.cpu_count(), "results": results,
              **({"reused_work": "wall_seconds is this run's alone: runs already finished in --work were read, not "
                                 "trained again (each run's own time: its seconds)"} if reused else {})}
    values = headline(results)
    name = "critic_warmup" + ("-stronger" if args.stronger else "") + ("-quick" if args.quick else "")
    plot(results, os.path.join(args.out, f"{name}.png"), by="student" if args.stronger else "critic")
    write_results(args.out, name, record, values, start)
    return values


if __name__ == "__main__":
    main()
