"""A whole tiny ``PixArtSigmaPipeline`` (T5 text stack, VAE, transformer) saved to a directory that loads
offline: the second pipeline family ``cachedit serve --model`` is tested with. It differs from Flux where
a server could trip: classifier-free guidance batched in one transformer call, a DPM-Solver scheduler,
resolution binning, and the old ``callback(step, timestep, latents)`` instead of ``callback_on_step_end``.

``sample_size=32`` is the smallest PixArt-Sigma's resolution bins accept (256-pixel bins): with the VAE's
factor 8 and patch 2, a 256x256 image is 256 image tokens; the text stream is T5's 300 padded tokens.
"""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

from tests.flux_pipeline import TEXT_DIM, t5_text_encoder, tiny_vae

SIZE = 256
TRANSFORMER_CONFIG = dict(
    num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=4,
    cross_attention_dim=32, sample_size=SIZE // 8, patch_size=2, caption_channels=TEXT_DIM,
    use_additional_conditions=False,
)


def save_tiny_pixart_pipeline(path, seed: int = 0) -> None:
    tokenizer, text_encoder = t5_text_encoder(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = PixArtTransformer2DModel(**TRANSFORMER_CONFIG).eval()
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(seed=seed), transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.save_pretrained(str(path))
