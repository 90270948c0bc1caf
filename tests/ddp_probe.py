"""train_t2i.py with a probe on its weights, for tests/test_t2i.py: launched under torchrun in place of
the script, with the script's flags.

After every optimiser step each rank appends "<optimiser> <sha256 of that optimiser's parameters>" to
<out-dir>/rank<RANK>.sha (optimiser 0 is the first one built, and so on), by patching
torch.optim.AdamW in this process only; then it runs train_t2i.main. DDP keeps the replicas identical
iff both ranks write the same lines.
"""
import hashlib
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_t2i  # noqa: E402

OUT = sys.argv[sys.argv.index("--out-dir") + 1]
COUNTER = itertools.count()


class ProbedAdamW(torch.optim.AdamW):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.probe_index = next(COUNTER)

    def step(self, closure=None):
        loss = super().step(closure)
        digest = hashlib.sha256()
        for group in self.param_groups:
            for param in group["params"]:
                digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        with open(os.path.join(OUT, f"rank{os.environ.get('RANK', '0')}.sha"), "a") as f:
            f.write(f"{self.probe_index} {digest.hexdigest()}\n")
        return loss


torch.optim.AdamW = ProbedAdamW

if __name__ == "__main__":
    train_t2i.main(sys.argv[1:])
