"""Tiny real diffusers transformers for the test suite: one row per model, built from config.

Note [Tiny model table]
~~~~~~~~~~~~~~~~~~~~~~~
Every row builds the real diffusers class from a config (random init under torch.manual_seed(0), fp32, eval
mode, no downloads) and draws its forward kwargs the way that model's pipeline shapes them: packed latents
for Flux-likes, [B, F, C, H, W] for CogVideoX, channels-last for Kandinsky 5, a list of [C, F, H, W] for
Z-Image. Sizes are chosen so that

- the block chain (`block_lists`, in execution order) has at least 3 blocks per list, or >= 2 per list where it
  spans two lists; other repeated-module lists (`side_lists`: token refiners, text-only encoder blocks,
  MoE experts, caption projections) keep the size the real model has, because the chain finder must skip them;
- hidden size is 32 with 2 heads of 16 (OmniGen, HunyuanDiT alike), so one eager forward is milliseconds;
- image and text token counts differ (the backend tells streams apart by shape): 16 image tokens for
  images, 32 for videos, 7 text tokens (Z-Image pads every stream to a multiple of 32, so it uses 64 image
  tokens against 32 padded caption tokens).

`timesteps(n)` follows the value and direction that each pipeline passes to its transformer
(`Schedule` says which); `denoise` is a plain Euler loop with dt = -1/n regardless of that convention: it
only has to make the latent drift smoothly from step to step, as in a real sampling run.

Zero-initialised weight matrices (Kandinsky 5 modulation, Mochi rope frequencies) get small random values,
as a trained checkpoint has; otherwise Kandinsky 5 would ignore its timestep.

`single_graph` and the lists are facts checked against torch 2.13 + diffusers 0.42.1 (`torch._dynamo.explain`;
`TEST_GRAPH_COUNTS=1 pytest tests/test_models.py` re-checks them). A row that is not single-graph names
the break in `graph_break`: those breaks are in the diffusers forward, and the backend must decline them
gracefully (or handle the pieces), never patch the model.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable

import diffusers
import numpy as np
import torch
from diffusers.models.embeddings import get_2d_rotary_pos_embed

HIDDEN = 32  # model width of every row
PER_BLOCK_IN_REQUEST = {"HiDreamImageTransformer2DModel"}  # per-block rows whose forward keeps no timestep local
HEADS = 2
HEAD_DIM = HIDDEN // HEADS  # 16: head_dim >= 8 and divisible for 3-axis rope (4 + 6 + 6)
TEXT_DIM = 32  # width of the fake text-encoder output
TEXT_TOKENS = 7


class Schedule(enum.Enum):
    """What a pipeline passes as the transformer's timestep, and in which direction it runs."""

    SIGMA_DESC = "sigma in (0, 1], descending (pipeline passes t / 1000)"
    T1000_DESC = "t in (0, 1000], descending (flow matching, t = 1000 * sigma)"
    DDPM_DESC = "integer t from 999 down to 0 (DDPM/DDIM/DPM-Solver)"
    SIGMA_ASC = "1 - sigma in [0, 1), ascending (0 is noise)"
    T1000_ASC = "1000 * (1 - sigma) in [0, 1000), ascending (0 is noise)"

    def values(self, num_steps: int) -> list[float]:
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)  # what FlowMatch pipelines hand the scheduler
        if self is Schedule.SIGMA_DESC:
            return [float(s) for s in sigmas]
        if self is Schedule.T1000_DESC:
            return [float(1000.0 * s) for s in sigmas]
        if self is Schedule.DDPM_DESC:
            return [float(t) for t in np.linspace(999, 0, num_steps).round()]
        if self is Schedule.SIGMA_ASC:
            return [float(1.0 - s) for s in sigmas]
        return [float(1000.0 * (1.0 - s)) for s in sigmas]


@dataclass(frozen=True)
class ModelSpec:
    """One tiny model: how to build it, what to feed it, how to read its output."""

    name: str
    cls: str  # diffusers class name
    config: dict[str, Any]
    make_inputs: Callable[[torch.Generator, int], dict[str, Any]]  # (generator, batch) -> kwargs minus timestep
    schedule: Schedule
    block_lists: tuple[str, ...]  # module paths of the block ModuleLists, in execution order
    image_tokens: int  # image/video patches
    text_tokens: int  # text tokens after the model's own padding and register tokens (0: no text)
    latent_key: str = "hidden_states"
    timestep_key: str = "timestep"
    learned_sigma: bool = False  # output carries [prediction, variance] along dim 1
    latent_is_list: bool = False  # the latent kwarg is a list of per-sample tensors (Z-Image)
    side_lists: tuple[str, ...] = ()  # other ModuleLists of repeated modules, not part of the chain
    single_graph: bool = True  # Dynamo captures a fresh model's forward as one graph (fullgraph=True works)
    warm_single_graph: bool | None = None  # the same after one eager forward (`build(warm=True)`); None: same
    graph_break: str | None = None  # why not, when single_graph is False
    pipeline_note: str = ""  # where the timestep convention comes from
    chain: tuple[str, ...] | None = None  # the lists the backend chains, where not all of block_lists
    out_tokens: int | None = None  # the output holds [text | image] tokens: the last `out_tokens` are the latent's
    uncached: str | None = None  # why the backend declines every piece that holds the main blocks (asserted)
    per_block: bool = False  # the main blocks are split over graphs: the per-block path caches them
    reads_timestep: bool = True  # False: the forward never uses its timestep, so the graph has none to see

    @property
    def status(self) -> str:
        """The README's status of this row: how the backend treats it today (checked by tests/test_models.py)."""
        if self.uncached is not None:
            return f"uncached: {self.uncached}"
        if self.per_block:
            where = ", inside a request only (the forward rebinds its timestep)" if self.cls in PER_BLOCK_IN_REQUEST else ""
            return f"step-cached, per-block (each block a graph, or pieces of one){where}"
        if not self.single_graph_when_warm:
            return "step-cached in one piece of several (it reads the forward's timestep)"
        if not self.reads_timestep:
            return "step-cached, whole graph (the forward does not use its timestep: it is read from its frame)"
        return "step-cached, whole graph"

    def build(self, warm: bool = False) -> torch.nn.Module:
        """The model in eval mode, fp32, weights from torch.manual_seed(0).

        `warm=True` runs one eager forward first, so state that the model builds lazily on its first call
        (Z-Image's rope table) exists before anything traces it.
        """
        torch.manual_seed(0)
        model = getattr(diffusers, self.cls)(**self.config)
        _fill_zero_init(model)
        assert all(p.dtype == torch.float32 for p in model.parameters()), f"{self.name}: expected fp32 parameters"
        model.eval()
        if warm:
            with torch.no_grad():
                model(**self.inputs(self.timesteps(2)[0]))
        return model

    @property
    def single_graph_when_warm(self) -> bool:
        return self.single_graph if self.warm_single_graph is None else self.warm_single_graph

    def timesteps(self, num_steps: int) -> list[float]:
        return self.schedule.values(num_steps)

    def inputs(self, timestep: float, seed: int = 0, batch: int = 1) -> dict[str, Any]:
        """Forward kwargs: latent and conditioning drawn from `seed` only, so they do not depend on `timestep`."""
        generator = torch.Generator("cpu").manual_seed(seed)
        kwargs = self.make_inputs(generator, batch)
        kwargs[self.timestep_key] = torch.full((batch,), float(timestep), dtype=torch.float32)
        return kwargs

    def latent(self, kwargs: dict[str, Any]) -> torch.Tensor:
        value = kwargs[self.latent_key]
        return torch.stack(value) if self.latent_is_list else value

    def with_step(self, kwargs: dict[str, Any], latent: torch.Tensor, timestep: float) -> dict[str, Any]:
        """A copy of `kwargs` with the noisy latent and the timestep replaced."""
        kwargs = dict(kwargs)
        kwargs[self.latent_key] = list(latent.unbind(0)) if self.latent_is_list else latent
        batch = latent.shape[0]
        kwargs[self.timestep_key] = torch.full((batch,), float(timestep), dtype=torch.float32)
        return kwargs

    def out_to_latent(self, output: Any) -> torch.Tensor:
        sample = output.sample if hasattr(output, "sample") else output[0]
        if self.latent_is_list:
            sample = torch.stack(list(sample))
        if self.learned_sigma:
            sample = sample.chunk(2, dim=1)[0]
        if self.out_tokens is not None:
            sample = sample[:, -self.out_tokens :]
        return sample


