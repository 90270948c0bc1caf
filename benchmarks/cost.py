"""benchmarks/cost.py — what unrolling the sampler costs, measured in one run.

For T in 1, 2, 4, 8 on the toy UNet of train_toy.py, interleaved over repeats (medians reported):
  - wall time of one end-to-end training step (unrolled sampler forward, loss, backward, AdamW step):
    plain, per-step checkpointed ("ckpt": the whole step recomputed), selectively checkpointed ("sel":
    the outputs of convolutions and matmuls kept, the norms and activations between them recomputed;
    selective_checkpoint.SELECTIVE_SAVE_OPS), and truncated to the last step (DRaFT-K with K = 1);
  - the floor: T standard diffusion training steps at the same batch (an unrolled step does
    T forwards and T backwards, like T single steps);
  - peak memory of each: each configuration runs in a fresh subprocess (CPU: the RSS high-water
    mark, reset after setup through /proc/self/clear_refs, above the RSS after setup; CUDA:
    max_memory_allocated above the setup level),
    plus the exact bytes of activations autograd holds for the backward pass: "saved" as
    saved_tensors_hooks sees them, and "held" as benchmarks/scale.py counts them (every tensor the
    forward creates and leaves alive for backward — it also sees what a selective checkpoint keeps,
    which bypasses the hooks);
    on CPU with glibc, every probe runs a second time with MALLOC_MMAP_THRESHOLD_=65536, so that
    every freed block of 64 KiB or more goes back to the OS at once: the RSS high-water mark then
    follows the live tensors, not the pages the allocator keeps for reuse ("mmap" columns);
  - sampling: T-step sampling against T bare network calls on the same input (the sampler's overhead).

    python benchmarks/cost.py            # full mode: 32x32x3 UNet (CIFAR-sized), batch 32, 5 repeats
    python benchmarks/cost.py --quick    # 16x16x1 UNet, batch 16, T in 1, 2, 4, 2 repeats (a smoke run)

Writes benchmarks/results/cost[-quick].json and cost[-quick].png; the last line printed is one JSON
object with the headline ratios (cost_ratio_T4_plain, cost_ratio_T4_ckpt, mem_ratio_T4_ckpt,
sampler_overhead, cost_ratio_T4_selective, mem_ratio_T4_selective). Goals (benchmarks/README.md's cost
section): cost_ratio_T4_plain <= 1.10, cost_ratio_T4_ckpt <= 1.45, mem_ratio_T4_ckpt <= 1.3,
sampler_overhead <= 0.05; selective checkpointing at T = 4: time <= 1.20 x four single steps
(cost_ratio_T4_selective) and held activations <= 2.0 x those of one plain step, T = 1
(mem_ratio_T4_selective). Goals are reported, never tuned for.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

import e2ediff
from benchmarks.counters import SETUPS, TensorMemory
from benchmarks.report import write_results
from train_utils import descend, select_device
from toy_nets import UNet


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("plain", "ckpt", "sel", "trunc", "floor")
# glibc's malloc: freed blocks >= this size are unmapped at once (fixing it also stops glibc raising it).
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


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
    """One end-to-end step (plain / ckpt / sel / trunc), or T standard diffusion steps (floor)."""
    if mode == "floor":
        for _ in range(num_steps):
            loss = e2ediff.diffusion_loss(model, target, schedule).mean()
            descend(optimizer, loss)
        return
    config = e2ediff.EndToEndConfig(num_steps=num_steps, update="ddim", lpips_weight=0.0, grad_checkpoint=mode in ("ckpt", "sel"),
                                    checkpoint_policy="selective" if mode == "sel" else "full",
                                    backprop_steps=1 if mode == "trunc" else 0)
    loss = e2ediff.EndToEndLoss(model, schedule, config)(z_T, target, step=0)[0]  # Alg. 1 lines 7-13
    descend(optimizer, loss)


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


def minor_faults() -> int:
    """Page faults served without I/O so far (mostly: the kernel handing this process fresh zeroed pages)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure_time(setup: str, steps_list, repeats: int, device) -> dict:
    """Median seconds per call of every configuration; for the training steps also the median
    number of minor page faults per step ("faults_<mode>_T<k>"), which tells time spent mapping
    fresh memory apart from compute."""
    model, optimizer, schedule, z_T, target = build(setup, device)
    train_step("plain", 1, model, optimizer, schedule, z_T, target)  # warm-up
    times = {f"{prefix}{mode}_T{k}": [] for prefix in ("", "faults_") for mode in MODES for k in steps_list}
    times.update({f"{kind}_T{k}": [] for kind in ("sample", "bare") for k in steps_list})
    for _ in range(repeats):
        for k in steps_list:  # interleaved: every configuration once per repeat
            for mode in MODES:
                faults = minor_faults()
                times[f"{mode}_T{k}"].append(time_call(lambda: train_step(mode, k, model, optimizer, schedule, z_T, target), device))
                times[f"faults_{mode}_T{k}"].append(minor_faults() - faults)
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
    """Run in a fresh process: peak memory of one step above the post-setup level, the bytes of tensors
    autograd saves for backward during it (saved_tensors_hooks), and the bytes the forward leaves alive
    for backward (TensorMemory; counted in a second step, so that its bookkeeping is not in the peak)."""
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
    held = TensorMemory()
    with held:
        train_step(mode, num_steps, model, optimizer, schedule, z_T, target)
    return {"peak_bytes": peak, "saved_bytes": sum(saved), "held_bytes": held.held or 0}


