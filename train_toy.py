"""
The toy end-to-end diffusion script: pretrain a small UNet with the standard diffusion loss, fine-tune
it end-to-end through its own few-step sampler (E2EDiff, arXiv 2412.21044: unroll T sampler steps
from noise, put the loss on the final output), and measure few-step quality against the base model's
DDIM sampler.

Quickstart — the whole offline story on scikit-learn's bundled 8x8 digits (no network, 2 CPU cores,
about 7.5 minutes), written to runs/toy-digits/:

    python train_toy.py

It pretrains the base model (stage 1), fine-tunes one end-to-end model per NFE in --nfe 1,2,4
(stage 2), then evaluates (stage 3): sample grids (grids/*.png), a results table (results.md,
results.json) of base DDIM at 1/2/4/50 NFE against each fine-tuned model at its own NFE, and the
training log (metrics.jsonl, one JSON row per log step).

One stage at a time, into another run folder, with other choices (each stage checks that the
checkpoint it builds on was made with the same model flags):

    python train_toy.py --stage pretrain --out-dir runs/gan
    python train_toy.py --stage finetune --out-dir runs/gan --nfe 2 --coupling independent --l2-weight 0 --gan-weight 1
    python train_toy.py --stage eval --out-dir runs/gan --nfe 2

The paper's own setting (its Table 1): end-to-end fine-tuning of a few-step latent consistency model
(PixArt-delta is one). --base lcm adds a stage that distils the pretrained base into an LCM (latent
consistency distillation, Luo et al. 2023), then fine-tunes the LCM end-to-end through its own sampler
on its own timestep grid, and evaluates the LCM against the fine-tuned LCM and the base's 50-step DDIM:

    python train_toy.py --base lcm --out-dir runs/toy-lcm

CIFAR-10 (32x32 RGB; the preset is sized for one GPU, where bf16 autocast is on):

    python train_toy.py --dataset cifar10 --data-dir data      # downloads CIFAR-10 when online

After Ctrl-C (the current stage saves a checkpoint and exits), continue exactly where it stopped;
finished stages are skipped:

    python train_toy.py --resume

`python train_toy.py --help` lists every flag with its default and why.

Losses that see the data. --gan-weight adds the adversarial term: a PatchGAN that reads the class label
(a projection discriminator) and whose real samples are training digits with every coupling, trained
with the non-saturating loss at its own lr (TOY_METHOD holds the recipe; the GAN ablation behind it is
in benchmarks/results/quality.json as of commit 83b4aaa). --disc-kind basefeat judges with the frozen
base's eyes instead: trainable heads on its blocks, fed re-noised samples (LADD, DMD2; measured against
the PatchGAN by python benchmarks/quality.py --study gan). --coupling teacher regresses onto the frozen
base's own samples, made once before fine-tuning (--teacher-pool per training image). --lpips-weight
adds a perceptual term; offline it is LPIPS's distance in a small network this script trains on the
train split (--perceptual-net trained: toy_nets.PerceptualNet, cached
as perceptual.pt, another architecture and seed than the metric's classifier).

Metric. The offline metric is the *classifier Fréchet distance* (CFD): the Fréchet distance between
Gaussians fitted to the penultimate features of a small classifier trained on the dataset's train split,
generated samples against the held-out test split; lower is better. On digits that classifier is a fixed
instrument, as Inception is for FID: metrics/digits-classifier.pt, committed and checked by its sha256
(toy_data.load_metric_classifier; --metric-classifier PATH for another file, retrain to train one per run,
cached as classifier.pt, as on CIFAR-10), so the same samples score the same on every CPU. It is
not the Inception FID and its numbers are not comparable with published FIDs. Beside it, metrics that no
trained network shapes, in pixel space against the same split: the energy distance, and k-NN precision
(fidelity) and recall (diversity). The evaluation's verdict lines use the project's rule
(toy_nets.verdict): a model beats another only if its CFD is <= 0.9x, its pixel energy <= 1.0x and its
recall >= the other's - 0.05. --eval-split validation measures against a validation split carved from
the train split instead (and trains on the rest): for choosing settings without the test split.
On CIFAR-10 the script
also reports the real Inception FID against CIFAR-10 train statistics through torch-fidelity, when
torch-fidelity's Inception weights are on disk.

The method itself is e2ediff.py (each fine-tuning step is `e2ediff.train_step`, Alg. 1 lines 6-15);
the networks and the metric are toy_nets.py; checkpoints, flags and signals are train_utils.py.
This file is the command line; the stages live in toy_training.py (Config, build_dataset, build_model,
pretrain, distill, finetune, load_base, load_lcm, load_finetuned, generate, evaluate, metric_classifier),
which the notebook, benchmarks/ and the tests import.
"""
from toy_training import main

if __name__ == "__main__":
    main(description=__doc__)
