"""benchmarks/scale.py — what one end-to-end step of train_t2i.py costs at the paper's scale, counted.

The paper fine-tunes PixArt-delta (PixArt-XL-2, 0.6B parameters) at 1024², batch 8 per A100, T = 4
unrolled LCM steps, L2 on latents + LPIPS on VAE-decoded images. No GPU is needed to know whether that
fits: the real diffusers models are built from their configs (written below, nothing downloaded) on
torch.device("meta") — shapes and dtypes, no memory, no arithmetic — and e2ediff's own training step
(EndToEndLoss through diffusers_parts.DiffusersDenoiser, as train_t2i.py builds it; backward; AdamW)
runs on them. What is counted, exactly:

  - held: the bytes of the tensors the forward pass leaves alive for the backward pass. Every tensor
    an op creates is followed through its storage's lifetime (TensorMemory); `held` is what is alive
    when the first backward op runs. This sees what torch.autograd.graph.saved_tensors_hooks cannot:
    the inputs that a checkpoint keeps to recompute from, and the outputs a selective checkpoint keeps
    (the non-reentrant checkpoint's own hooks hide both from an outer hook). Views and in-place results
    share a storage and count once; parameters and inputs are not created by the step and do not count.
  - peak: the most bytes alive at once during forward, backward and the AdamW step (activations,
    recomputed activations, gradients, the optimiser's temporaries);
  - static: parameters, AdamW state (fp32: --mixed-precision bf16 autocasts the forward, weights and
    AdamW stay fp32), the EMA copy, the frozen base copy (--coupling inversion / teacher, bf16), the VAE,
    LPIPS, T5-XXL in bf16 when the text is not pre-computed, DDP's gradient buckets on > 1 GPU;
  - FLOPs per step: torch.utils.flop_counter's formulas (matmuls, convolutions, attention) over forward,
    recomputation and backward; elementwise ops count nothing, so selective recomputation shows none.

What the meta device does not do by itself, and what is done instead (GpuLike):
  - autocast does not apply to meta tensors: torch.nn.functional's linear, conv2d and attention cast
    to bf16, its norms, softmax and losses to fp32, as CUDA autocast does (the cast weights of trained
    parameters cached for the step, as autocast's cache does);
  - scaled_dot_product_attention takes its O(N²) math path on meta. A GPU takes flash attention (bf16,
    no mask: the self-attention) or memory-efficient attention (with a mask: the cross-attention to the
    text), which save O(N): the same fused ops are called on meta ("cuda" backend). The "cpu" backend
    asks the CPU's own dispatcher, so that a meta count can be checked against a real CPU run.

Validated (--validate, and tests/test_scale.py on a tiny config): for a small PixArt and for the toy
UNet of cost.py, the count on meta agrees with the same step on real CPU tensors, and with the bytes
saved_tensors_hooks measures (as cost.py does) where those can see everything (all but selective).

    python benchmarks/scale.py               # T 1,2,4 x 5 checkpointing modes x 2 losses x 512², 1024² (≈ 5 min, 1 thread)
    python benchmarks/scale.py --validate    # meta count vs real CPU runs, tiny PixArt and toy UNet

Writes benchmarks/results/scale.json (`python benchmarks/report.py --write` renders its tables); the last
line printed is the headline JSON. Step times assume a model FLOPs utilisation (MFU) of 40 % of the
dense bf16 peak: an assumption, stated, not a measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.utils._pytree import tree_leaves, tree_map

import e2ediff
from perceptual import LPIPS
from diffusers_parts import DiffusersDenoiser, LatentCodec
from benchmarks.counters import SETUPS, FlopCount, TensorMemory
from benchmarks.report import write_results


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# PixArt-alpha/PixArt-XL-2-1024-MS, transformer/config.json (PixArt-delta = this network distilled to 4 LCM steps)
PIXART_XL_1024 = dict(
    sample_size=128, num_layers=28, patch_size=2, attention_head_dim=72, num_attention_heads=16, in_channels=4,
    out_channels=8, caption_channels=4096, cross_attention_dim=1152, attention_bias=True, activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, dropout=0.0)
# vae/config.json of the same pipeline: the SD VAE (8x downsampling, 4 latent channels)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    norm_num_groups=32, sample_size=1024, scaling_factor=0.18215, act_fn="silu",
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
# text_encoder/config.json: the encoder of T5 v1.1 XXL
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
TEXT_TOKENS = 120  # train_t2i's --max-text-length (the PixArt pipelines' max_sequence_length)
# train_t2i.py's flags for each way of paying for the T-step graph
MODES = {
    "plain": dict(grad_checkpoint=False),  # --no-grad-checkpoint
    "step": dict(grad_checkpoint=True),  # --grad-checkpoint (the default)
    "blocks": dict(grad_checkpoint=True, checkpoint_blocks=True),  # --grad-checkpoint --checkpoint-blocks
    "truncated": dict(grad_checkpoint=False, backprop_steps=1),  # --no-grad-checkpoint --backprop-steps 1
    "selective": dict(grad_checkpoint=True, checkpoint_policy="selective"),  # --checkpoint-policy selective
}
MODE_FLAGS = {"plain": "--no-grad-checkpoint", "step": "--grad-checkpoint (default)",
              "blocks": "--grad-checkpoint --checkpoint-blocks", "truncated": "--no-grad-checkpoint --backprop-steps 1",
              "selective": "--grad-checkpoint --checkpoint-policy selective"}
LOSSES = {"l2": dict(l2_weight=1.0, lpips_weight=0.0), "l2+lpips": dict(l2_weight=1.0, lpips_weight=1.0)}
# dense bf16 peak FLOP/s (NVIDIA datasheets: A100 SXM, H100 SXM, H200 SXM) and memory (GB) of each GPU
GPUS = {"A100-80GB": (312e12, 80), "H100-80GB": (989e12, 80), "H200-141GB": (989e12, 141)}
MFU = 0.40  # assumed model FLOPs utilisation: typical of well-tuned large-model training, not measured here
GPU_MEMORY = (40, 80, 141)  # GB budgets for the largest batch
PAPER = dict(batch=8, num_steps=4, loss="l2+lpips", resolution=1024, gpus=64)
GB = 1e9


# --------------------------------------------------------------------------------------------------
# Counting: tensor lifetimes, and the GPU's casts and attention kernels on the meta device


# CUDA autocast's op lists (aten/src/ATen/autocast_mode.cpp), for the torch.nn.functional calls these models make
TO_BF16 = ("linear", "conv2d", "scaled_dot_product_attention")
TO_FP32 = ("layer_norm", "group_norm", "softmax", "mse_loss", "l1_loss")


class GpuLike:
    """Make a meta-device run take the GPU's path: CUDA autocast's casts (dtype=torch.bfloat16; None = no
    autocast) and the attention kernel that the GPU's scaled_dot_product_attention would pick.

    A context manager that swaps those torch.nn.functional functions for casting ones while it is active.
    (A TorchFunctionMode would be neater but does not reach the backward pass, which runs on its own
    thread for a non-CPU device, and so would miss a checkpoint's recomputation.) Tensor methods on
    autocast's fp32 list (x ** 2, x.sum()) are not cast: here they act on fp32 tensors, or on LPIPS's
    small feature maps.

    :param attention: "cuda" — flash attention for fp16/bf16 without a mask, memory-efficient attention
        otherwise (PyTorch's choice on an A100/H100 for PixArt's head size 72); "cpu" — the CPU
        dispatcher's own choice (for checking a meta count against a CPU run); "math" — leave it."""

    def __init__(self, dtype: torch.dtype | None = torch.bfloat16, attention: str = "cuda"):
        self.dtype, self.attention, self.weight_casts, self.originals = dtype, attention, {}, {}

    def __enter__(self):
        self.weight_casts = {}  # one autocast region per step: its cache of weight casts lives as long
        for name in TO_BF16 + TO_FP32:
            self.originals[name] = original = getattr(F, name)
            setattr(F, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(F, name, original)
        self.weight_casts = {}

    def _cast(self, value, dtype):
        if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype):
            return value
        if value.is_leaf and value.requires_grad:  # autocast caches the casts of trained weights
            if id(value) not in self.weight_casts:
                self.weight_casts[id(value)] = (value, value.to(dtype))
            return self.weight_casts[id(value)][1]
        return value.to(dtype)

    def _wrap(self, name, original):
        def cast_then_call(*args, **kwargs):
            if self.dtype is not None:
                dtype = self.dtype if name in TO_BF16 else torch.float32
                args, kwargs = tree_map(lambda v: self._cast(v, dtype), (args, kwargs))
            if name == "scaled_dot_product_attention" and self.attention != "math":
                return self._attention(original, *args, **kwargs)
            return original(*args, **kwargs)
        return cast_then_call

    def _attention(self, original, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   **kwargs):
        aten = torch.ops.aten
        if self.attention == "cpu":
            cpu = [torch.empty(t.shape, dtype=t.dtype).requires_grad_(t.requires_grad) for t in (query, key, value)]
            mask = None if attn_mask is None else torch.zeros(attn_mask.shape, dtype=attn_mask.dtype)
            if aten._fused_sdp_choice(*cpu, mask, dropout_p, is_causal, scale=scale) == int(SDPBackend.FLASH_ATTENTION):
                return aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                        attn_mask=attn_mask, scale=scale)[0]
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        if attn_mask is None and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256:
            return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, scale=scale)[0]
        bias = None if attn_mask is None else attn_mask.expand(*query.shape[:-1], key.shape[-2])
        return aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, dropout_p, is_causal,
                                                            scale=scale)[0]