def measure_memory(setup: str, steps_list, device_name: str, env: dict | None = None) -> dict:
    """Every probe in a fresh process, with `env` added to the environment."""
    probes = [(mode, k) for k in steps_list for mode in ("plain", "ckpt", "sel", "trunc")] + [("floor", 1)]
    return {f"{mode}_T{k}": run_probe([sys.executable, os.path.abspath(__file__), "--memory-probe", f"{setup},{mode},{k}",
                                       "--device", device_name], env) for mode, k in probes}


def run_probe(command, env: dict | None = None) -> dict:
    """One memory probe in a fresh process; its last stdout line is a JSON object."""
    completed = subprocess.run(command, capture_output=True, text=True, timeout=1200, env={**os.environ, **(env or {})})
    if completed.returncode != 0:
        raise RuntimeError(f"memory probe {' '.join(command[2:])} failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def plot(steps_list, times, memory, memory_mmap, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, label in [("plain", "unrolled, plain"), ("ckpt", "unrolled, checkpointed"), ("sel", "unrolled, selective checkpoint"),
                        ("trunc", "unrolled, truncated (K=1)"), ("floor", "T single steps (floor)")]:
        left.plot(steps_list, [times[f"{mode}_T{k}"] for k in steps_list], marker="o", label=label)
    left.set(xlabel="T (sampler steps)", ylabel="seconds per training step", xscale="log", yscale="log", title="time")
    left.set_xticks(steps_list, [str(k) for k in steps_list])
    left.set_xticks([], minor=True)
    left.legend(fontsize=8)
    for mode, label in [("plain", "plain"), ("ckpt", "checkpointed"), ("sel", "selective"), ("trunc", "truncated (K=1)")]:
        line, = right.plot(steps_list, [memory[f"{mode}_T{k}"]["peak_bytes"] / 2**20 for k in steps_list], marker="o", label=label)
        if memory_mmap:
            right.plot(steps_list, [memory_mmap[f"{mode}_T{k}"]["peak_bytes"] / 2**20 for k in steps_list], marker="x",
                       linestyle="--", color=line.get_color(), label=f"{label}, freed memory returned at once")
    right.set(xlabel="T (sampler steps)", ylabel="peak memory above setup (MiB)", xscale="log", title="memory")
    right.set_xticks(steps_list, [str(k) for k in steps_list])
    right.set_xticks([], minor=True)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_table(steps_list, times, memory, memory_mmap) -> None:
    """The per-T table: seconds per step of each mode, its ratio to the floor, peak and held memory, page faults."""
    trained = ("plain", "ckpt", "sel")
    header = ([f"{m} (s)" for m in (*trained, "trunc", "floor")] + [f"{m}/floor" for m in trained]
              + [f"peak MiB {m}" for m in trained] + [f"peak MiB {m} (mmap)" for m in trained]
              + [f"held MiB {m}" for m in trained] + ["sampling (s)", "T bare calls (s)", "faults/step plain", "faults/step floor"])
    print("\n| T | " + " | ".join(header) + " |\n|" + "---|" * (len(header) + 1))
    for k in steps_list:
        def mib(mode, field, probes=memory):
            return f"{probes[f'{mode}_T{k}'][field] / 2**20:.1f}" if probes else "-"
        cells = ([f"{times[f'{m}_T{k}']:.3f}" for m in (*trained, "trunc", "floor")]
                 + [f"{times[f'{m}_T{k}'] / times[f'floor_T{k}']:.2f}" for m in trained]
                 + [mib(m, "peak_bytes") for m in trained] + [mib(m, "peak_bytes", memory_mmap) for m in trained]
                 + [mib(m, "held_bytes") for m in trained]
                 + [f"{times[f'sample_T{k}']:.4f}", f"{times[f'bare_T{k}']:.4f}", f"{times[f'faults_plain_T{k}']:.0f}",
                    f"{times[f'faults_floor_T{k}']:.0f}"])
        print(f"| {k} | " + " | ".join(cells) + " |")


