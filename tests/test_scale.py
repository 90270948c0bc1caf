"""benchmarks/scale.py's counting is right where it can be measured, and selective checkpointing is exact.

The meta-device count of a training step (held activations, peak, FLOPs) must equal the same count on
real CPU tensors, for a tiny PixArt (tests/tiny_t2i.py's config) and a tiny toy UNet, within 5 %; where
saved_tensors_hooks sees everything (no selective checkpoint), the count must equal what the hooks
measure, as benchmarks/cost.py measures it. Selective checkpointing must give plain backprop's gradients
and hold less than plain, more than full recomputation.

    pytest tests/test_scale.py      # a few seconds, CPU
"""
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent

import e2ediff
import selective_checkpoint
import train_utils
from benchmarks import counters, scale

TINY_UNET = ((1, 8, 8), dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1), 4)


def relative_error(a, b):
    return abs(a / b - 1)


@pytest.fixture(scope="module")
def pixart_counts():
    pytest.importorskip("diffusers")
    return scale.validate_pixart(modes=("plain", "step", "blocks", "selective"), losses=("l2",))


def test_meta_count_equals_a_cpu_run_of_a_tiny_pixart(pixart_counts):
    for key, counts in pixart_counts.items():
        assert counts["cpu_held_bytes"] > 0, key
        assert relative_error(counts["meta_held_bytes"], counts["cpu_held_bytes"]) <= 0.05, (key, counts)


def test_meta_count_equals_a_cpu_run_of_the_toy_unet():
    counts = scale.validate_unet(unet=TINY_UNET)
    for mode, entry in counts.items():
        assert relative_error(entry["meta_held_bytes"], entry["cpu_held_bytes"]) <= 0.05, (mode, entry)
    # what saved_tensors_hooks measures (cost.py's "saved"), where it sees everything
    for mode in ("plain", "step", "truncated"):
        assert relative_error(counts[mode]["meta_held_bytes"], counts[mode]["cpu_saved_hooks_bytes"]) <= 0.05, mode
    # selective keeps some outputs of every step: between full recomputation and plain backprop
    assert counts["step"]["cpu_held_bytes"] < counts["selective"]["cpu_held_bytes"] < counts["plain"]["cpu_held_bytes"]


def test_plain_pixart_count_equals_saved_tensors_hooks(pixart_counts):
    for mode in ("plain", "step", "blocks"):
        counts = pixart_counts[f"l2/{mode}"]
        assert relative_error(counts["meta_held_bytes"], counts["cpu_saved_hooks_bytes"]) <= 0.05, (mode, counts)


def test_tensor_memory_counts_what_backward_needs():
    weight = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)
    memory = counters.TensorMemory()
    with memory:
        hidden = torch.tanh(x @ weight)  # tanh saves its output; the matmul's output dies
        loss = torch.tanh(hidden @ weight).pow(2).sum()  # saves hidden (matmul input), tanh's output (pow input)
        del hidden
        loss.backward()
    assert 0 <= memory.held - 2 * 32 * 64 * 4 <= 16  # two (32, 64) fp32 tensors, and scalars (the loss)
    # all activations freed after backward: what is left is the weight's gradient and scalars (the loss)
    assert 0 <= memory.now - weight.grad.untyped_storage().nbytes() <= 16


def test_flop_count_equals_flop_counter_mode():
    from torch.utils.flop_counter import FlopCounterMode

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SiLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    x = torch.randn(2, 3, 8, 8)
    ours, theirs = counters.FlopCount(), FlopCounterMode(display=False)
    with ours:
        model(x).sum().backward()
    with theirs:
        model(x).sum().backward()
    assert ours.flops == theirs.get_total_flops() > 0


