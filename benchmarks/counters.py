"""benchmarks/counters — what cost.py and scale.py count, shared (neither imports the other script):
the bytes of the tensors a training step creates, followed through their lifetimes (TensorMemory), its
FLOPs by torch.utils.flop_counter's formulas (FlopCount), and the toy UNets cost.py times (SETUPS), on
which scale.py also validates its counting.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

SETUPS = {  # name -> (image shape, UNet kwargs, batch)
    "cifar": ((3, 32, 32), dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2), 32),
    "quick": ((1, 16, 16), dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1), 16),
}


class TensorMemory(TorchDispatchMode):
    """Bytes of the tensors created while it is active, followed through their storages' lifetimes.

    `held`: alive when the first backward op runs (what the forward left for backward; None if no
    backward ran). `peak`: the most alive at once. A storage that an op's input already has (a view, an
    in-place result) is not new; a storage dies when PyTorch frees it (the Python storage object lives
    exactly as long as the storage itself)."""

    def __init__(self):
        super().__init__()
        self.alive, self.now, self.peak, self.held = {}, 0, 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.held is None and torch._C._current_graph_task_id() != -1:  # the backward pass has begun
            self.held = self.now
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in inputs and key not in self.alive:
                    self.alive[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.now)
        return out

    def _free(self, key):
        self.now -= self.alive.pop(key)


class FlopCount(TorchDispatchMode):
    """FLOPs of the ops run while it is active, by torch.utils.flop_counter's formulas. (FlopCounterMode
    itself also tracks modules, with hooks that keep activations alive into the backward pass: it would
    inflate the memory counted alongside.)"""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in flop_registry:
            self.flops += flop_registry[func._overloadpacket](*args, **(kwargs or {}), out_val=out)
        return out
