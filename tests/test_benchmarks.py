"""Smoke tests of the benchmarks' output contract: each --quick run finishes, writes its JSON and plot,
and prints as its last line one JSON object holding every headline key with a finite value.

    pytest tests/test_benchmarks.py      # about 7 minutes on 2 CPU cores (two quick benchmark runs)

They check the contract, not the numbers: a quick run is far too short for its ratios to mean anything.
"""
import json
import math
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(script, *args, timeout):
    """Run benchmarks/<script> as a subprocess; returns the JSON object on its last stdout line."""
    completed = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                               capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def assert_finite_keys(headline, keys):
    assert set(keys) <= set(headline), f"missing headline keys: {sorted(set(keys) - set(headline))}"
    not_finite = {key: headline[key] for key in keys if not math.isfinite(headline[key])}
    assert not not_finite, f"non-finite headline values: {not_finite}"


def test_cost_quick_prints_finite_headline_and_writes_results(tmp_path):
    headline = run_benchmark("cost.py", "--quick", "--steps", "1,4", "--repeats", "1", "--out", str(tmp_path), timeout=1200)
    keys = ["cost_ratio_T4_plain", "cost_ratio_T4_ckpt", "mem_ratio_T4_ckpt", "sampler_overhead"]
    if platform.libc_ver()[0] == "glibc":  # CPU + glibc: the probes also run with freed blocks returned at once
        keys.append("mem_ratio_T4_ckpt_mmap")
    assert_finite_keys(headline, keys)
    assert (tmp_path / "cost-quick.json").is_file() and (tmp_path / "cost-quick.png").is_file()


def test_quality_quick_prints_finite_headline_and_writes_results(tmp_path):
    headline = run_benchmark("quality.py", "--quick", "--out", str(tmp_path), timeout=1800)
    keys = [f"{dataset}/{ratio}" for dataset in ("ring2d", "digits") for ratio in ("e2e4_vs_base50", "e2e1_vs_base50", "e2e4_vs_base4")]
    keys += ["digits/pixel_e2e4_vs_base50", "digits/pixel_e2e1_vs_base50"]
    keys += [f"digits/e2e_from_lcm4{update}_vs_{other}" for update, other in
             [("", "lcm4"), ("", "base50"), ("_ddim", "lcm4_ddim"), ("_ddim", "base50")]]
    assert_finite_keys(headline, keys)
    record = json.loads((tmp_path / "quality-quick.json").read_text())
    table1 = {(r["model"], r["coupling"], r["nfe"]) for r in record["rows"] if r["group"] == "table1"}
    assert table1 == {("LCM", None, 4), ("LCM, DDIM update", None, 4), ("E2E from LCM", "inversion", 4),
                      ("E2E from LCM", "teacher", 4), ("E2E from LCM, DDIM update", "inversion", 4)}
    digits = [r for r in record["rows"] if r["dataset"] == "digits"]
    assert digits and all({"distance", "pixel", "precision", "recall"} <= r.keys() for r in digits)
    losses = {(r["coupling"], r["loss"]) for r in digits if r["group"] == "coupling"}
    assert {("independent", "GAN"), ("inversion", "L2+P"), ("inversion", "L2+P+GAN"), ("teacher", "L2+GAN")} <= losses
    assert {r["group"] for r in digits} >= {"base", "coupling", "table2", "gan ablation", "leakage", "table1"}
    assert {key: round(value, 4) for key, value in record["headline"].items()} == headline  # the file holds what was printed
    assert (tmp_path / "quality-quick.png").is_file()