def count_step(loss_fn, optimizer, batch: dict, gpu: GpuLike, count_flops: bool = True) -> dict:
    """One training step, counted: Alg. 1 lines 7-13 (EndToEndLoss), backward, AdamW (line 14).
    Returns held and peak bytes (see TensorMemory) and FLOPs (forward, recomputation and backward).

    The AdamW state exists beforehand (as at every step but the first): it is static memory."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not optimizer.state:
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    memory, flops = TensorMemory(), FlopCount()
    with memory, flops if count_flops else contextlib.nullcontext():
        with gpu:  # train_step's autocast region: forward and backward; its cast weights die with it
            loss = loss_fn(batch["z_T"], batch["target"], 0, batch.get("cond"), None, batch.get("images"))[0]
            loss.backward()
            del loss
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"held_bytes": memory.held or 0, "peak_bytes": memory.peak, "flops": flops.flops if count_flops else None}


def saved_tensor_bytes(loss_fn, batch: dict, gpu: GpuLike, static: set) -> int:
    """The forward's saved tensors as torch.autograd.graph.saved_tensors_hooks sees them (cost.py's
    measurement): each storage once, parameters and inputs (`static`: storage keys) left out."""
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in static:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), gpu:
        loss_fn(batch["z_T"], batch["target"], 0, batch.get("cond"), None, batch.get("images"))
    return sum(saved.values())


def storages(*things) -> set:
    """Storage keys of every tensor in the given modules / tensors / containers."""
    tensors = []
    for thing in things:
        tensors += list(thing.parameters()) + list(thing.buffers()) if isinstance(thing, torch.nn.Module) else tree_leaves(thing)
    return {t.untyped_storage()._cdata for t in tensors if isinstance(t, torch.Tensor)}


# --------------------------------------------------------------------------------------------------
# PixArt-XL + SD VAE + LPIPS, as train_t2i.py assembles them


def build_t2i(transformer_config: dict, vae_config: dict, device: str, lpips: bool):
    """(denoiser, codec, lpips or None) on `device` — "meta" for no memory. The models are in fp32 as
    train_t2i.py keeps them (the trained transformer, the frozen VAE); LPIPS (AlexNet) is built on the
    CPU (its heads load from the lpips package) and moved; its backbone's weights do not change a count."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel

    with torch.device(device):
        transformer = PixArtTransformer2DModel(**transformer_config).train()
        vae = AutoencoderKL(**vae_config).eval().requires_grad_(False)
    perceptual = LPIPS("alex", random_backbone=True).to(device) if lpips else None
    codec = LatentCodec(vae)
    return DiffusersDenoiser(transformer, codec.factor), codec, perceptual


