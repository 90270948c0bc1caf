"""train_t2i.py with a probe on its weights, for tests/test_t2i.py: launched under torchrun in place of
the script, with the script's flags.

After every optimiser step each rank appends "<optimiser> <sha256 of that optimiser's parameters>" to
<out-dir>/rank<RANK>.sha (optimiser 0 is the first one built, and so on), by patching
torch.optim.AdamW in this process only; then it runs t2i_training.main. DDP keeps the replicas identical
iff both ranks write the same lines. After every train_step that holds a frozen base (the couplings',
--disc-kind basefeat's) it appends the sha256 of the base's parameters to <out-dir>/rank<RANK>.base.sha.

With E2EDIFF_FIXED_BATCHES=S each micro-batch is `fixed_micro_batch`'s instead of the data's: one of the S
shares of a global micro-batch that depends only on its number, so that S ranks and 1 process with S times
the gradient accumulation train on the same global batches, share by share, from the same z_T.
"""
import functools
import hashlib
import itertools
import os
import sys

import torch

import t2i_training

COUNTER = itertools.count()


def parameter_digest(parameters) -> str:
    digest = hashlib.sha256()
    for param in parameters:
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def probed_train_step(*args, **kwargs):
    """train_t2i's train_step, then the frozen base's digest (when the run holds one)."""
    logs = TRAIN_STEP(*args, **kwargs)
    if kwargs.get("base_model") is not None:
        with open(os.path.join(ProbedAdamW.out_dir, f"rank{os.environ.get('RANK', '0')}.base.sha"), "a") as f:
            f.write(parameter_digest(kwargs["base_model"].parameters()) + "\n")
    return logs


TRAIN_STEP = t2i_training.train_step


class ProbedAdamW(torch.optim.AdamW):
    out_dir = "."

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.probe_index = next(COUNTER)

    def step(self, closure=None):
        loss = super().step(closure)
        digest = parameter_digest(param for group in self.param_groups for param in group["params"])
        with open(os.path.join(self.out_dir, f"rank{os.environ.get('RANK', '0')}.sha"), "a") as f:
            f.write(f"{self.probe_index} {digest}\n")
        return loss


def fixed_micro_batch(run: t2i_training.Run, batch: dict, shares: int = 2) -> dict:
    """Run.micro_batch's stand-in (`batch`, the data's, is not used): global micro-batch n = 1, 2, ... is drawn
    from a generator seeded with n (latents z0, text embeddings and masks, the coupling's z_T) and cut into
    `shares` shares of --batch-size rows. Under DDP with `shares` ranks rank r trains on share r of each; a single
    process (--grad-accum `shares` times the ranks') on each share in turn: the same forward passes, share by
    share, and the same global batch per optimiser step."""
    calls = run.fixed_batches = getattr(run, "fixed_batches", 0) + 1
    per_process = shares // run.ctx.world_size  # shares of one global micro-batch that this process trains on
    number, share = (calls - 1) // per_process + 1, run.ctx.rank * per_process + (calls - 1) % per_process
    size, transformer = run.config.batch_size, run.denoiser.transformer.config
    latent, length = run.config.resolution // run.codec.factor, run.config.max_text_length
    generator, rows = torch.Generator().manual_seed(number), size * shares
    target, z_T = (torch.randn(rows, transformer.in_channels, latent, latent, generator=generator) for _ in range(2))
    embeddings = torch.randn(rows, length, transformer.caption_channels, generator=generator)
    mask = (torch.arange(length) < torch.randint(1, length + 1, (rows, 1), generator=generator)).long()
    mine = slice(share * size, (share + 1) * size)
    return {"target": target[mine], "z_T": z_T[mine], "cond": (embeddings[mine], mask[mine]), "images": None}

if __name__ == "__main__":
    ProbedAdamW.out_dir = sys.argv[sys.argv.index("--out-dir") + 1]
    torch.optim.AdamW = ProbedAdamW
    t2i_training.train_step = probed_train_step
    if os.environ.get("E2EDIFF_FIXED_BATCHES"):
        shares = int(os.environ["E2EDIFF_FIXED_BATCHES"])
        t2i_training.Run.micro_batch = functools.partialmethod(fixed_micro_batch, shares=shares)
    t2i_training.main(sys.argv[1:])
