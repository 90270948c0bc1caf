"""benchmarks/cost.py — what unrolling the sampler costs, measured in one run.

For T in 1, 2, 4, 8 on the toy UNet of train_toy.py, interleaved over repeats (medians reported):
  - wall time of one end-to-end training step (unrolled sampler forward, loss, backward, AdamW step):
    plain, per-step checkpointed, and truncated to the last step (DRaFT-K with K = 1);
  - the floor: T standard diffusion training steps at the same batch (NOTES section 4: an unrolled
    step does T forwards and T backwards, like T single steps);
  - peak memory of each: each configuration runs in a fresh subprocess (CPU: the RSS high-water
    mark, reset after setup through /proc/self/clear_refs, above the RSS after setup; CUDA:
    max_memory_allocated above the setup level),
    plus the exact bytes of activations autograd holds for the backward pass (saved tensors);
  - sampling: T-step sampling against T bare network calls on the same input (the sampler's overhead).

    python benchmarks/cost.py            # full mode: 32x32x3 UNet (CIFAR-sized), batch 32, 5 repeats
    python benchmarks/cost.py --quick    # 16x16x1 UNet, batch 16, T in 1, 2, 4, 2 repeats (a smoke run)

Writes benchmarks/results/cost[-quick].json and cost[-quick].png; the last line printed is one JSON
object with the headline ratios (cost_ratio_T4_plain, cost_ratio_T4_ckpt, mem_ratio_T4_ckpt,
sampler_overhead). Goals (issue 6): cost_ratio_T4_plain <= 1.10, cost_ratio_T4_ckpt <= 1.45,
mem_ratio_T4_ckpt <= 1.3, sampler_overhead <= 0.05. Goals are reported, never tuned for.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import e2ediff  # noqa: E402
from report import write_results  # noqa: E402
from train_toy import UNet  # noqa: E402

SETUPS = {  # name -> (image shape, UNet kwargs, batch)
    "cifar": ((3, 32, 32), dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2), 32),
    "quick": ((1, 16, 16), dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1), 16),
}
MODES = ("plain", "ckpt", "trunc", "floor")


def build(setup: str, device: torch.device, seed: int = 0):
    """Model, optimiser, schedule and a fixed batch (z_T, target) for one setup."""
    shape, kwargs, batch = SETUPS[setup]
    torch.manual_seed(seed)
    model = UNet(shape[0], **kwargs).to(device)
    for p in model.parameters():  # the UNet zero-initialises its output conv; give it real weights
        if p.dim() > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    schedule = e2ediff.make_schedule("linear", zero_terminal_snr=True).to(device)
    generator = torch.Generator().manual_seed(seed)
    z_T = torch.randn(batch, *shape, generator=generator).to(device)
    target = torch.randn(batch, *shape, generator=generator).clamp(-1, 1).to(device)
    return model, optimizer, schedule, z_T, target


def train_step(mode: str, num_steps: int, model, optimizer, schedule, z_T, target) -> None:
    """One end-to-end step (plain / ckpt / trunc), or T standard diffusion steps (floor)."""
    if mode == "floor":
        for _ in range(num_steps):
            loss = e2ediff.diffusion_loss(model, target, schedule).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return
    loss, _, _ = e2ediff.end_to_end_loss(model, z_T, target, schedule, num_steps, loss_weights={"l2": 1.0},
                                         checkpoint=mode == "ckpt", backprop_steps=1 if mode == "trunc" else None)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def bare_calls(model, schedule, z, num_steps) -> None:
    """T network calls on the same input, nothing else: what sampling cannot go below."""
    for t in e2ediff.sampling_timesteps(schedule.num_train_timesteps, num_steps).tolist():
        model(z, torch.full((z.shape[0],), t, device=z.device, dtype=torch.long), None)


def measure_time(setup: str, steps_list, repeats: int, device) -> dict:
    model, optimizer, schedule, z_T, target = build(setup, device)
    train_step("plain", 1, model, optimizer, schedule, z_T, target)  # warm-up
    times = {f"{mode}_T{k}": [] for mode in MODES for k in steps_list}
    times.update({f"{kind}_T{k}": [] for kind in ("sample", "bare") for k in steps_list})
    for _ in range(repeats):
        for k in steps_list:  # interleaved: every configuration once per repeat
            for mode in MODES:
                times[f"{mode}_T{k}"].append(time_call(lambda: train_step(mode, k, model, optimizer, schedule, z_T, target), device))
            with torch.no_grad():
                times[f"sample_T{k}"].append(time_call(lambda: e2ediff.unrolled_sample(model, z_T, schedule, k), device))
                times[f"bare_T{k}"].append(time_call(lambda: bare_calls(model, schedule, z_T, k), device))
    return {name: statistics.median(values) for name, values in times.items()}


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Linux >= 4.0: writing 5 to clear_refs resets the process's RSS high-water mark (VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024


def measure_memory_here(setup: str, mode: str, num_steps: int, device) -> dict:
    """Run in a fresh process: peak memory of one step above the post-setup level, and the bytes
    of tensors autograd saves for backward during it."""
    model, optimizer, schedule, z_T, target = build(setup, device)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        baseline = current_rss_bytes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        train_step(mode, num_steps, model, optimizer, schedule, z_T, target)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = peak_rss_bytes() - baseline
    return {"peak_bytes": peak, "saved_bytes": sum(saved)}


def measure_memory(setup: str, steps_list, device_name: str) -> dict:
    results = {}
    for k in steps_list:
        for mode in ("plain", "ckpt", "trunc"):
            command = [sys.executable, os.path.abspath(__file__), "--memory-probe", f"{setup},{mode},{k}", "--device", device_name]
            results[f"{mode}_T{k}"] = run_probe(command)
    results["floor_T1"] = run_probe([sys.executable, os.path.abspath(__file__), "--memory-probe", f"{setup},floor,1", "--device", device_name])
    return results


def run_probe(command) -> dict:
    """One memory probe in a fresh process; its last stdout line is a JSON object."""
    completed = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    if completed.returncode != 0:
        raise RuntimeError(f"memory probe {' '.join(command[2:])} failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def plot(steps_list, times, memory, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, label in [("plain", "unrolled, plain"), ("ckpt", "unrolled, checkpointed"), ("trunc", "unrolled, truncated (K=1)"), ("floor", "T single steps (floor)")]:
        left.plot(steps_list, [times[f"{mode}_T{k}"] for k in steps_list], marker="o", label=label)
    left.set(xlabel="T (sampler steps)", ylabel="seconds per training step", xscale="log", yscale="log", title="time")
    left.set_xticks(steps_list, [str(k) for k in steps_list])
    left.legend(fontsize=8)
    for mode, label in [("plain", "plain"), ("ckpt", "checkpointed"), ("trunc", "truncated (K=1)")]:
        right.plot(steps_list, [memory[f"{mode}_T{k}"]["peak_bytes"] / 2**20 for k in steps_list], marker="o", label=label)
    right.set(xlabel="T (sampler steps)", ylabel="peak memory above setup (MiB)", xscale="log", title="memory")
    right.set_xticks(steps_list, [str(k) for k in steps_list])
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small UNet, T in 1, 2, 4, 2 repeats: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (median reported); default 5, quick 3")
    parser.add_argument("--steps", default=None, help="the values of T to measure; default 1,2,4,8, quick 1,2,4")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="folder for the JSON and plot")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # internal: one memory measurement
    args = parser.parse_args(argv)
    device = e2ediff.select_device(args.device)
    if args.memory_probe:
        setup, mode, k = args.memory_probe.split(",")
        print(json.dumps(measure_memory_here(setup, mode, int(k), device)))
        return {}

    setup = "quick" if args.quick else "cifar"
    steps_list = [int(k) for k in (args.steps or ("1,2,4" if args.quick else "1,2,4,8")).split(",")]
    if 4 not in steps_list or 1 not in steps_list:
        raise ValueError("--steps must include 1 and 4 (the headline ratios compare them)")
    repeats = args.repeats or (2 if args.quick else 5)
    start = time.time()
    shape, kwargs, batch = SETUPS[setup]
    params = sum(p.numel() for p in UNet(shape[0], **kwargs).parameters())
    print(f"cost benchmark: setup {setup} {shape} batch {batch}, UNet {params / 1e6:.2f}M params, device {device}, "
          f"torch threads {torch.get_num_threads()}, {repeats} repeats")
    times = measure_time(setup, steps_list, repeats, device)
    memory = measure_memory(setup, steps_list, args.device)

    print("\n| T | plain (s) | ckpt (s) | trunc K=1 (s) | floor: T steps (s) | plain/floor | ckpt/floor | ckpt/plain "
          "| peak MiB plain | peak MiB ckpt | saved MiB plain | saved MiB ckpt | sampling (s) | T bare calls (s) |")
    print("|" + "---|" * 14)
    for k in steps_list:
        mib = lambda key, field: memory[f"{key}_T{k}"][field] / 2**20  # noqa: E731
        print(f"| {k} | {times[f'plain_T{k}']:.3f} | {times[f'ckpt_T{k}']:.3f} | {times[f'trunc_T{k}']:.3f} | {times[f'floor_T{k}']:.3f} "
              f"| {times[f'plain_T{k}'] / times[f'floor_T{k}']:.2f} | {times[f'ckpt_T{k}'] / times[f'floor_T{k}']:.2f} "
              f"| {times[f'ckpt_T{k}'] / times[f'plain_T{k}']:.2f} | {mib('plain', 'peak_bytes'):.0f} | {mib('ckpt', 'peak_bytes'):.0f} "
              f"| {mib('plain', 'saved_bytes'):.1f} | {mib('ckpt', 'saved_bytes'):.1f} | {times[f'sample_T{k}']:.4f} | {times[f'bare_T{k}']:.4f} |")
    headline = {
        "cost_ratio_T4_plain": times["plain_T4"] / times["floor_T4"],
        "cost_ratio_T4_ckpt": times["ckpt_T4"] / times["floor_T4"],
        "mem_ratio_T4_ckpt": memory["ckpt_T4"]["peak_bytes"] / max(memory["ckpt_T1"]["peak_bytes"], 1),
        "mem_ratio_T4_plain": memory["plain_T4"]["peak_bytes"] / max(memory["plain_T1"]["peak_bytes"], 1),
        "saved_ratio_T4_plain": memory["plain_T4"]["saved_bytes"] / memory["plain_T1"]["saved_bytes"],
        "sampler_overhead": statistics.median(times[f"sample_T{k}"] / times[f"bare_T{k}"] - 1 for k in steps_list),
    }
    goals = {"cost_ratio_T4_plain": 1.10, "cost_ratio_T4_ckpt": 1.45, "mem_ratio_T4_ckpt": 1.3, "sampler_overhead": 0.05}
    print()
    for key, goal in goals.items():
        print(f"goal {key} <= {goal}: measured {headline[key]:.3f} -> {'met' if headline[key] <= goal else 'MISSED'}")
    os.makedirs(args.out, exist_ok=True)
    name = "cost-quick" if args.quick else "cost"
    plot(steps_list, times, memory, os.path.join(args.out, f"{name}.png"))
    record = {"setup": setup, "image_shape": shape, "batch": batch, "params": params, "device": str(device), "repeats": repeats,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "median_seconds": times, "memory": memory}
    write_results(args.out, name, record, headline, start)
    return headline


if __name__ == "__main__":
    main()
