"""Activation checkpointing for the unrolled sampler's steps: how each step's activations are recomputed.

e2ediff.unrolled_sample(checkpoint=...) calls `checkpointed` on every network evaluation: "full" keeps only
the step's inputs and recomputes the whole step in the backward pass (memory ~ one step, one more forward
per step); "selective" keeps the outputs of the ops that cost FLOPs for all T steps and recomputes the
rest (PyTorch's create_selective_checkpoint_contexts). benchmarks/cost.py measures both.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

CHECKPOINT_POLICIES = ("full", "selective")
_ATEN = torch.ops.aten
# What selective checkpointing keeps: the outputs of the ops that cost FLOPs (matmuls, convolutions,
# fused attention). Everything between them (norms, activations, elementwise arithmetic) is recomputed
# from those outputs in the backward pass — memory-bound work, a small share of a step's time.
SELECTIVE_SAVE_OPS = frozenset({
    _ATEN.mm.default, _ATEN.addmm.default, _ATEN.bmm.default, _ATEN.baddbmm.default, _ATEN.convolution.default,
    _ATEN._scaled_dot_product_flash_attention.default, _ATEN._scaled_dot_product_efficient_attention.default,
    _ATEN._scaled_dot_product_cudnn_attention.default, _ATEN._scaled_dot_product_flash_attention_for_cpu.default,
})


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep the outputs of SELECTIVE_SAVE_OPS, recompute every other op in the backward pass."""
    return CheckpointPolicy.MUST_SAVE if op in SELECTIVE_SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed(function: Callable, *args, policy: str = "full"):
    """function(*args), its activations recomputed in the backward pass under `policy` (same gradients)."""
    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"unknown checkpoint policy {policy!r}; valid choices: {', '.join(map(repr, CHECKPOINT_POLICIES))}")
    context = {"context_fn": partial(create_selective_checkpoint_contexts, selective_policy)} if policy == "selective" else {}
    return checkpoint(function, *args, use_reentrant=False, **context)
