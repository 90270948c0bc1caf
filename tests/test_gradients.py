"""The gradients that train the model, checked: torch.autograd.gradcheck through the unrolled sampler; checkpointed
equal to plain gradients with truncated backprop, and with --checkpoint-blocks through the VAE decode and LPIPS of
the tiny PixArt pipeline; the GAN term's gradient reaches the denoiser and never the discriminator, and in a latent
space the discriminator is shown decoded data. Run: python -m pytest -q tests/test_gradients.py
"""
import pytest
import torch
import torch.nn as nn

import e2ediff

# ---------------------------------------------------------------- the unrolled sampler, in float64


def tiny_model(weight, bias):
    """model(z (B, D), t, cond (B, D)) = tanh(z W + (t / 1000) b + cond): smooth, with its parameters as inputs."""
    return lambda z, t, cond: torch.tanh(z @ weight + (t.to(z.dtype) / 1000)[:, None] * bias + cond)


SAMPLERS = {  # name -> (schedule, unrolled_sample options)
    "ddim": (dict(kind="linear", zero_terminal_snr=True), dict(update="ddim", prediction_type="v_prediction")),
    "ddim_eta": (dict(kind="linear", zero_terminal_snr=True),
                 dict(update="ddim", eta=0.7, prediction_type="v_prediction")),
    "lcm": (dict(kind="linear"), dict(update="lcm", spacing="lcm", prediction_type="epsilon")),  # PixArt-delta's
}


def sampler(name, num_steps, **options):
    """(z_T, W, b) -> z0 through `num_steps` steps: a deterministic function (a fresh generator, seed 0, per call)."""
    schedule_options, sample_options = SAMPLERS[name]
    schedule = e2ediff.make_schedule(**schedule_options)
    cond = torch.linspace(-0.5, 0.5, 6, dtype=torch.float64).reshape(2, 3)

    def run(z_T, weight, bias):
        return e2ediff.unrolled_sample(tiny_model(weight, bias), z_T, schedule, num_steps, cond=cond,
                                       generator=torch.Generator().manual_seed(0), **sample_options, **options)
    return run


def inputs():
    generator = torch.Generator().manual_seed(1)
    return tuple((torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).requires_grad_(True)
                 for shape, scale in (((2, 3), 1.0), ((3, 3), 0.5), ((3,), 0.5)))


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("num_steps", [1, 2, 3])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_unrolled_sampler_passes_gradcheck(name, num_steps, checkpoint):
    # d z0 / d (z_T, W, b) by backprop through every step equals central finite differences
    assert torch.autograd.gradcheck(sampler(name, num_steps, checkpoint=checkpoint), inputs(), eps=1e-6, atol=1e-7,
                                    rtol=1e-5)


@pytest.mark.parametrize("name", ["ddim_eta", "lcm"])
def test_truncated_backprop_is_the_gradient_with_the_early_steps_detached_checkpointed_or_not(name):
    # backprop_steps K: W's gradient is that of the sampler whose first T - K steps see W as a constant
    num_steps, (z_T, weight, bias) = 3, inputs()
    schedule_options, sample_options = SAMPLERS[name]
    schedule = e2ediff.make_schedule(**schedule_options)
    grid = e2ediff.sampling_timesteps(1000, num_steps, sample_options.get("spacing", "trailing")).tolist()
    cond = torch.zeros(2, 3, dtype=torch.float64)
    for backprop_steps in range(1, num_steps + 1):
        graph_steps = grid[num_steps - backprop_steps:]

        def partly_detached(z, t, c):
            live = int(t[0]) in graph_steps
            return tiny_model(weight if live else weight.detach(), bias if live else bias.detach())(z, t, c)
        expected = torch.autograd.grad(e2ediff.unrolled_sample(
            partly_detached, z_T, schedule, num_steps, cond=cond, generator=torch.Generator().manual_seed(0),
            **sample_options).pow(2).sum(), (weight, bias))
        for checkpoint in (False, True):
            out = e2ediff.unrolled_sample(tiny_model(weight, bias), z_T, schedule, num_steps, cond=cond,
                                          generator=torch.Generator().manual_seed(0), checkpoint=checkpoint,
                                          backprop_steps=backprop_steps, **sample_options)
            got = torch.autograd.grad(out.pow(2).sum(), (weight, bias, z_T), allow_unused=True)
            torch.testing.assert_close(got[:2], expected, rtol=1e-12, atol=1e-14)
            assert (got[2] is None) == (backprop_steps < num_steps)  # z_T only through the whole chain