def t2i_batch(denoiser, codec, batch: int, resolution: int, device: str, text_dim: int, tokens: int = TEXT_TOKENS,
              images: bool = True, seed: int = 0) -> dict:
    """z_T, the target latents, the text condition and the target images of one micro-batch."""
    generator = torch.Generator().manual_seed(seed)
    size, channels = resolution // codec.factor, denoiser.transformer.config.in_channels

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device) if device != "meta" else torch.empty(*shape, device="meta")
    return {"z_T": randn(batch, channels, size, size), "target": randn(batch, channels, size, size),
            "cond": (randn(batch, tokens, text_dim), torch.ones(batch, tokens, device=device)),
            "images": randn(batch, 3, resolution, resolution).clamp(-1, 1) if images else None}


def t2i_loss(denoiser, codec, perceptual, num_steps: int, mode: str, loss: str):
    """e2ediff's EndToEndLoss for one cell of the grid, with train_t2i.py's sampler (the LCM's own
    update on its grid) and prediction type (PixArt-delta's: epsilon) and --checkpoint-blocks."""
    options = dict(MODES[mode])
    blocks = options.pop("checkpoint_blocks", False)
    for module in (denoiser.transformer, codec.vae):  # --checkpoint-blocks, as train_t2i.py switches it
        if blocks:
            module.enable_gradient_checkpointing()
        elif module.is_gradient_checkpointing:
            module.disable_gradient_checkpointing()
    config = e2ediff.EndToEndConfig(num_steps=num_steps, update="lcm", spacing="lcm", **LOSSES[loss], **options)
    schedule = e2ediff.make_schedule("scaled_linear")  # on the CPU: the sampler moves what it needs
    return e2ediff.EndToEndLoss(denoiser, schedule, config, "epsilon", lpips=perceptual,
                                decode=codec.decode if perceptual is not None else None)


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def static_bytes(denoiser, codec, perceptual, text_encoder_params: int, *, precomputed: bool, coupling: str,
                 gpus: int) -> dict:
    """Memory that does not depend on the batch, per GPU, as train_t2i.py holds it (bytes)."""
    trained = parameter_count(denoiser)
    parts = {
        "transformer (fp32)": 4 * trained,
        "AdamW state (fp32 exp_avg, exp_avg_sq)": 8 * trained,
        "EMA copy (fp32)": 4 * trained,
        "VAE (fp32, frozen)": 4 * parameter_count(codec.vae),
    }
    if perceptual is not None:
        parts["LPIPS AlexNet (fp32, frozen)"] = 4 * parameter_count(perceptual)
    if coupling != "independent":
        parts["frozen base copy (bf16)"] = 2 * trained
    if not precomputed:
        parts["T5-XXL encoder (bf16, frozen)"] = 2 * text_encoder_params
    if gpus > 1:
        parts["DDP gradient buckets (fp32)"] = 4 * trained
    return parts


