"""
End-to-end fine-tuning of a pretrained text-to-image diffusion model (E2EDiff, arXiv 2412.21044) at
full scale: unroll the model's own few-step sampler from pure noise in the VAE's latent space, keep
every step differentiable, put the loss on the final output. By default it reproduces the paper's
setting: PixArt-delta (a 0.6B PixArt transformer distilled to 4 LCM steps) with the SD VAE (frozen)
and T5 text embeddings (frozen), AdamW lr 1e-6, weight decay 1e-8, EMA 0.95, batch 8 per GPU,
24k steps, L2 on latents + LPIPS on decoded images.

The method is e2ediff.py's. This script loads the pretrained parts (Alg. 1 line 1), streams the data
and encodes it (lines 3-5: z0 = E(x0), e_c = T(c)), and hands every step's micro-batches to
e2ediff.train_step (lines 6-15: the coupling, the unrolled sampler, the loss, the AdamW update, the
EMA). The method's options (--num-steps, --coupling, the loss weights, the GAN, --ema-decay, ...) are
the fields of e2ediff.EndToEndConfig, whose defaults are the paper's recipe.

One code path for one process and for many: DDP is switched on when torchrun sets RANK (NCCL on
GPUs, gloo on CPU). Rank 0 logs, samples and saves; every rank seeds differently.

Models. --pretrained is a diffusers pipeline folder or hub id with transformer/, vae/, text_encoder/,
tokenizer/, scheduler/ (the layout of PixArt-alpha/PixArt-LCM-XL-2-1024-MS); --transformer, --vae,
--text-encoder, --tokenizer, --scheduler override single parts (a folder or hub id holding that part
at its root). The noise schedule and prediction type come from scheduler/scheduler_config.json. On a
machine without hub access, download once and point at the folder (and export HF_HUB_OFFLINE=1, so
that a missing model fails at once with the download command instead of after the hub's retries):

    hf download PixArt-alpha/PixArt-LCM-XL-2-1024-MS --local-dir models/pixart-lcm

Data (--data): an image-caption folder in HF imagefolder form (metadata.jsonl rows with "file_name"
and "text"), WebDataset tar shards as img2dataset writes them (NNNNNNNNN.jpg + .txt per sample: a
folder of .tar files, a brace pattern 'shards/{00000..01023}.tar', or 'pipe:...' URLs), or a folder
written by --precompute-to. Images are resized and centre-cropped to --resolution. Corrupt images,
missing and empty captions are skipped and counted (the "skipped" field of every log row).

Single GPU (or CPU, slowly):

    python train_t2i.py --pretrained models/pixart-lcm --data data/laion-art --out-dir runs/e2e

One node, 8 GPUs:

    torchrun --standalone --nproc_per_node=8 train_t2i.py --pretrained models/pixart-lcm \\
        --data 'shards/{00000..01023}.tar'

The paper's 64 GPUs, 8 nodes (run on every node, NODE_RANK = 0..7, MASTER_ADDR = node 0's address):

    torchrun --nnodes=8 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER_ADDR:29500 --rdzv_id=e2ediff train_t2i.py --pretrained models/pixart-lcm \\
        --data 'shards/{00000..01023}.tar'

Continue from <out-dir>/ckpt.pt (model, EMA, optimisers, discriminator, step, data position, RNG):

    torchrun ... train_t2i.py ... --resume

Ctrl-C or SIGTERM (torchrun forwards both to every rank): every rank finishes its step, they agree on
it, checkpoint it and exit with status 130; --resume continues from there. A rank that dies or hangs
fails the run after at most --dist-timeout seconds instead of leaving the others waiting.

Pre-compute VAE latents and T5 embeddings once (same torchrun command; each rank writes its share),
then train on them without running T5 or the VAE encoder in the training step:

    torchrun ... train_t2i.py --pretrained models/pixart-lcm --data 'shards/{00000..01023}.tar' --precompute-to cache/
    torchrun ... train_t2i.py --pretrained models/pixart-lcm --data cache/

Evaluation: with --eval-data (an imagefolder of prompts and reference images, e.g. COCO-30k) the EMA
model is scored by torchmetrics' CLIP score (--clip-model) and FID (torch-fidelity's Inception
weights, --inception-weights) every --eval-every steps and at the end; a missing model or weights
file is reported in the log and skipped.

Memory and throughput knobs: --grad-checkpoint (on: one sampler step's activations at a time;
--checkpoint-policy selective keeps the matmul and attention outputs, recomputing less),
--checkpoint-blocks (also every transformer/VAE-decoder block), --backprop-steps K (gradients through
the last K steps only), --batch-size with --grad-accum (same global batch, less memory),
--lpips-weight 0 (no differentiable VAE decode at full resolution: the largest activation cost),
--precompute-to (no T5 or VAE encoder in the step), --mixed-precision bf16, --num-workers.

Outputs in --out-dir: log.jsonl (config, one row per log step, checkpoints, evaluations), ckpt.pt,
samples/step_NNNNNNN.png (EMA model, fixed prompts and noise) and transformer_ema/ (the EMA denoiser
in diffusers format, loadable into the pipeline) at the end.
`python train_t2i.py --help` lists every flag with its default and why.

Try it on CPU in a minute with tiny random models (what tests/test_t2i.py does):

    python tests/tiny_t2i.py /tmp/tiny
    torchrun --standalone --nproc_per_node=2 train_t2i.py --pretrained /tmp/tiny/pipeline \\
        --data /tmp/tiny/images --resolution 64 --max-text-length 16 --batch-size 2 --max-steps 3 \\
        --log-every 1 --lpips-weight 0 --out-dir /tmp/tiny/run
"""
from t2i_training import main

if __name__ == "__main__":
    main(description=__doc__)