def denoise(
    model: Callable[..., Any],
    spec: ModelSpec,
    num_steps: int = 20,
    seed: int = 0,
    batch: int = 1,
    call: Callable[[Callable[..., Any], dict[str, Any]], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Euler loop x <- x - out / num_steps over `spec.timesteps(num_steps)`; returns (final x, per-step outputs).

    `call(model, kwargs)` replaces `spec.out_to_latent(model(**kwargs))` and must return a latent-shaped
    tensor: use it to run separate-CFG (two calls per step with different conditioning) or to count calls.
    """
    timesteps = spec.timesteps(num_steps)
    base = spec.inputs(timesteps[0], seed=seed, batch=batch)
    x = spec.latent(base)
    dt = -1.0 / num_steps
    outputs = []
    with torch.no_grad():
        for t in timesteps:
            kwargs = spec.with_step(base, x, t)
            out = call(model, kwargs) if call is not None else spec.out_to_latent(model(**kwargs))
            outputs.append(out)
            x = x + dt * out
    return x, outputs


def _fill_zero_init(model: torch.nn.Module) -> None:
    """Give zero-initialised weight matrices small random values, as any trained checkpoint has.

    Kandinsky 5 zero-inits its modulation layers, which would make the output independent of the timestep;
    Mochi zero-inits its learned rope frequencies. Continues the seeded stream started in `build`.
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(0.0, 0.02)


# --- input builders: (generator, batch) -> kwargs without the timestep --------------------------------------


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float32)


def _grid_ids(height: int, width: int, axes: int = 3) -> torch.Tensor:
    """Flux-style position ids [H*W, axes]: (0, row, col[, 0])."""
    ids = torch.zeros(height, width, axes)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, axes)


def _flux_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, batch, 16, 16),  # [B, 4x4 packed patches, 4 ch * 2x2]
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
        "pooled_projections": _randn(g, batch, TEXT_DIM),
        "img_ids": _grid_ids(4, 4),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
        "guidance": torch.full((batch,), 3.5),
    }


def _flux2_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    txt_ids = torch.zeros(TEXT_TOKENS, 4)
    txt_ids[:, 3] = torch.arange(TEXT_TOKENS)
    return {
        "hidden_states": _randn(g, batch, 16, 16),
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
        "img_ids": _grid_ids(4, 4, axes=4).repeat(batch, 1, 1),
        "txt_ids": txt_ids.repeat(batch, 1, 1),
        "guidance": torch.full((batch,), 4.0),
    }


def _chroma_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, batch, 16, 16),
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
        "img_ids": _grid_ids(4, 4),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
        "attention_mask": torch.ones(batch, TEXT_TOKENS + 16, dtype=torch.bool),  # text mask + image ones
    }


def _qwenimage_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, batch, 16, 16),
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
        "encoder_hidden_states_mask": torch.ones(batch, TEXT_TOKENS, dtype=torch.long),
        "img_shapes": [[(1, 4, 4)]] * batch,
    }


def _sd3_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
        "pooled_projections": _randn(g, batch, TEXT_DIM),
    }


def _auraflow_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
    }


def _wan_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, batch, 4, 2, 8, 8),  # [B, C, F, H, W] -> 2 x 4 x 4 = 32 tokens
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
    }


def _hunyuanvideo_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, batch, 4, 2, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
        "encoder_attention_mask": torch.ones(batch, TEXT_TOKENS),
        "pooled_projections": _randn(g, batch, TEXT_DIM),
        "guidance": torch.full((batch,), 6000.0),  # pipeline passes guidance_scale * 1000
    }


def _cogvideox_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, batch, 2, 4, 8, 8),  # [B, F, C, H, W]
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
    }


