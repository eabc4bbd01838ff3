"""Tiny real diffusers transformers whose blocks Dynamo compiles one graph each (configs of our own).

HunyuanVideo 1.5 and Framepack are not in tests/models.py yet; their rows here follow the conventions of
Note [Tiny model table] (hidden size 32, 2 heads of 16, 7 text tokens, fp32, random init under seed 0).
Dynamo skips their top-level forward: HunyuanVideo 1.5 branches on ``torch.all(image_embeds == 0)``,
Framepack slices with a tensor index (``.item()``); each block's ``forward`` is then a graph of its own.
"""

from __future__ import annotations

from typing import Any

import torch

from tests.models import HEAD_DIM, HEADS, TEXT_DIM, TEXT_TOKENS, ModelSpec, Schedule, _randn


def _hunyuanvideo15_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, batch, 4, 2, 4, 4),  # [B, C, F, H, W], patch 1: 32 video tokens
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
        "encoder_attention_mask": torch.ones(batch, TEXT_TOKENS),
        "encoder_hidden_states_2": _randn(g, batch, 5, 16),
        "encoder_attention_mask_2": torch.ones(batch, 5),
        "image_embeds": torch.zeros(batch, 3, 16),  # text-to-video: the branch Dynamo cannot trace
    }


def _framepack_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, batch, 4, 2, 8, 8),  # [B, C, F, H, W], patch 2: 32 video tokens
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
        "encoder_attention_mask": torch.ones(batch, TEXT_TOKENS),
        "pooled_projections": _randn(g, batch, 16),
        "image_embeds": _randn(g, batch, 3, 16),
        "indices_latents": torch.arange(2, 4),  # 1-d frame indices (the pipeline runs one sample)
        "latents_clean": _randn(g, batch, 4, 1, 8, 8),
        "indices_latents_clean": torch.arange(1),
        "latents_history_2x": _randn(g, batch, 4, 2, 8, 8),
        "indices_latents_history_2x": torch.arange(4, 6),
        "latents_history_4x": _randn(g, batch, 4, 4, 8, 8),
        "indices_latents_history_4x": torch.arange(6, 10),
        "guidance": torch.full((batch,), 6.0),
    }


HUNYUANVIDEO15 = ModelSpec(
    "hunyuanvideo15", "HunyuanVideo15Transformer3DModel",
    dict(in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=4,
         num_refiner_layers=1, text_embed_dim=TEXT_DIM, text_embed_2_dim=16, image_embed_dim=16,
         rope_axes_dim=(4, 6, 6)),
    _hunyuanvideo15_inputs, Schedule.T1000_DESC, ("transformer_blocks",), 32, 15,
    single_graph=False, graph_break="`if is_t2v:` on torch.all(image_embeds == 0) in the top-level forward",
    pipeline_note="HunyuanVideo15Pipeline: timestep=t (FlowMatch, 1000 * sigma)",
)

FRAMEPACK = ModelSpec(
    "framepack", "HunyuanVideoFramepackTransformer3DModel",
    dict(in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=2,
         num_single_layers=3, num_refiner_layers=1, text_embed_dim=TEXT_DIM, pooled_projection_dim=16,
         rope_axes_dim=(4, 6, 6), has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True),
    _framepack_inputs, Schedule.T1000_DESC, ("transformer_blocks", "single_transformer_blocks"), 32, 10,
    single_graph=False, graph_break="a tensor-indexed slice that calls .item() in the top-level forward",
    pipeline_note="HunyuanVideoFramepackPipeline: timestep=t (FlowMatch, 1000 * sigma)",
)


def _nucleusmoe_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, batch, 16, 16),  # packed 2x2 patches of a 4-channel 8x8 latent
        "img_shapes": [(1, 4, 4)] * batch,
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
        "encoder_hidden_states_mask": torch.ones(batch, TEXT_TOKENS, dtype=torch.long),
    }


NUCLEUSMOE = ModelSpec(
    "nucleusmoe", "NucleusMoEImageTransformer2DModel",
    dict(patch_size=2, in_channels=16, out_channels=4, num_layers=6,  # mlp_ratio 6: dense FFN width 128 (0 below)
         attention_head_dim=HEAD_DIM,
         num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6), moe_enabled=True,
         num_experts=4, moe_intermediate_dim=32, capacity_factors=2.0, mlp_ratio=6.0),
    _nucleusmoe_inputs, Schedule.SIGMA_DESC, ("transformer_blocks",), 16, 7,
    single_graph=False,
    graph_break="MoE dispatch reads num_tokens_per_expert.tolist() in blocks 3..4 (dense: 0..2 and 5)",
    pipeline_note="NucleusMoEImagePipeline: timestep=t / 1000 (as QwenImage)",
)


def build(spec: ModelSpec, warm: bool = False) -> torch.nn.Module:
    """``spec.build``, plus initial values for NucleusMoE's expert weights, which the class allocates with
    ``torch.empty`` and leaves to checkpoint loading (uninitialised memory gave NaN outputs)."""
    model = spec.build()
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(module, name, None)
            if isinstance(weight, torch.nn.Parameter):
                with torch.no_grad():
                    weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)
    if warm:
        with torch.no_grad():
            model(**spec.inputs(spec.timesteps(2)[0]))
    return model
