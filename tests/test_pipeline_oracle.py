"""diffusers' PixArtAlphaPipeline as the oracle of train_t2i.py's sampler: what a user opens the trained model in.

For T = 1, 2, 4 the pipeline (given the text embeddings, z_T, guidance scale 1, the same generator for the LCM's
per-step noise) and e2ediff.unrolled_sample through the script's own parts (its DiffusersDenoiser adapter, the
schedule it reads from scheduler_config.json, its --spacing auto grid, its VAE decode) give the same latents and
the same images, to 1e-5 relative. The tiny pipelines (conftest.py's tiny_pipeline) carry PixArt-delta's
scheduler, with and without the 1024-MS resolution and aspect-ratio conditions, and Stable Diffusion's
scaled_linear LCMScheduler. Run: python -m pytest -q tests/test_pipeline_oracle.py
"""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import e2ediff  # noqa: E402
import t2i_training  # noqa: E402

PIPELINES = ("delta", "delta_ms", "sd_lcm")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=PIPELINES)
def parts(request, tiny_pipeline, tmp_path_factory):
    """(the script's Run on a tiny pipeline, the same folder loaded as PixArtAlphaPipeline)."""
    from diffusers import PixArtAlphaPipeline
    folder = tiny_pipeline(request.param)
    config = t2i_training.parse_config(t2i_training.Config, [
        "--pretrained", str(folder), "--data", str(tiny_pipeline("images")), "--resolution", "64",
        "--max-text-length", "16", "--lpips-weight", "0", "--out-dir", str(tmp_path_factory.mktemp("unused"))])
    run = t2i_training.Run(config, t2i_training.Dist(), t2i_training.Log("unused", master=False))
    pipeline = PixArtAlphaPipeline.from_pretrained(str(folder))
    pipeline.set_progress_bar_config(disable=True)
    assert run.denoiser.transformer.use_additional_conditions == (request.param == "delta_ms")
    return run, pipeline


def script_sample(run, z_T, num_steps, seed):
    """The script's sampler (as its generate() runs it) from a given z_T: latents, and images in [0, 1]."""
    with torch.no_grad():
        z0 = e2ediff.unrolled_sample(run.ema.module, z_T, run.schedule, num_steps, cond=run.sample_cond,
                                     generator=torch.Generator().manual_seed(seed),
                                     **run.config.e2e.sampler_options(run.prediction_type))
        return z0, (run.codec.decode(z0) / 2 + 0.5).clamp(0, 1)


def pipeline_sample(pipeline, cond, z_T, num_steps, seed, output_type):
    return pipeline(prompt_embeds=cond[0], prompt_attention_mask=cond[1], latents=z_T, guidance_scale=1.0,
                    num_inference_steps=num_steps, height=8 * z_T.shape[-2], width=8 * z_T.shape[-1],
                    generator=torch.Generator().manual_seed(seed), output_type=output_type,
                    use_resolution_binning=False).images


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_script_sampler_equals_pixart_alpha_pipeline(parts, num_steps):
    run, pipeline = parts
    assert run.prediction_type == "epsilon" and run.config.e2e.spacing == "lcm"  # the base's own, from its config
    z_T = torch.randn(len(run.sample_cond[0]), 4, 8, 8, generator=torch.Generator().manual_seed(1))
    latents, images = script_sample(run, z_T, num_steps, seed=2)
    expected_latents = pipeline_sample(pipeline, run.sample_cond, z_T, num_steps, 2, "latent")
    expected_images = pipeline_sample(pipeline, run.sample_cond, z_T, num_steps, 2, "pt")
    assert relative_error(latents, expected_latents) <= 1e-5
    assert relative_error(images, expected_images) <= 1e-5
    if num_steps > 1:  # the per-step noise is the generator's, in the pipeline's order: another seed differs
        other = pipeline_sample(pipeline, run.sample_cond, z_T, num_steps, 3, "latent")
        assert relative_error(latents, other) > 1e-3


def test_script_sampler_equals_the_pipeline_off_the_square(parts):
    # 64 x 48 px: the 1024-MS models' resolution and aspect-ratio conditions read (height, width) and height / width
    run, pipeline = parts
    z_T = torch.randn(len(run.sample_cond[0]), 4, 8, 6, generator=torch.Generator().manual_seed(1))
    latents, _ = script_sample(run, z_T, 2, seed=2)
    expected = pipeline_sample(pipeline, run.sample_cond, z_T, 2, 2, "latent")
    assert relative_error(latents, expected) <= 1e-5