def _pixart_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
        "encoder_attention_mask": torch.ones(batch, TEXT_TOKENS),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def _ltx_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, batch, 32, 8),  # packed [B, F*H*W = 2*4*4, C]
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
        "encoder_attention_mask": torch.ones(batch, TEXT_TOKENS),
        "num_frames": 2,
        "height": 4,
        "width": 4,
        "rope_interpolation_scale": (8 / 25, 32, 32),  # (temporal ratio / frame rate, spatial, spatial)
    }


def _zimage_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    latents = _randn(g, batch, 4, 1, 16, 16)  # 8 x 8 = 64 patches; captions pad to 32
    caps = _randn(g, batch, TEXT_TOKENS, TEXT_DIM)
    return {"x": list(latents.unbind(0)), "cap_feats": list(caps.unbind(0))}


def _cogview4_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    def pair(a: float, b: float) -> torch.Tensor:
        return torch.tensor([[a, b]]).repeat(batch, 1)

    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
        "original_size": pair(64, 64),
        "target_size": pair(64, 64),
        "crop_coords": pair(0, 0),
    }


def _allegro_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, batch, 4, 2, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
        "encoder_attention_mask": torch.ones(batch, TEXT_TOKENS),
    }


def _dit_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "class_labels": torch.randint(0, 1000, (batch,), generator=g),
    }


_HUNYUANDIT_T5_TOKENS = 5


def _hunyuandit_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    rotary = get_2d_rotary_pos_embed(HEAD_DIM, ((0, 0), (4, 4)), (4, 4), output_type="pt")
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
        "text_embedding_mask": torch.ones(batch, TEXT_TOKENS),
        "encoder_hidden_states_t5": _randn(g, batch, _HUNYUANDIT_T5_TOKENS, TEXT_DIM),
        "text_embedding_mask_t5": torch.ones(batch, _HUNYUANDIT_T5_TOKENS),
        "image_meta_size": torch.tensor([[64.0, 64.0, 64.0, 64.0, 0.0, 0.0]]).repeat(batch, 1),
        "style": torch.zeros(batch, dtype=torch.long),
        "image_rotary_emb": rotary,
    }


def _sana_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
        "encoder_attention_mask": torch.ones(batch, TEXT_TOKENS),
    }


def _kandinsky5_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, batch, 2, 8, 8, 4),  # channels-last [B, F, H, W, C]
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
        "pooled_projections": _randn(g, batch, 16),
        "visual_rope_pos": [torch.arange(2), torch.arange(4), torch.arange(4)],
        "text_rope_pos": torch.arange(TEXT_TOKENS),
    }


def _mochi_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, batch, 4, 2, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
        "encoder_attention_mask": torch.ones(batch, TEXT_TOKENS),
    }


def _lumina2_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
        "encoder_attention_mask": torch.ones(batch, TEXT_TOKENS, dtype=torch.bool),
    }


_HIDREAM_LLAMA_TOKENS = 5
_HIDREAM_LAYERS = 6  # 3 double + 3 single blocks, one llama layer each


def _hidream_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "encoder_hidden_states_t5": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
        "encoder_hidden_states_llama3": _randn(g, _HIDREAM_LAYERS, batch, _HIDREAM_LLAMA_TOKENS, 16),
        "pooled_embeds": _randn(g, batch, TEXT_DIM),
    }


def _omnigen_inputs(g: torch.Generator, batch: int) -> dict[str, Any]:
    seq = TEXT_TOKENS + 1 + 16  # text tokens, time token, image patches
    mask = torch.tril(torch.ones(seq, seq))
    mask[TEXT_TOKENS:, TEXT_TOKENS:] = 1  # time token and image attend bidirectionally, as the processor does
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "input_ids": torch.randint(1, 64, (batch, TEXT_TOKENS), generator=g),
        "input_img_latents": [],
        "input_image_sizes": {},
        "attention_mask": mask.repeat(batch, 1, 1),
        "position_ids": torch.arange(seq).repeat(batch, 1),
    }


# --- input builders of the rows added for issue 16 (the whole-zoo sweep) ---------------------------------


def _bria_inputs(g, batch):
    return {"hidden_states": _randn(g, batch, 16, 16), "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
            "img_ids": _grid_ids(4, 4), "txt_ids": torch.zeros(TEXT_TOKENS, 3)}

def _briafibo_inputs(g, batch):
    d = _bria_inputs(g, batch)
    d["text_encoder_layers"] = [_randn(g, batch, TEXT_TOKENS, 16) for _ in range(6)]
    return d

def _longcat_inputs(g, batch):
    d = _bria_inputs(g, batch)
    d["guidance"] = torch.full((batch,), 4.0)
    return d

def _flux3_inputs(g, batch):
    txt = torch.zeros(TEXT_TOKENS, 4); txt[:, 3] = torch.arange(TEXT_TOKENS)
    return {"hidden_states": _randn(g, batch, 16, 16), "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
            "img_ids": _grid_ids(4, 4, axes=4), "txt_ids": txt}

def _video5(g, batch, c=4):
    return {"hidden_states": _randn(g, batch, c, 2, 8, 8), "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM)}

def _video5_masked(g, batch):
    return {**_video5(g, batch), "encoder_attention_mask": torch.ones(batch, TEXT_TOKENS)}

def _vace_inputs(g, batch):
    d = _wan_inputs(g, batch)
    d["control_hidden_states"] = _randn(g, batch, 8, 2, 8, 8)
    return d

def _img4(g, batch, c=4):
    return {"hidden_states": _randn(g, batch, c, 8, 8), "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM)}

def _hyimage_inputs(g, batch):
    d = _img4(g, batch)
    d["encoder_attention_mask"] = torch.ones(batch, TEXT_TOKENS)
    return d

def _hyv15_inputs(g, batch):
    d = _video5(g, batch)
    d["encoder_attention_mask"] = torch.ones(batch, TEXT_TOKENS)
    d["encoder_hidden_states_2"] = _randn(g, batch, 5, 16)
    d["encoder_attention_mask_2"] = torch.ones(batch, 5)
    d["image_embeds"] = _randn(g, batch, 4, 16)
    return d

def _ernie_inputs(g, batch):
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "text_bth": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
            "text_lens": torch.full((batch,), TEXT_TOKENS, dtype=torch.long)}

def _t2d_inputs(g, batch):
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}