# ---------------------------------------------------------------- --checkpoint-blocks on the tiny pipeline


@pytest.fixture(scope="module")
def pixart_runs(tiny_pipeline, tmp_path_factory):
    """train_t2i Runs on the tiny PixArt-delta pipeline, T = 3 LCM steps, backprop through the last 2, LPIPS on
    decoded images: {"plain": no checkpointing, "checkpointed": --grad-checkpoint and --checkpoint-blocks}."""
    pytest.importorskip("diffusers")
    pytest.importorskip("lpips")
    import t2i_training
    runs = {}
    for name, flags in (("plain", ["--no-grad-checkpoint"]), ("checkpointed", ["--checkpoint-blocks"])):
        config = t2i_training.parse_config(t2i_training.Config, flags + [
            "--pretrained", str(tiny_pipeline("delta")), "--data", str(tiny_pipeline("images")), "--resolution", "64",
            "--max-text-length", "16", "--num-steps", "3", "--backprop-steps", "2", "--lpips-weight", "1",
            "--lpips-random-backbone", "--out-dir", str(tmp_path_factory.mktemp("unused"))])
        torch.manual_seed(0)  # the same random LPIPS backbone in both
        runs[name] = t2i_training.Run(config, t2i_training.Dist(), t2i_training.Log("unused", master=False))
    return runs


def test_checkpoint_blocks_gradients_through_vae_decode_and_lpips_match_plain(pixart_runs):
    generator = torch.Generator().manual_seed(0)
    z_T, target = torch.randn(2, 2, 4, 8, 8, generator=generator)
    images = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    cond = (torch.randn(2, 16, 32, generator=generator), torch.ones(2, 16, dtype=torch.long))
    grads, calls = {}, {}
    for name, run in pixart_runs.items():
        blocks = (run.denoiser.transformer.transformer_blocks[0], run.codec.vae.decoder.up_blocks[0])
        counted = [0, 0]
        hooks = [block.register_forward_pre_hook(lambda *_, i=i: counted.__setitem__(i, counted[i] + 1))
                 for i, block in enumerate(blocks)]  # pre-hooks: a recomputation may stop before the block returns
        torch.manual_seed(1)  # the LCM's noise
        loss, logs, _, _ = run.loss_fn(z_T, target, 0, cond, None, images)
        loss.backward()
        for hook in hooks:
            hook.remove()
        grads[name] = {n: p.grad for n, p in run.denoiser.named_parameters()}
        calls[name] = counted
        assert logs["lpips"] > 0 and logs["l2"] > 0
    checkpointed = pixart_runs["checkpointed"]
    assert checkpointed.denoiser.transformer.gradient_checkpointing
    assert checkpointed.codec.vae.decoder.gradient_checkpointing
    # recomputed in backward: more block calls (the proof that checkpointing ran), the same gradients
    assert all(c > p for c, p in zip(calls["checkpointed"], calls["plain"])), calls
    assert all(grads["plain"][n].abs().sum() > 0 for n in ("transformer.proj_out.weight",))
    for n, plain in grads["plain"].items():
        torch.testing.assert_close(grads["checkpointed"][n], plain, rtol=1e-5, atol=1e-7 * plain.abs().max())


# ---------------------------------------------------------------- the GAN term, in a latent space


class LatentDenoiser(nn.Module):
    """2-channel 4x4 latents -> 2-channel output, with a time input and a last layer."""

    def __init__(self):
        super().__init__()
        self.conv_in, self.conv_out = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 3, padding=1)

    @property
    def last_layer(self):
        return self.conv_out.weight

    def forward(self, z, t, cond=None):
        time = (t.float() / 1000)[:, None, None, None].expand(len(z), 1, *z.shape[-2:])
        return self.conv_out(torch.tanh(self.conv_in(torch.cat([z, time], dim=1))))