def t5_xxl_params() -> int:
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        return parameter_count(T5EncoderModel(T5Config(**T5_XXL)))


def encode_cost(codec, batch: int, resolution: int, gpu: GpuLike) -> dict:
    """The data side of a step without --precompute-to: z0 = E(x0) (VAE encoder) and e_c = T5(c), no grad.
    Peak bytes and FLOPs (T5-XXL's FLOPs: 2 x parameters x tokens, its embedding table aside)."""
    memory, flops = TensorMemory(), FlopCount()
    images = torch.empty(batch, 3, resolution, resolution, device="meta")
    with torch.no_grad(), memory, flops, gpu:
        codec.distribution(images)
    text_flops = 2 * (t5_xxl_params() - T5_XXL["vocab_size"] * T5_XXL["d_model"]) * TEXT_TOKENS * batch
    return {"peak_bytes": memory.peak, "flops": flops.flops + text_flops}


# --------------------------------------------------------------------------------------------------
# The grid, the paper's setting, the largest batch per GPU


def grid(parts, resolutions, steps_list, gpu: GpuLike) -> dict:
    """{f"{loss}/{mode}/T{k}/{res}": count_step at batch 1} over the whole grid (meta device)."""
    denoiser, codec, perceptual = parts
    results = {}
    for resolution in resolutions:
        for loss in LOSSES:
            for mode in MODES:
                for k in steps_list:
                    lpips = perceptual if loss == "l2+lpips" else None
                    loss_fn = t2i_loss(denoiser, codec, lpips, k, mode, loss)
                    optimizer = torch.optim.AdamW(denoiser.parameters(), foreach=True)
                    batch = t2i_batch(denoiser, codec, 1, resolution, "meta", PIXART_XL_1024["caption_channels"],
                                      images=lpips is not None)
                    results[f"{loss}/{mode}/T{k}/{resolution}"] = count_step(loss_fn, optimizer, batch, gpu)
                    print(f"  {loss:9} {mode:10} T={k} {resolution}²: held {results[f'{loss}/{mode}/T{k}/{resolution}']['held_bytes'] / GB:7.2f} GB",
                          flush=True)
    return results


