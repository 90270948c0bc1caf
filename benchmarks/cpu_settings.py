"""What differs between CPUs, switched on one machine: the settings under which benchmarks/spread.py (the
quickstart, and an adversarial fine-tune with --gan), related/benchmarks/dsd.py --spread (DSD) and
related/benchmarks/destruction.py --spread (adaptive destruction) measure how far their numbers move to another CPU.

A CPU changes the numbers through the kernels that PyTorch, oneDNN and MKL pick for it, and through the
thread count: ATEN_CPU_CAPABILITY (PyTorch's own vectorised kernels: default = no SIMD, avx2, avx512),
DNNL_MAX_CPU_ISA (oneDNN's convolutions), MKL_ENABLE_INSTRUCTIONS and MKL_CBWR (MKL's matrix products),
OMP_NUM_THREADS. Each is read when a process starts, so every setting runs in a subprocess of its own.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.report import cpu_name

ROOT = Path(__file__).resolve().parent.parent

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
SETTINGS = {  # name -> environment on top of the machine's own (native kernels, 2 threads)
    "native, 2 threads": {},
    "native, 1 thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "ATEN_CPU_CAPABILITY=default": {"ATEN_CPU_CAPABILITY": "default"},
    "DNNL_MAX_CPU_ISA=AVX2": {"DNNL_MAX_CPU_ISA": "AVX2"},
    "MKL_CBWR=COMPATIBLE": {"MKL_CBWR": "COMPATIBLE"},
    "an AVX2-only CPU (all three capped)": AVX2,
}


def quick_settings() -> dict:
    """The first and the last setting: a smoke run's two."""
    return dict(list(SETTINGS.items())[::len(SETTINGS) - 1])


def environment(setting: dict) -> dict:
    """The machine's environment with 2 threads (CI's), hub offline, then the setting's variables."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")}
    return {**env, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", **setting}


def relative_spread(values: list[float]) -> float:
    """(max - min) / max |value|; 0 when every value is 0."""
    largest_value = max(abs(value) for value in values)
    return (max(values) - min(values)) / largest_value if largest_value else 0.0


def entry(values: dict[str, float]) -> dict:
    """One quantity measured under several settings: its values by setting, and their relative spread."""
    return {"values": values, "relative": relative_spread(list(values.values()))}


def across(runs: dict, value) -> dict:
    """entry() of value(run) for the run of each setting in `runs` (setting name -> what the run returned)."""
    return entry({name: value(run) for name, run in runs.items()})


def run_script(script: str, args: list[str], setting: dict) -> dict:
    """`python <script> <args>` (a path from the repository root) in a fresh process under `setting`: the JSON
    object its last line prints. A failed run ends the benchmark with its stderr."""
    completed = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=environment(setting),
                               capture_output=True, text=True)
    if completed.returncode != 0:
        sys.exit(f"{script} {' '.join(args)} failed ({completed.returncode}) under {setting}:\n"
                 f"{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def machine() -> dict:
    """What a record names the machine by: its CPU, torch, and the kernels torch picks natively."""
    return {"cpu": cpu_name(), "python": platform.python_version(),
            "torch": f"{torch.__version__}, native kernels {torch.backends.cpu.get_cpu_capability()}"}