def decode(latents):
    """A fixed, differentiable 'VAE decoder': (B, 2, 4, 4) latents -> (B, 1, 16, 16) images."""
    return torch.tanh(nn.functional.interpolate(latents.sum(1, keepdim=True), scale_factor=4, mode="bilinear"))


def gan_setup(adaptive=False, coupling="independent", start_step=0):
    torch.manual_seed(0)
    config = e2ediff.EndToEndConfig(num_steps=2, update="ddim", lpips_weight=0.0, gan_weight=0.5,
                                    gan_adaptive=adaptive, gan_start_step=start_step, grad_checkpoint=False,
                                    coupling=coupling, teacher_steps=2)
    model, discriminator = LatentDenoiser(), e2ediff.PatchDiscriminator(in_channels=1, base_channels=8, num_layers=1)
    gan = e2ediff.GANLoss(discriminator, config)
    schedule = e2ediff.make_schedule("linear", zero_terminal_snr=True)
    return config, model, discriminator, gan, e2ediff.EndToEndLoss(model, schedule, config, gan=gan, decode=decode)


@pytest.mark.parametrize("adaptive", [False, True])
def test_gan_term_reaches_the_denoiser_and_never_the_discriminator(adaptive):
    _, model, discriminator, gan, loss_fn = gan_setup(adaptive)
    z_T, target = torch.randn(2, 4, 2, 4, 4).unbind(0)
    loss, logs, fake, _ = loss_fn(z_T, target, step=0)
    loss.backward()
    assert all(p.grad is None for p in discriminator.parameters())  # the generator's loss gives D nothing
    assert all(p.requires_grad for p in discriminator.parameters())  # and D trains in its own step
    with_gan = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # the same forward, with the GAN term rebuilt by hand: its gradient is with_gan minus the L2 term's
    z0 = e2ediff.unrolled_sample(model, z_T, loss_fn.schedule, 2, **loss_fn.sampler_options)
    l2 = (z0 - target).pow(2).mean()
    l2_grads = torch.autograd.grad(l2, list(model.parameters()), retain_graph=True)
    adversarial = -discriminator(decode(z0)).mean()  # hinge generator loss, on the decoded output
    gan_grads = torch.autograd.grad(logs["gan_weight"] * adversarial, list(model.parameters()))
    assert logs["gan"] == pytest.approx(float(adversarial.detach()), rel=1e-6)
    assert all(g.abs().sum() > 0 for g in gan_grads)
    for total, recon, adv in zip(with_gan, l2_grads, gan_grads):
        torch.testing.assert_close(total, recon + adv, rtol=1e-5, atol=1e-8)
    assert all(p.grad is None for p in discriminator.parameters())


@pytest.mark.parametrize("coupling,images", [("independent", False), ("independent", True), ("teacher", False)])
def test_latent_space_discriminator_is_shown_decoded_data(coupling, images):
    # real samples: the given pixels, else the data's latents decoded (never a teacher's sample);
    # fake samples: the sampler's output, decoded
    config, model, discriminator, gan, loss_fn = gan_setup(coupling=coupling)
    seen = []
    discriminator.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    data = torch.randn(2, 2, 4, 4)
    pixels = torch.rand(2, 1, 16, 16) * 2 - 1
    batch = {"target": data, **({"images": pixels} if images else {})}
    optimizer, ema = torch.optim.SGD(model.parameters(), lr=0.0), e2ediff.EMA(model, config.ema_decay)
    e2ediff.train_step(loss_fn, optimizer, ema, [batch], step=0, gan=gan, base_model=LatentDenoiser(),
                       generator=torch.Generator().manual_seed(3))
    fake_for_generator, real, fake = seen
    assert real.shape == fake.shape == (2, 1, 16, 16)  # images, not (B, 2, 4, 4) latents
    torch.testing.assert_close(real, pixels if images else decode(data))
    torch.testing.assert_close(fake, fake_for_generator)
    z_T = torch.randn(data.shape, generator=torch.Generator().manual_seed(3))  # the coupling's draw
    with torch.no_grad():
        output = e2ediff.unrolled_sample(model, z_T, loss_fn.schedule, 2, **loss_fn.sampler_options)
    torch.testing.assert_close(fake, decode(output))