def test_gpu_like_takes_fused_attention_and_bf16_on_meta():
    query = torch.empty(1, 2, 16, 8, device="meta", requires_grad=True)
    with scale.GpuLike():  # bf16 autocast: fused flash attention without a mask, efficient with one
        plain = torch.nn.functional.scaled_dot_product_attention(query, query, query)
        masked = torch.nn.functional.scaled_dot_product_attention(query, query, query,
                                                                  attn_mask=torch.zeros(1, 1, 1, 16, device="meta"))
    assert plain.dtype == torch.bfloat16 and "Flash" in type(plain.grad_fn).__name__
    assert "Efficient" in type(masked.grad_fn).__name__
    linear, original = nn.Linear(8, 8, device="meta"), torch.nn.functional.linear
    with scale.GpuLike():
        assert linear(torch.empty(2, 8, device="meta")).dtype == torch.bfloat16
        assert nn.LayerNorm(8, device="meta")(torch.empty(2, 8, device="meta", dtype=torch.bfloat16)).dtype == torch.float32
        assert torch.nn.functional.linear is not original  # swapped while active ...
    assert torch.nn.functional.linear is original  # ... and restored on exit


def test_selective_checkpointing_of_a_conv_net_matches_plain_gradients():
    from toy_nets import UNet

    torch.manual_seed(0)
    model = UNet(1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1)
    for p in model.parameters():  # the UNet zero-initialises its output conv; give every weight a gradient
        if p.abs().sum() == 0:
            nn.init.normal_(p, std=0.1)
    schedule = e2ediff.make_schedule("linear", zero_terminal_snr=True)
    z_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    grads = {}
    for checkpoint in (False, "selective"):
        model.zero_grad()
        out = e2ediff.unrolled_sample(model, z_T, schedule, 3, checkpoint=checkpoint)
        out.pow(2).mean().backward()
        grads[checkpoint] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert grads[False].norm() > 0
    torch.testing.assert_close(grads["selective"], grads[False], rtol=1e-5, atol=1e-7)


def test_selective_policy_keeps_matmul_and_conv_outputs_only():
    ctx = None
    assert selective_checkpoint.selective_policy(ctx, torch.ops.aten.mm.default) == torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE
    assert selective_checkpoint.selective_policy(ctx, torch.ops.aten.convolution.default) == torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE
    for op in (torch.ops.aten.native_group_norm.default, torch.ops.aten.silu.default, torch.ops.aten.add.Tensor):
        assert selective_checkpoint.selective_policy(ctx, op) == torch.utils.checkpoint.CheckpointPolicy.PREFER_RECOMPUTE


def test_checkpoint_policy_option_reaches_the_sampler_and_needs_grad_checkpoint():
    config = e2ediff.EndToEndConfig(checkpoint_policy="selective")
    assert config.sampler_options("epsilon")["checkpoint"] == "selective"
    assert e2ediff.EndToEndConfig().sampler_options("epsilon")["checkpoint"] == "full"
    assert e2ediff.EndToEndConfig(grad_checkpoint=False).sampler_options("epsilon")["checkpoint"] is False
    with pytest.raises(train_utils.OptionError, match="grad_checkpoint on with checkpoint_policy selective"):
        train_utils.validate(e2ediff.EndToEndConfig(grad_checkpoint=False, checkpoint_policy="selective"))
    with pytest.raises(train_utils.OptionError, match="checkpoint_policy: got 'some', need one of 'full', 'selective'"):
        train_utils.validate(e2ediff.EndToEndConfig(checkpoint_policy="some"))
    with pytest.raises(ValueError, match="unknown checkpoint 'blocks'; valid choices: 'full', 'selective'"):
        e2ediff.unrolled_sample(lambda z, t, c: z, torch.randn(2, 2), e2ediff.make_schedule(), 2, checkpoint="blocks")


def test_largest_batch_and_static_memory_of_the_paper_setting_are_consistent():
    pytest.importorskip("diffusers")
    denoiser, codec, perceptual = scale.build_t2i(scale.PIXART_XL_1024, scale.SD_VAE, "meta", lpips=False)
    assert 611e6 < scale.parameter_count(denoiser) < 612e6  # PixArt-XL-2: 611.3M
    static = scale.static_bytes(denoiser, codec, None, 4_762_310_656, precomputed=False, coupling="inversion", gpus=64)
    trained = scale.parameter_count(denoiser)
    assert static["transformer (fp32)"] == 4 * trained and static["AdamW state (fp32 exp_avg, exp_avg_sq)"] == 8 * trained
    assert static["frozen base copy (bf16)"] == 2 * trained and static["DDP gradient buckets (fp32)"] == 4 * trained
    assert static["T5-XXL encoder (bf16, frozen)"] == 2 * 4_762_310_656
