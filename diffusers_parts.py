"""diffusers_parts — diffusers models in e2ediff's protocol, shared by train_t2i.py and benchmarks/scale.py.

DiffusersDenoiser makes a PixArt transformer (or a UNet2DConditionModel) a `Denoiser`,
model(z_t, t, cond) -> output; LatentCodec is the frozen VAE as the map between images and the
denoiser's scaled latents. Neither imports diffusers: they wrap models the caller built or loaded.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class DiffusersDenoiser(nn.Module):
    """A diffusers PixArt transformer (or UNet2DConditionModel) in e2ediff's protocol:
    model(z_t (B, C, h, w), t (B,), cond=(text_embeddings (B, L, D), attention_mask (B, L))) -> (B, C, h, w)."""

    def __init__(self, transformer: nn.Module, vae_scale_factor: int = 8):
        super().__init__()
        self.transformer, self.vae_scale_factor = transformer, vae_scale_factor

    @property
    def last_layer(self) -> torch.Tensor:
        """The output projection's weight, where the adaptive GAN weight compares gradient norms."""
        for name in ("proj_out", "conv_out"):  # PixArt / UNet
            if hasattr(self.transformer, name):
                return getattr(self.transformer, name).weight
        return [p for p in self.transformer.parameters() if p.dim() > 1][-1]

    def forward(self, z_t, t, cond):
        text_embeddings, attention_mask = cond
        kwargs = {}
        if type(self.transformer).__name__ == "PixArtTransformer2DModel":
            # the multi-scale (1024-MS) models also take the image size and aspect ratio
            kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
            if self.transformer.use_additional_conditions:
                height, width = (s * self.vae_scale_factor for s in z_t.shape[-2:])
                kwargs["added_cond_kwargs"] = {
                    "resolution": z_t.new_tensor([[height, width]]).expand(len(z_t), 2),
                    "aspect_ratio": z_t.new_tensor([[height / width]]).expand(len(z_t), 1)}
        output = self.transformer(z_t, timestep=t, encoder_hidden_states=text_embeddings,
                                  encoder_attention_mask=attention_mask, return_dict=False, **kwargs)[0]
        if output.shape[1] == 2 * z_t.shape[1]:  # PixArt's out_channels = 2 C: a learned variance we do not use
            output = output[:, : z_t.shape[1]]
        return output


class LatentCodec:
    """The frozen VAE as the map between images in [-1, 1] and the denoiser's (scaled) latents."""

    def __init__(self, vae):
        self.vae = vae
        self.scale, self.shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def distribution(self, images):
        """(B, 3, H, W) -> mean, std of q(z | x), each (B, C, H/f, W/f), unscaled."""
        posterior = self.vae.encode(images).latent_dist
        return posterior.mean, posterior.std

    def sample(self, mean, std):
        """A latent from the posterior, scaled as the denoiser was trained: (z - shift) * scale."""
        return (mean.float() + std.float() * torch.randn_like(mean, dtype=torch.float32) - self.shift) * self.scale

    def decode(self, latents):
        """Differentiable w.r.t. the latents (the VAE's own weights are frozen)."""
        return self.vae.decode(latents / self.scale + self.shift).sample