def _dreamlite_inputs(g, batch):
    return {"hidden_states": _randn(g, batch, 4, 8, 8), "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM)}

def _music_inputs(g, batch):
    return {"hidden_states": _randn(g, batch, 8, 16), "encoder_hidden_states": _randn(g, batch, 16, 4)}


def _qwen21_inputs(g, batch):
    return {"hidden_states": _randn(g, batch, 16, 16), "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
            "img_shapes": [[(1, 4, 4)]] * batch, "img_mask": torch.cat([torch.zeros(TEXT_TOKENS), torch.ones(4)]).bool()[None]}

def _framepack_inputs(g, batch):
    return {"hidden_states": _randn(g, batch, 4, 2, 8, 8), "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
            "encoder_attention_mask": torch.ones(batch, TEXT_TOKENS), "pooled_projections": _randn(g, batch, TEXT_DIM),
            "image_embeds": _randn(g, batch, 4, 16), "indices_latents": torch.arange(2), "latents_clean": _randn(g, batch, 4, 1, 8, 8), "indices_latents_clean": torch.arange(1),
            "latents_history_2x": _randn(g, batch, 4, 2, 8, 8), "indices_latents_history_2x": torch.arange(2),
            "latents_history_4x": _randn(g, batch, 4, 4, 8, 8), "indices_latents_history_4x": torch.arange(4),
            "guidance": torch.full((batch,), 6000.0)}

def _k6_inputs(g, batch):
    return {"hidden_states": _randn(g, batch, 2, 8, 8, 4), "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, TEXT_DIM),
            "pooled_projections": _randn(g, batch, 16), "visual_rope_pos": [torch.arange(2), torch.arange(4), torch.arange(4)]}

def _k6sr_inputs(g, batch):
    return {"hidden_states": _randn(g, batch, 2, 8, 8, 9)}

def _temporal_inputs(g, batch):
    return {"hidden_states": _randn(g, batch * 2, 4, 4, 4), "num_frames": 2}


# --- the table ------------------------------------------------------------------------------------------------

_FLUX_ROPE = (4, 6, 6)  # sums to HEAD_DIM

_H = dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM)
_WAN = dict(patch_size=(1, 2, 2), **_H, in_channels=4, out_channels=4, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=3, rope_max_seq_len=32)