def step_at(parts, batch: int, mode: str, gpu: GpuLike, paper=PAPER) -> dict:
    """count_step for the paper's setting (T, loss, resolution) at a given batch size."""
    denoiser, codec, perceptual = parts
    loss_fn = t2i_loss(denoiser, codec, perceptual, paper["num_steps"], mode, paper["loss"])
    optimizer = torch.optim.AdamW(denoiser.parameters(), foreach=True)
    inputs = t2i_batch(denoiser, codec, batch, paper["resolution"], "meta", PIXART_XL_1024["caption_channels"])
    return count_step(loss_fn, optimizer, inputs, gpu)


def paper_setting(parts, text_encoder_params: int, gpu: GpuLike) -> dict:
    """Per checkpointing mode, at the paper's T, loss and resolution: per-GPU peak memory at batch 1 and
    8, FLOPs and seconds per step at batch 8 (assumed MFU), and the largest batch within each GPU budget
    from the straight line through batch 1 and 8 (every tensor of a step but the cast weights and the
    gradients grows with the batch), checked by a count at the line's batch for 80 GB ("line_error").
    With pre-computed text and latents, and without (T5-XXL and the VAE encoder then run in every step)."""
    denoiser, codec, perceptual = parts
    steps, encodes, rows = {}, {}, {}

    def step(mode, b):
        if (mode, b) not in steps:
            steps[mode, b] = step_at(parts, b, mode, gpu)
        return steps[mode, b]

    def encode(b):
        if b not in encodes:
            encodes[b] = encode_cost(codec, b, PAPER["resolution"], gpu)
        return encodes[b]

    for precomputed in (True, False):
        static = static_bytes(denoiser, codec, perceptual, text_encoder_params, precomputed=precomputed,
                              coupling="independent", gpus=PAPER["gpus"])
        for mode in MODES:
            def total(b, mode=mode):
                data = {"peak_bytes": 0, "flops": 0} if precomputed else encode(b)
                return {"peak_bytes": sum(static.values()) + max(step(mode, b)["peak_bytes"], data["peak_bytes"]),
                        "held_bytes": step(mode, b)["held_bytes"], "flops": step(mode, b)["flops"] + data["flops"]}

            one, paper = total(1), total(PAPER["batch"])
            per_image = (paper["peak_bytes"] - one["peak_bytes"]) / (PAPER["batch"] - 1)
            fits = {str(gb): max(0, 1 + math.floor((gb * GB - one["peak_bytes"]) / per_image)) for gb in GPU_MEMORY}
            check = max(fits["80"], 1)
            line_error = total(check)["peak_bytes"] / (one["peak_bytes"] + (check - 1) * per_image) - 1
            name = f"{'precomputed' if precomputed else 'encoded'}/{mode}"
            rows[name] = {"peak_bytes_batch1": one["peak_bytes"], "peak_bytes": paper["peak_bytes"],
                          "held_bytes": paper["held_bytes"], "flops": paper["flops"], "largest_batch": fits,
                          "line_error": line_error,
                          "seconds": {gpu_name: paper["flops"] / (MFU * peak) for gpu_name, (peak, _) in GPUS.items()},
                          "static_bytes": static}
            print(f"  paper setting, {name:22}: {one['peak_bytes'] / GB:6.1f} GB at batch 1, {paper['peak_bytes'] / GB:6.1f} GB "
                  f"at batch {PAPER['batch']}, largest batch {fits} (line checked at {check}: {line_error:+.2%}), "
                  f"{paper['flops'] / 1e12:6.1f} TFLOPs, A100 {rows[name]['seconds']['A100-80GB']:.2f} s", flush=True)
    return rows


