"""``EmbeddedDiTPipeline``: text-to-image with a small Flux transformer in pixel space.

Diffusers conventions throughout: ``prompt`` / ``negative_prompt`` / ``prompt_embeds``,
``guidance_scale`` (classifier-free guidance, cond and uncond in one batched forward),
``num_inference_steps``, ``generator``, ``latents``, ``output_type`` ("pil", "np", "pt") and
``FlowMatchEulerDiscreteScheduler``. There is no VAE: the "latent" is the RGB image in
``[-1, 1]``, cut into ``p x p`` patches (``p`` follows from the transformer's ``in_channels``) and
packed into tokens exactly as Flux packs its 2x2 latent patches.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from cachedit.embedded.text_encoder import WordTextEncoder

IMAGE_CHANNELS = 3


def pack_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), C*p*p]``, row-major over patches, like Flux's packing."""
    b, c, h, w = images.shape
    x = images.view(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack_patches(tokens: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """Inverse of :func:`pack_patches`."""
    b, _, d = tokens.shape
    c = d // (patch * patch)
    x = tokens.view(b, height // patch, width // patch, c, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_ids(height: int, width: int, patch: int, device=None) -> torch.Tensor:
    """Flux's positional ids ``[S, 3]``: (0, row, col) per patch token."""
    rows, cols = height // patch, width // patch
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(rows * cols, 3)


def patch_size_of(transformer: FluxTransformer2DModel) -> int:
    patch = math.isqrt(transformer.config.in_channels // IMAGE_CHANNELS)
    if IMAGE_CHANNELS * patch * patch != transformer.config.in_channels:
        raise ValueError(
            f"transformer.config.in_channels={transformer.config.in_channels} is not 3*p*p for an integer p; "
            "the embedded pipeline works in RGB pixel space and needs in_channels = 3 * patch**2"
        )
    return patch


class EmbeddedDiTPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder: WordTextEncoder,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=True)
        self.default_sample_size = 32

    @property
    def patch_size(self) -> int:
        return patch_size_of(self.transformer)

    def encode_prompt(
        self, prompt: str | list[str], device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds [B, T, D], pooled_prompt_embeds [B, D])``."""
        ids = self.text_encoder.tokenize(prompt).to(device or self._execution_device)
        return self.text_encoder(ids)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        height = height or self.default_sample_size
        width = width or self.default_sample_size
        patch = self.patch_size
        if height % patch or width % patch:
            raise ValueError(f"height and width must be multiples of the patch size {patch}; got {height}x{width}")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("`prompt_embeds` needs `pooled_prompt_embeds` too (the text encoder's pooled output)")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt'; got {output_type!r}")
        device = self._execution_device
        dtype = self.transformer.dtype

        if prompt_embeds is None:
            prompt_embeds, pooled_prompt_embeds = self.encode_prompt(prompt, device)
        batch = prompt_embeds.shape[0]
        do_cfg = guidance_scale > 1.0
        if do_cfg and negative_prompt_embeds is None:
            negative_prompt = negative_prompt if negative_prompt is not None else ""
            if isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * batch
            if len(negative_prompt) != batch:
                raise ValueError(f"got {len(negative_prompt)} negative prompts for {batch} prompts")
            negative_prompt_embeds, negative_pooled_prompt_embeds = self.encode_prompt(negative_prompt, device)

        def repeat(x):
            return x.repeat_interleave(num_images_per_prompt, dim=0).to(device=device, dtype=dtype)

        prompt_embeds, pooled_prompt_embeds = repeat(prompt_embeds), repeat(pooled_prompt_embeds)
        if do_cfg:
            # Note: uncond first, cond second, one batched forward per step.
            prompt_embeds = torch.cat([repeat(negative_prompt_embeds), prompt_embeds])
            pooled_prompt_embeds = torch.cat([repeat(negative_pooled_prompt_embeds), pooled_prompt_embeds])
        total = batch * num_images_per_prompt

        if latents is None:
            shape = (total, IMAGE_CHANNELS, height, width)
            if isinstance(generator, list):
                latents = torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generator])
            else:
                latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        latents = pack_patches(latents.to(device=device, dtype=torch.float32), patch)  # [B, S, 3*p*p]
        img_ids = image_ids(height, width, patch, device)
        txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device)

        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)

        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for t in timesteps:
                model_input = torch.cat([latents] * 2) if do_cfg else latents
                timestep = (t / 1000).expand(model_input.shape[0]).to(dtype)
                noise_pred = self.transformer(
                    hidden_states=model_input.to(dtype),
                    encoder_hidden_states=prompt_embeds,
                    pooled_projections=pooled_prompt_embeds,
                    timestep=timestep,
                    img_ids=img_ids,
                    txt_ids=txt_ids,
                    return_dict=False,
                )[0].float()
                if do_cfg:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                progress_bar.update()

        image = unpack_patches(latents, height, width, patch)  # [B, 3, H, W] in about [-1, 1]
        image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