def print_goals(headline, times, memory_mmap) -> None:
    """Each goal against its measured headline value, and what the page faults and the mmap probes say."""
    goals = {"cost_ratio_T4_plain": 1.10, "cost_ratio_T4_ckpt": 1.45, "mem_ratio_T4_ckpt": 1.3, "sampler_overhead": 0.05,
             "cost_ratio_T4_selective": 1.20, "mem_ratio_T4_selective": 2.0}
    print()
    for key, goal in goals.items():
        print(f"goal {key} <= {goal}: measured {headline[key]:.3f} -> {'met' if headline[key] <= goal else 'MISSED'}")
    print(f"  minor page faults per step at T = 4 (medians): plain {times['faults_plain_T4']:.0f}, "
          f"checkpointed {times['faults_ckpt_T4']:.0f}, floor {times['faults_floor_T4']:.0f} "
          f"(each fault maps one fresh page: time the kernel spends, not the network)")
    if memory_mmap:
        mmap_ratio = headline["mem_ratio_T4_ckpt_mmap"]
        print(f"  the same with {' '.join(f'{k}={v}' for k, v in MMAP_ENV.items())} (freed blocks go back to the OS at once): "
              f"checkpointed peak memory T4/T1 = {mmap_ratio:.3f}")
        if headline["mem_ratio_T4_ckpt"] > goals["mem_ratio_T4_ckpt"] >= mmap_ratio:
            print("  -> mem_ratio_T4_ckpt is missed only with glibc's default allocator: the excess is freed memory "
                  "the allocator keeps for reuse, not tensors alive at the peak")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small UNet, T in 1, 2, 4, 2 repeats: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (median reported); default 5, quick 3")
    parser.add_argument("--steps", default=None, help="the values of T to measure; default 1,2,4,8, quick 1,2,4")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="folder for the JSON and plot")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # internal: one memory measurement
    args = parser.parse_args(argv)
    device = select_device(args.device)
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
    # CPU + glibc: the same probes with freed blocks returned to the OS at once (live memory, not retained pages)
    glibc_cpu = device.type == "cpu" and platform.libc_ver()[0] == "glibc"
    memory_mmap = measure_memory(setup, steps_list, args.device, MMAP_ENV) if glibc_cpu else None

    print_table(steps_list, times, memory, memory_mmap)
    headline = {
        "cost_ratio_T4_plain": times["plain_T4"] / times["floor_T4"],
        "cost_ratio_T4_ckpt": times["ckpt_T4"] / times["floor_T4"],
        "mem_ratio_T4_ckpt": memory["ckpt_T4"]["peak_bytes"] / max(memory["ckpt_T1"]["peak_bytes"], 1),
        "mem_ratio_T4_plain": memory["plain_T4"]["peak_bytes"] / max(memory["plain_T1"]["peak_bytes"], 1),
        "saved_ratio_T4_plain": memory["plain_T4"]["saved_bytes"] / memory["plain_T1"]["saved_bytes"],
        "sampler_overhead": statistics.median(times[f"sample_T{k}"] / times[f"bare_T{k}"] - 1 for k in steps_list),
        "cost_ratio_T4_selective": times["sel_T4"] / times["floor_T4"],
        # against one plain step's activations: what an ordinary training step holds
        "mem_ratio_T4_selective": memory["sel_T4"]["held_bytes"] / memory["plain_T1"]["held_bytes"],
    }
    if memory_mmap:
        headline["mem_ratio_T4_ckpt_mmap"] = memory_mmap["ckpt_T4"]["peak_bytes"] / max(memory_mmap["ckpt_T1"]["peak_bytes"], 1)
    print_goals(headline, times, memory_mmap)
    os.makedirs(args.out, exist_ok=True)
    name = "cost-quick" if args.quick else "cost"
    plot(steps_list, times, memory, memory_mmap, os.path.join(args.out, f"{name}.png"))
    record = {"setup": setup, "image_shape": shape, "batch": batch, "params": params, "device": str(device), "repeats": repeats,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "median_seconds": times, "memory": memory,
              "memory_mmap": memory_mmap, "mmap_env": MMAP_ENV if memory_mmap else None}
    write_results(args.out, name, record, headline, start)
    return headline


if __name__ == "__main__":
    main()
