"""A tiny real ``FluxPipeline`` built from components, with no downloads, for pipeline-level tests.

The transformer is a random-init ``FluxTransformer2DModel`` (2 double + 4 single blocks, 2 heads of 16,
fp32, eval mode) built under a fixed seed, so every call of ``tiny_flux_pipeline()`` holds the same
weights. There are no text encoders and no VAE: the pipeline is driven with ``prompt_embeds`` and
``pooled_prompt_embeds`` and returns packed latents (``output_type="latent"``). At 64x64 pixels the
latent is 8x8x4, packed 2x2 into 16 image tokens of 16 channels; the text stream has 7 tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

TEXT_TOKENS = 7
TEXT_DIM = 32
HEIGHT = WIDTH = 64  # with no VAE the pipeline assumes a scale factor of 8: an 8x8 latent, 16 packed tokens
IMAGE_TOKENS = (HEIGHT // 16) * (WIDTH // 16)
CHANNELS = 16  # packed: 4 latent channels x 2 x 2
TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=CHANNELS,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=TEXT_DIM,
    pooled_projection_dim=TEXT_DIM,
    guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
)


def tiny_flux_transformer(seed: int = 0) -> FluxTransformer2DModel:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return FluxTransformer2DModel(**TRANSFORMER_CONFIG).eval()


def tiny_flux_pipeline(cls: type = FluxPipeline, seed: int = 0) -> FluxPipeline:
    """A pipeline of class ``cls`` (FluxPipeline or a subclass) around ``tiny_flux_transformer(seed)``."""
    return cls(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=tiny_flux_transformer(seed),
    )


def prompt(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-ins for the text encoders' output: ``prompt_embeds`` [1, 7, 32] and pooled [1, 32]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g), torch.randn(1, TEXT_DIM, generator=g)


def generate(
    pipe: FluxPipeline, steps: int | None, *, true_cfg: bool = False, seed: int = 0, **extra: Any
) -> torch.Tensor:
    """One ``pipe(...)`` call; returns the final packed latents [1, 16, 16].

    ``steps=None`` leaves ``num_inference_steps`` out of the call (the pipeline's default, 28).
    With ``true_cfg`` the pipeline runs true CFG (scale 2 with a negative prompt): two transformer calls
    per step, the positive prompt first. ``extra`` goes into the call as it is (e.g. ``cachedit={...}``).
    """
    embeds, pooled = prompt(1)
    kwargs: dict[str, Any] = dict(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        height=HEIGHT,
        width=WIDTH,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    if true_cfg:
        negative, negative_pooled = prompt(2)
        kwargs.update(true_cfg_scale=2.0, negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(**kwargs, **extra)[0]


def clip_text_encoder(seed: int = 0):
    """A tiny real CLIP text stack that loads offline: a tokenizer over the 256 byte-level symbols (no merges),
    built from an in-memory vocabulary, and a 1-layer ``CLIPTextModel`` of width ``TEXT_DIM``."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=TEXT_DIM, bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
        )).eval()
    return tokenizer, model


def t5_text_encoder(seed: int = 0):
    """A tiny real T5 text stack that loads offline: a unigram tokenizer over a few dozen pieces and a
    1-layer ``T5EncoderModel`` of width ``TEXT_DIM``."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    words = "a an the red green blue yellow purple orange large small circle square triangle on in at of".split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=32)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
            relative_attention_num_buckets=8,
        )).eval()
    return tokenizer, model


def tiny_vae(seed: int = 0):
    """A 4-level ``AutoencoderKL``: scale factor 8, 4 latent channels, 8 channels wide."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[8] * 4, layers_per_block=1, latent_channels=4, norm_num_groups=4,
            use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.5, shift_factor=0.1,
        ).eval()


def save_tiny_flux_pipeline(path, seed: int = 0) -> None:
    """Save a whole tiny ``FluxPipeline`` (text encoders, tokenizers, VAE, transformer) to ``path``, so that
    ``DiffusionPipeline.from_pretrained(path)`` loads it offline. Images are 16-pixel multiples (VAE 8 x
    2x2 packing); at 64x64 the transformer sees 16 image tokens and 512 text tokens (T5's default padding)."""
    tokenizer, text_encoder = clip_text_encoder(seed)
    tokenizer_2, text_encoder_2 = t5_text_encoder(seed)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(seed=seed), transformer=tiny_flux_transformer(seed),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
    )
    pipe.save_pretrained(str(path))