_ROWS = [
    ModelSpec(
        "flux", "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=16, num_layers=3, num_single_layers=3, attention_head_dim=HEAD_DIM,
             num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
             guidance_embeds=True, axes_dims_rope=_FLUX_ROPE),
        _flux_inputs, Schedule.SIGMA_DESC, ("transformer_blocks", "single_transformer_blocks"), 16, 7,
        pipeline_note="FluxPipeline: timestep=t / 1000",
    ),
    ModelSpec(
        "flux2", "Flux2Transformer2DModel",
        dict(patch_size=1, in_channels=16, num_layers=3, num_single_layers=3, attention_head_dim=HEAD_DIM,
             num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, timestep_guidance_channels=32,
             mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True),
        _flux2_inputs, Schedule.SIGMA_DESC, ("transformer_blocks", "single_transformer_blocks"), 16, 7,
        pipeline_note="Flux2Pipeline: timestep=t / 1000",
        chain=("transformer_blocks",),  # the single blocks get [text | image] joined outside them
    ),
    ModelSpec(
        "sd3", "SD3Transformer2DModel",
        dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=HEAD_DIM,
             num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, caption_projection_dim=HIDDEN,
             pooled_projection_dim=TEXT_DIM, out_channels=4, pos_embed_max_size=16),
        _sd3_inputs, Schedule.T1000_DESC, ("transformer_blocks",), 16, 7,
        pipeline_note="StableDiffusion3Pipeline: timestep=t (FlowMatch, 1000 * sigma)",
    ),
    ModelSpec(
        "qwenimage", "QwenImageTransformer2DModel",
        dict(patch_size=2, in_channels=16, out_channels=4, num_layers=3, attention_head_dim=HEAD_DIM,
             num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, axes_dims_rope=_FLUX_ROPE),
        _qwenimage_inputs, Schedule.SIGMA_DESC, ("transformer_blocks",), 16, 7,
        pipeline_note="QwenImagePipeline: timestep=t / 1000",
    ),
    ModelSpec(
        "wan", "WanTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
             out_channels=4, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=3, rope_max_seq_len=32),
        _wan_inputs, Schedule.T1000_DESC, ("blocks",), 32, 7,
        pipeline_note="WanPipeline: timestep=t (FlowMatch/UniPC, 1000 * sigma)",
    ),
    ModelSpec(
        "skyreelsv2", "SkyReelsV2Transformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
             out_channels=4, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=3, rope_max_seq_len=32),
        _wan_inputs, Schedule.T1000_DESC, ("blocks",), 32, 7,
        pipeline_note="SkyReelsV2Pipeline: timestep=t (UniPC flow, 1000 * sigma)",
    ),
    ModelSpec(
        "hunyuanvideo", "HunyuanVideoTransformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=3,
             num_single_layers=3, num_refiner_layers=2, patch_size=2, patch_size_t=1, guidance_embeds=True,
             text_embed_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, rope_axes_dim=_FLUX_ROPE),
        _hunyuanvideo_inputs, Schedule.T1000_DESC, ("transformer_blocks", "single_transformer_blocks"), 32, 7,
        side_lists=("context_embedder.token_refiner.refiner_blocks",),
        pipeline_note="HunyuanVideoPipeline: timestep=t (FlowMatch, 1000 * sigma)",
    ),
    ModelSpec(
        "cogvideox", "CogVideoXTransformer3DModel",
        dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4,
             time_embed_dim=HIDDEN, text_embed_dim=TEXT_DIM, num_layers=3, sample_width=8, sample_height=8,
             sample_frames=5, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT_TOKENS),
        _cogvideox_inputs, Schedule.DDPM_DESC, ("transformer_blocks",), 32, 7,
        pipeline_note="CogVideoXPipeline: timestep=t (DDIM/DPM integer timesteps)",
    ),
    ModelSpec(
        "pixart", "PixArtTransformer2DModel",
        dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=3,
             cross_attention_dim=HIDDEN, sample_size=8, patch_size=2, caption_channels=TEXT_DIM,
             use_additional_conditions=False),
        _pixart_inputs, Schedule.DDPM_DESC, ("transformer_blocks",), 16, 7, learned_sigma=True,
        pipeline_note="PixArtAlphaPipeline: timestep=t (DPM-Solver integer timesteps)",
    ),
    ModelSpec(
        "ltx", "LTXVideoTransformer3DModel",
        dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=HEADS,
             attention_head_dim=HEAD_DIM, cross_attention_dim=HIDDEN, num_layers=3, caption_channels=TEXT_DIM),
        _ltx_inputs, Schedule.T1000_DESC, ("transformer_blocks",), 32, 7,
        pipeline_note="LTXPipeline: timestep=t (FlowMatch, 1000 * sigma)",
    ),
    ModelSpec(
        "zimage", "ZImageTransformer2DModel",
        dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=HIDDEN, n_layers=3,
             n_refiner_layers=2, n_heads=HEADS, n_kv_heads=HEADS, cap_feat_dim=TEXT_DIM, axes_dims=[4, 6, 6],
             axes_lens=[64, 16, 16]),
        _zimage_inputs, Schedule.SIGMA_ASC, ("layers",), 64, 32,
        side_lists=("noise_refiner", "context_refiner"),  # per-stream refiners ahead of the joint layers
        latent_key="x", timestep_key="t", latent_is_list=True,
        single_graph=False, warm_single_graph=True,
        graph_break="first call only: RopeEmbedder.precompute_freqs_cis builds its table lazily under "
        "`with torch.device('cpu')` (unsupported context manager, transformer_z_image.py:330); 5 graphs cold",
        pipeline_note="ZImagePipeline: timestep=(1000 - t) / 1000",
    ),
    ModelSpec(
        "chroma", "ChromaTransformer2DModel",
        dict(patch_size=1, in_channels=16, num_layers=3, num_single_layers=3, attention_head_dim=HEAD_DIM,
             num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, axes_dims_rope=_FLUX_ROPE,
             approximator_num_channels=16, approximator_hidden_dim=HIDDEN, approximator_layers=1),
        _chroma_inputs, Schedule.SIGMA_DESC, ("transformer_blocks", "single_transformer_blocks"), 16, 7,
        pipeline_note="ChromaPipeline: timestep=t / 1000",
        chain=("transformer_blocks",),  # the single blocks get [text | image] joined outside them
    ),
    ModelSpec(
        "auraflow", "AuraFlowTransformer2DModel",
        dict(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=3, num_single_dit_layers=3,
             attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM,
             caption_projection_dim=HIDDEN, out_channels=4, pos_embed_max_size=64),
        _auraflow_inputs, Schedule.SIGMA_DESC, ("joint_transformer_blocks", "single_transformer_blocks"), 16, 15,
        chain=("joint_transformer_blocks",),  # the single blocks get [text | image] re-joined outside them
        pipeline_note="AuraFlowPipeline: timestep=t / 1000; text stream = 8 register tokens + 7",
    ),
    ModelSpec(
        "cogview4", "CogView4Transformer2DModel",
        dict(patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=HEAD_DIM,
             num_attention_heads=HEADS, text_embed_dim=TEXT_DIM, time_embed_dim=HIDDEN, condition_dim=16,
             pos_embed_max_size=16, sample_size=8, rope_axes_dim=(16, 16)),
        _cogview4_inputs, Schedule.T1000_DESC, ("transformer_blocks",), 16, 7,
        pipeline_note="CogView4Pipeline: timestep=t (FlowMatch, 1000 * sigma)",
    ),
    ModelSpec(
        "allegro", "AllegroTransformer3DModel",
        dict(patch_size=2, patch_size_t=1, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
             out_channels=4, num_layers=3, cross_attention_dim=HIDDEN, sample_height=8, sample_width=8,
             sample_frames=2, caption_channels=TEXT_DIM),
        _allegro_inputs, Schedule.DDPM_DESC, ("transformer_blocks",), 32, 7,
        pipeline_note="AllegroPipeline: timestep=t (EulerAncestral integer timesteps)",
    ),
    ModelSpec(
        "dit", "DiTTransformer2DModel",
        dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=3,
             sample_size=8, patch_size=2),
        _dit_inputs, Schedule.DDPM_DESC, ("transformer_blocks",), 16, 0, learned_sigma=True,
        pipeline_note="DiTPipeline: timestep=t (DPM-Solver integer timesteps); class labels, no text",
    ),
    ModelSpec(
        "hunyuandit", "HunyuanDiT2DModel",
        dict(sample_size=8, patch_size=2, in_channels=4, num_layers=6, attention_head_dim=HEAD_DIM,
             num_attention_heads=HEADS, cross_attention_dim=TEXT_DIM, cross_attention_dim_t5=TEXT_DIM,
             pooled_projection_dim=16, hidden_size=HIDDEN, text_len=TEXT_TOKENS, text_len_t5=_HUNYUANDIT_T5_TOKENS),
        _hunyuandit_inputs, Schedule.DDPM_DESC, ("blocks",), 16, 12, learned_sigma=True,
        pipeline_note="HunyuanDiTPipeline: timestep=t (DDPM integer timesteps); "
        "blocks 0..1 feed long skips into blocks 5..4 (needs an even num_layers)",
    ),
    ModelSpec(
        "sana", "SanaTransformer2DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=3,
             num_cross_attention_heads=HEADS, cross_attention_head_dim=HEAD_DIM, cross_attention_dim=HIDDEN,
             caption_channels=TEXT_DIM, sample_size=8, patch_size=2),
        _sana_inputs, Schedule.T1000_DESC, ("transformer_blocks",), 16, 7,
        pipeline_note="SanaPipeline: timestep=t * timestep_scale (1.0; DPM-Solver flow, 1000 * sigma)",
    ),
    ModelSpec(
        "kandinsky5", "Kandinsky5Transformer3DModel",
        dict(in_visual_dim=4, in_text_dim=TEXT_DIM, in_text_dim2=16, time_dim=HIDDEN, out_visual_dim=4,
             patch_size=(1, 2, 2), model_dim=HIDDEN, ff_dim=64, num_text_blocks=2, num_visual_blocks=3,
             axes_dims=(4, 6, 6)),
        _kandinsky5_inputs, Schedule.T1000_DESC, ("visual_transformer_blocks",), 32, 7,
        side_lists=("text_transformer_blocks",),  # text-only encoder blocks ahead of the visual chain
        pipeline_note="Kandinsky5T2VPipeline: timestep=t (FlowMatch, 1000 * sigma)",
    ),
    ModelSpec(
        "mochi", "MochiTransformer3DModel",
        dict(patch_size=2, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=3,
             pooled_projection_dim=16, in_channels=4, text_embed_dim=TEXT_DIM, time_embed_dim=HIDDEN,
             max_sequence_length=TEXT_TOKENS),
        _mochi_inputs, Schedule.T1000_ASC, ("transformer_blocks",), 32, 7,
        single_graph=False,
        graph_break="MochiAttnProcessor2_0 selects valid prompt tokens per sample with torch.nonzero (dynamic "
        "shape operator, attention_processor.py:1068): 11 graphs, 10 breaks",
        pipeline_note="MochiPipeline: FlowMatch with invert_sigmas, timestep=1000 * (1 - sigma) ascending "
        "(linear-quadratic sigmas there, linear here)",
        per_block=True,
    ),
    ModelSpec(
        "lumina2", "Lumina2Transformer2DModel",
        dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=HIDDEN, num_layers=3, num_refiner_layers=2,
             num_attention_heads=HEADS, num_kv_heads=HEADS, multiple_of=16, axes_dim_rope=(4, 6, 6),
             axes_lens=(64, 16, 16), cap_feat_dim=TEXT_DIM),
        _lumina2_inputs, Schedule.SIGMA_ASC, ("layers",), 16, 7,
        side_lists=("noise_refiner", "context_refiner"),  # per-stream refiners ahead of the joint layers
        single_graph=False,
        graph_break="Lumina2RotaryPosEmbed reads caption lengths with attention_mask.sum(1).tolist() (data "
        "dependent operator, transformer_lumina2.py:273): 4 graphs, 3 breaks",
        pipeline_note="Lumina2Pipeline: timestep=1 - t / 1000",
    ),
    ModelSpec(
        "hidream", "HiDreamImageTransformer2DModel",
        dict(patch_size=2, in_channels=4, out_channels=4, num_layers=3, num_single_layers=3,
             attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, caption_channels=[TEXT_DIM, 16],
             text_emb_dim=TEXT_DIM, num_routed_experts=2, num_activated_experts=2, axes_dims_rope=(8, 4, 4),
             max_resolution=(16, 16), llama_layers=list(range(_HIDREAM_LAYERS))),
        _hidream_inputs, Schedule.T1000_DESC, ("double_stream_blocks", "single_stream_blocks"), 16, 12,
        side_lists=("caption_projection",)
        + tuple(f"{kind}_stream_blocks.{i}.block.ff_i.experts" for kind in ("double", "single") for i in range(3)),
        timestep_key="timesteps", chain=("double_stream_blocks",),  # the single blocks start from a concatenation
        single_graph=False,
        graph_break="MoE routing in MOEFeedForwardSwiGLU.moe_infer: bincount().cpu().numpy() (dynamic shape "
        "operator, transformer_hidream_image.py:389), once per block: 20 graphs, 19 breaks",
        pipeline_note="HiDreamImagePipeline: timesteps=t (FlowMatch/UniPC, 1000 * sigma)",
        per_block=True,
    ),
    ModelSpec(
        "omnigen", "OmniGenTransformer2DModel",
        dict(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=HEADS, intermediate_size=64,
             num_layers=3, pad_token_id=0, vocab_size=64, in_channels=4, time_step_dim=16, pos_embed_max_size=16,
             rope_scaling={"long_factor": [1.0] * (HEAD_DIM // 2), "short_factor": [1.0] * (HEAD_DIM // 2)}),
        _omnigen_inputs, Schedule.SIGMA_ASC, ("layers",), 16, 7,
        single_graph=False,
        graph_break="OmniGenSuScaledRotaryEmbedding branches on torch.max(position_ids) + 1 > "
        "original_max_position_embeddings (data-dependent branching, transformer_omnigen.py:155): 4 graphs",
        pipeline_note="OmniGenPipeline: FlowMatch(invert_sigmas, num_train_timesteps=1), t = 1 - sigma ascending; "
        "one joint sequence [text, time token, image]",
    ),
    ModelSpec("bria", "BriaTransformer2DModel", dict(patch_size=1, in_channels=16, num_layers=3, num_single_layers=3, **_H, joint_attention_dim=TEXT_DIM, axes_dims_rope=_FLUX_ROPE),
        _bria_inputs, Schedule.T1000_DESC, ("transformer_blocks", "single_transformer_blocks"), 16, 7),
    ModelSpec("briafibo", "BriaFiboTransformer2DModel", dict(patch_size=1, in_channels=16, num_layers=3, num_single_layers=3, **_H, joint_attention_dim=TEXT_DIM, axes_dims_rope=_FLUX_ROPE, text_encoder_dim=16),
        _briafibo_inputs, Schedule.T1000_DESC, ("transformer_blocks", "single_transformer_blocks"), 16, 7,
        chain=("transformer_blocks",), side_lists=("caption_projection",)),
    ModelSpec("longcatimage", "LongCatImageTransformer2DModel", dict(patch_size=1, in_channels=16, num_layers=3, num_single_layers=3, **_H, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, axes_dims_rope=_FLUX_ROPE),
        _longcat_inputs, Schedule.SIGMA_DESC, ("transformer_blocks", "single_transformer_blocks"), 16, 7),
    ModelSpec("ovisimage", "OvisImageTransformer2DModel", dict(patch_size=1, in_channels=16, out_channels=16, num_layers=3, num_single_layers=3, **_H, joint_attention_dim=TEXT_DIM, axes_dims_rope=_FLUX_ROPE),
        _bria_inputs, Schedule.SIGMA_DESC, ("transformer_blocks", "single_transformer_blocks"), 16, 7),
    ModelSpec("flux3", "Flux3Transformer2DModel", dict(in_channels=16, cond_in_channels=16, num_layers=2, num_single_layers=3, **_H, joint_attention_dim=TEXT_DIM, timestep_channels=32, axes_dims_rope=(4, 4, 4, 4)),
        _flux3_inputs, Schedule.SIGMA_DESC, ("mode_blocks.image", "single_transformer_blocks"), 16, 7, side_lists=("txt_mode_blocks", "mode_blocks.image_cond")),
    ModelSpec("chronoedit", "ChronoEditTransformer3DModel", _WAN, _wan_inputs, Schedule.T1000_DESC, ("blocks",), 32, 7),
    ModelSpec("wanvace", "WanVACETransformer3DModel", dict(_WAN, vace_layers=[0, 2], vace_in_channels=8), _vace_inputs, Schedule.T1000_DESC, ("blocks",), 32, 7, side_lists=("vace_blocks",)),
    ModelSpec("helios", "HeliosTransformer3DModel", dict({k: v for k, v in _WAN.items() if k != "rope_max_seq_len"}, rope_dim=(4, 6, 6)), _wan_inputs, Schedule.T1000_DESC, ("blocks",), 32, 7),
    ModelSpec("cogview3plus", "CogView3PlusTransformer2DModel", dict(patch_size=2, in_channels=4, out_channels=4, num_layers=3, **_H, text_embed_dim=TEXT_DIM, time_embed_dim=HIDDEN, condition_dim=16, pos_embed_max_size=16, sample_size=8),
        _cogview4_inputs, Schedule.DDPM_DESC, ("transformer_blocks",), 16, 7),
    ModelSpec("consisid", "ConsisIDTransformer3DModel", dict(**_H, in_channels=4, out_channels=4, time_embed_dim=HIDDEN, text_embed_dim=TEXT_DIM, num_layers=3, sample_width=8, sample_height=8, sample_frames=5, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT_TOKENS),
        _cogvideox_inputs, Schedule.DDPM_DESC, ("transformer_blocks",), 32, 7),
    ModelSpec("cosmos", "CosmosTransformer3DModel", dict(in_channels=4, out_channels=4, **_H, num_layers=3, text_embed_dim=TEXT_DIM, adaln_lora_dim=16, max_size=(4, 16, 16), patch_size=(1, 2, 2), encoder_hidden_states_channels=TEXT_DIM, crossattn_proj_in_channels=TEXT_DIM, concat_padding_mask=False),
        _video5, Schedule.T1000_DESC, ("transformer_blocks",), 32, 7),
    ModelSpec("easyanimate", "EasyAnimateTransformer3DModel", dict(**_H, in_channels=4, out_channels=4, patch_size=2, sample_width=8, sample_height=8, num_layers=3, mmdit_layers=3, time_embed_dim=HIDDEN, text_embed_dim=TEXT_DIM),
        _video5, Schedule.T1000_DESC, ("transformer_blocks",), 32, 7),
    ModelSpec("hunyuanimage", "HunyuanImageTransformer2DModel", dict(in_channels=4, out_channels=4, **_H, num_layers=3, num_single_layers=3, num_refiner_layers=2, patch_size=(2, 2), text_embed_dim=TEXT_DIM, rope_axes_dim=(8, 8)),
        _hyimage_inputs, Schedule.T1000_DESC, ("transformer_blocks", "single_transformer_blocks"), 16, 7, side_lists=("context_embedder.token_refiner.refiner_blocks",)),
    ModelSpec("hunyuanvideo15", "HunyuanVideo15Transformer3DModel", dict(in_channels=4, out_channels=4, **_H, num_layers=3, num_refiner_layers=2, patch_size=2, text_embed_dim=TEXT_DIM, text_embed_2_dim=16, image_embed_dim=16, rope_axes_dim=_FLUX_ROPE),
                _hyv15_inputs, Schedule.T1000_DESC, ("transformer_blocks",), 32, 7, side_lists=("context_embedder.token_refiner.refiner_blocks",),
        single_graph=False, graph_break="data-dependent `if is_t2v:` (torch.all(image_embeds == 0)): Dynamo skips the top frame, each block is a graph",
        per_block=True),
    ModelSpec("prx", "PRXTransformer2DModel", dict(in_channels=4, patch_size=2, context_in_dim=TEXT_DIM, hidden_size=HIDDEN, num_heads=HEADS, depth=3, axes_dim=[8, 8]),
        _img4, Schedule.T1000_DESC, ("blocks",), 16, 7),
    ModelSpec("ernieimage", "ErnieImageTransformer2DModel", dict(hidden_size=HIDDEN, num_attention_heads=HEADS, num_layers=3, ffn_hidden_size=64, in_channels=4, out_channels=4, patch_size=2, text_in_dim=TEXT_DIM, rope_axes_dim=(4, 6, 6)),
        _ernie_inputs, Schedule.T1000_DESC, ("layers",), 16, 7),
    ModelSpec("nucleusmoe", "NucleusMoEImageTransformer2DModel", dict(patch_size=2, in_channels=16, out_channels=4, num_layers=3, **_H, joint_attention_dim=TEXT_DIM, axes_dims_rope=_FLUX_ROPE, moe_enabled=False),
        _qwenimage_inputs, Schedule.SIGMA_DESC, ("transformer_blocks",), 16, 7),
    ModelSpec("sanavideo", "SanaVideoTransformer3DModel", dict(in_channels=4, out_channels=4, **_H, num_layers=3, num_cross_attention_heads=HEADS, cross_attention_head_dim=HEAD_DIM, cross_attention_dim=HIDDEN, caption_channels=TEXT_DIM, sample_size=8, rope_max_seq_len=32),
        _video5_masked, Schedule.T1000_DESC, ("transformer_blocks",), 32, 7),
    ModelSpec("latte", "LatteTransformer3DModel", dict(**_H, in_channels=4, out_channels=8, num_layers=3, cross_attention_dim=HIDDEN, sample_size=8, patch_size=2, caption_channels=TEXT_DIM, video_length=2, norm_type="ada_norm_single", num_embeds_ada_norm=1000),
        _video5, Schedule.DDPM_DESC, ("transformer_blocks",), 32, 7, learned_sigma=True, side_lists=("temporal_transformer_blocks",)),
    ModelSpec("transformer2d", "Transformer2DModel", dict(**_H, in_channels=4, out_channels=8, num_layers=3, cross_attention_dim=HIDDEN, sample_size=8, patch_size=2, caption_channels=TEXT_DIM, norm_type="ada_norm_single", num_embeds_ada_norm=1000, use_additional_conditions=False),
        _t2d_inputs, Schedule.DDPM_DESC, ("transformer_blocks",), 16, 7, learned_sigma=True),
    ModelSpec("dreamlite", "DreamLiteTransformer2DModel", dict(**_H, in_channels=4, out_channels=4, num_layers=3, cross_attention_dim=TEXT_DIM, norm_num_groups=4),
        _dreamlite_inputs, Schedule.DDPM_DESC, ("transformer_blocks",), 64, 7, reads_timestep=False),
    ModelSpec("minimaxmusic3", "MiniMaxMusic3Transformer1DModel", dict(in_channels=8, condition_dim=4, num_layers=3, **_H, ff_inner_dim=64, rotary_dim=8, fourier_embedding_dim=16),
        _music_inputs, Schedule.SIGMA_DESC, ("transformer_blocks",), 16, 7),
    ModelSpec("joyimageedit", "JoyImageEditTransformer3DModel", dict(in_channels=4, out_channels=4, hidden_size=HIDDEN, num_attention_heads=HEADS, text_dim=TEXT_DIM, num_layers=3, rope_dim_list=[4, 6, 6]),
        _video5, Schedule.T1000_DESC, ("double_blocks",), 32, 7),
    ModelSpec("motifvideo", "MotifVideoTransformer3DModel", dict(in_channels=4, out_channels=4, **_H, num_layers=3, num_single_layers=3, patch_size=2, text_embed_dim=TEXT_DIM, rope_axes_dim=_FLUX_ROPE),
        _video5_masked, Schedule.T1000_DESC, ("transformer_blocks", "single_transformer_blocks"), 32, 7),
    ModelSpec("qwenimage21", "QwenImage21Transformer2DModel", dict(patch_size=1, in_channels=16, out_channels=16, num_layers=3, **_H, context_in_dim=TEXT_DIM, axes_dims_rope=_FLUX_ROPE),
        _qwen21_inputs, Schedule.SIGMA_DESC, ("transformer_blocks",), 16, 7, out_tokens=16,
        single_graph=False, graph_break="data-dependent token layout in the prologue (repeat_interleave by img_mask, boolean-mask assignment, int() of a sum): 3 graphs; the piece holding the blocks reads no timestep"),
    ModelSpec("framepack", "HunyuanVideoFramepackTransformer3DModel", dict(in_channels=4, out_channels=4, **_H, num_layers=3, num_single_layers=3, num_refiner_layers=2, patch_size=2, text_embed_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, rope_axes_dim=_FLUX_ROPE, image_proj_dim=16, has_image_proj=True, has_clean_x_embedder=True),
                _framepack_inputs, Schedule.T1000_DESC, ("transformer_blocks", "single_transformer_blocks"), 32, 7, side_lists=("context_embedder.token_refiner.refiner_blocks",),
        single_graph=False, graph_break="a tensor-indexed slice calls .item(): Dynamo skips the top frame, each block is a graph",
        per_block=True),
    ModelSpec("kandinsky6", "Kandinsky6Transformer3DModel", dict(in_visual_dim=4, out_visual_dim=4, in_text_dim=TEXT_DIM, in_text_dim2=16, time_dim=HIDDEN, model_dim=HIDDEN, ff_dim=64, num_text_blocks=2, num_visual_blocks=3, axes_dims=(4, 6, 6), visual_cond=False),
        _k6_inputs, Schedule.T1000_DESC, ("visual_transformer_blocks",), 32, 7,
        side_lists=("video_text_transformer_blocks", "audio_text_transformer_blocks")),
    # Flex attention: its mask is built under vmap inside every block (the split keeps each vmap level whole).
    ModelSpec("kandinsky6sr", "Kandinsky6SRTransformer3DModel", dict(in_visual_dim=4, out_visual_dim=9, time_dim=HIDDEN, model_dim=HIDDEN, ff_dim=64, num_visual_blocks=3, axes_dims=(4, 6, 6)),
        _k6sr_inputs, Schedule.T1000_DESC, ("visual_transformer_blocks",), 128, 0),
    ModelSpec("temporal", "TransformerTemporalModel", dict(**_H, in_channels=4, out_channels=4, num_layers=3, norm_num_groups=4),
        _temporal_inputs, Schedule.DDPM_DESC, ("transformer_blocks",), 32, 0, reads_timestep=False),
]

# The whole zoo (issue 16: every diffusers DiT class we can build tiny); MODELS is the 22-row core that the
# backend, dynamic-shape and context-parallel suites sweep, so the sweep of the zoo runs once (test_models.py).
ZOO: dict[str, ModelSpec] = {spec.name: spec for spec in _ROWS}
_CORE = ("flux", "flux2", "sd3", "qwenimage", "wan", "skyreelsv2", "hunyuanvideo", "cogvideox", "pixart", "ltx", "zimage",
         "chroma", "auraflow", "cogview4", "allegro", "dit", "hunyuandit", "sana", "kandinsky5", "mochi", "lumina2",
         "hidream", "omnigen")
MODELS: dict[str, ModelSpec] = {name: ZOO[name] for name in _CORE}


def get(name: str) -> ModelSpec:
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"no tiny model named {name!r}; known: {sorted(ZOO)}") from None


README_BEGIN = "<!-- models table: generated by `python -m tests.models`; tests/test_models.py checks it -->"
README_END = "<!-- end of models table -->"


def readme_table() -> str:
    """The README's table of every diffusers transformer class in the zoo and its status."""
    lines = [README_BEGIN, "", "| diffusers class | row | chain | status |", "|---|---|---|---|"]
    for spec in sorted(_ROWS, key=lambda s: s.cls):
        chain = " → ".join(f"`{path}`" for path in spec.chain or spec.block_lists)
        lines.append(f"| {spec.cls} | `{spec.name}` | {chain} | {spec.status} |")
    return "\n".join(lines + ["", README_END])


if __name__ == "__main__":
    print(readme_table())