# --------------------------------------------------------------------------------------------------
# Validation: the meta count against real CPU runs


TINY_PIXART = dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
                   caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
                   activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                   norm_elementwise_affine=False, norm_eps=1e-6)  # tests/tiny_t2i.py's transformer
TINY_VAE = dict(block_out_channels=[8, 8, 8, 8], norm_num_groups=2, latent_channels=4, sample_size=64,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def validate_pixart(transformer_config=TINY_PIXART, vae_config=TINY_VAE, resolution: int = 64, batch: int = 2,
                    num_steps: int = 2, modes=tuple(MODES), losses=tuple(LOSSES)) -> dict:
    """{f"{loss}/{mode}": meta count, CPU count, CPU saved_tensors_hooks bytes} for one PixArt config, fp32,
    CPU attention kernels on both sides."""
    gpu = GpuLike(dtype=None, attention="cpu")
    results = {}
    for device in ("meta", "cpu"):
        torch.manual_seed(0)
        parts = build_t2i(transformer_config, vae_config, device, lpips="l2+lpips" in losses)
        denoiser, codec, perceptual = parts
        for loss in losses:
            lpips = perceptual if loss == "l2+lpips" else None
            inputs = t2i_batch(denoiser, codec, batch, resolution, device, transformer_config["caption_channels"], tokens=8,
                               images=lpips is not None)
            for mode in modes:
                loss_fn = t2i_loss(denoiser, codec, lpips, num_steps, mode, loss)
                optimizer = torch.optim.AdamW(denoiser.parameters(), foreach=True)
                entry = results.setdefault(f"{loss}/{mode}", {})
                entry[f"{device}_held_bytes"] = count_step(loss_fn, optimizer, inputs, gpu, count_flops=False)["held_bytes"]
                if device == "cpu":
                    static = storages(denoiser, codec.vae, *(m for m in [lpips] if m is not None), inputs)
                    entry["cpu_saved_hooks_bytes"] = saved_tensor_bytes(loss_fn, inputs, gpu, static)
    return results


def validate_unet(setup: str = "quick", modes=("plain", "step", "truncated", "selective"), num_steps: int = 2,
                  unet: tuple | None = None) -> dict:
    """The same for the toy UNet of benchmarks/cost.py (pixel space, L2): one of its SETUPS, or
    `unet` = (image shape, UNet kwargs, batch)."""
    from toy_nets import UNet

    shape, kwargs, batch = unet or SETUPS[setup]
    gpu, results = GpuLike(dtype=None, attention="cpu"), {}
    for device in ("meta", "cpu"):
        torch.manual_seed(0)
        with torch.device(device):
            model = UNet(shape[0], **kwargs)
        generator = torch.Generator().manual_seed(0)
        inputs = {"z_T": torch.randn(batch, *shape, generator=generator).to(device),
                  "target": torch.randn(batch, *shape, generator=generator).to(device)}
        schedule = e2ediff.make_schedule("linear", zero_terminal_snr=True)
        for mode in modes:
            config = e2ediff.EndToEndConfig(num_steps=num_steps, update="lcm", lpips_weight=0.0, **MODES[mode])
            loss_fn = e2ediff.EndToEndLoss(model, schedule, config)
            optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
            entry = results.setdefault(mode, {})
            entry[f"{device}_held_bytes"] = count_step(loss_fn, optimizer, inputs, gpu, count_flops=False)["held_bytes"]
            if device == "cpu":
                entry["cpu_saved_hooks_bytes"] = saved_tensor_bytes(loss_fn, inputs, gpu, storages(model, inputs))
    return results


def agreement(results: dict) -> float:
    """The largest relative difference of a meta count from its CPU count."""
    return max(abs(r["meta_held_bytes"] / r["cpu_held_bytes"] - 1) for r in results.values())


# --------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="1,2,4", help="the values of T of the grid")
    parser.add_argument("--resolutions", default="512,1024", help="image sizes of the grid")
    parser.add_argument("--validate", action="store_true", help="only the meta-vs-CPU validation")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="folder for the JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    validation = {"pixart": validate_pixart(), "unet": validate_unet()}
    for name, results in validation.items():
        for key, r in results.items():
            print(f"validation {name:6} {key:20}: meta {r['meta_held_bytes'] / 2**20:8.3f} MiB, CPU {r['cpu_held_bytes'] / 2**20:8.3f} MiB, "
                  f"CPU saved_tensors_hooks {r['cpu_saved_hooks_bytes'] / 2**20:8.3f} MiB")
    headline = {"validation_max_error": max(agreement(results) for results in validation.values())}
    if args.validate:
        print(f"largest meta-vs-CPU difference: {headline['validation_max_error']:.2%}")
        return headline

    gpu = GpuLike()
    parts = build_t2i(PIXART_XL_1024, SD_VAE, "meta", lpips=True)
    denoiser, codec, perceptual = parts
    text_encoder_params = t5_xxl_params()
    params = {"transformer": parameter_count(denoiser), "vae": parameter_count(codec.vae),
              "vae_decoder": parameter_count(codec.vae.decoder) + parameter_count(codec.vae.post_quant_conv),
              "lpips": parameter_count(perceptual), "t5_xxl_encoder": text_encoder_params}
    print(f"PixArt-XL-2 {params['transformer'] / 1e6:.1f}M parameters, SD VAE {params['vae'] / 1e6:.1f}M, "
          f"T5-XXL encoder {text_encoder_params / 1e9:.2f}B; grid (batch 1, bf16 autocast, GPU attention kernels):")
    steps_list = [int(k) for k in args.steps.split(",")]
    resolutions = [int(r) for r in args.resolutions.split(",")]
    cells = grid(parts, resolutions, steps_list, gpu)
    paper = paper_setting(parts, text_encoder_params, gpu)
    a100 = {mode: paper[f"precomputed/{mode}"] for mode in MODES}
    headline.update({
        "paper_peak_gb_step": a100["step"]["peak_bytes"] / GB,
        "paper_seconds_a100_step": a100["step"]["seconds"]["A100-80GB"],
        "paper_peak_gb_selective": a100["selective"]["peak_bytes"] / GB,
        "paper_seconds_a100_selective": a100["selective"]["seconds"]["A100-80GB"],
        "paper_peak_gb_plain": a100["plain"]["peak_bytes"] / GB,
    })
    record = {"params": params, "configs": {"transformer": PIXART_XL_1024, "vae": SD_VAE, "t5": T5_XXL},
              "modes": MODE_FLAGS, "gpus": {name: {"bf16_flops": peak, "memory_gb": memory} for name, (peak, memory) in GPUS.items()},
              "mfu": MFU, "paper": PAPER, "text_tokens": TEXT_TOKENS, "grid": cells, "paper_setting": paper,
              "validation": validation, "torch": torch.__version__, "attention": "cuda", "autocast": "bf16"}
    os.makedirs(args.out, exist_ok=True)
    write_results(args.out, "scale", record, headline, start)
    return headline


if __name__ == "__main__":
    main()
