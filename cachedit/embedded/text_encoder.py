"""A small word-level text encoder trained jointly with the transformer.

It owns its tokenizer: the vocabulary is a fixed word list stored in the config, so the
pipeline needs no separate tokenizer component. ``forward(input_ids)`` returns per-token
states ``[B, T, D]`` (Flux's ``encoder_hidden_states``) and a pooled vector ``[B, D]`` (Flux's
``pooled_projections``). An empty prompt encodes to all padding: that is the unconditional
input used for classifier-free guidance, and the one caption dropout trains.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

PAD, UNK = "<pad>", "<unk>"


class WordTextEncoder(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        vocab: tuple[str, ...] | list[str] = (),
        max_length: int = 12,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
    ):
        super().__init__()
        self.words = [PAD, UNK, *vocab]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.token_embedding = nn.Embedding(len(self.words), hidden_size)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, hidden_size))
        layer = nn.TransformerEncoderLayer(
            hidden_size, num_heads, dim_feedforward=4 * hidden_size, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(hidden_size)
        nn.init.normal_(self.position_embedding, std=0.02)

    def tokenize(self, prompts: str | list[str]) -> torch.Tensor:
        """Word ids ``[B, max_length]``: lower-cased, punctuation dropped, unknown words -> ``<unk>``,
        truncated and right-padded."""
        if isinstance(prompts, str):
            prompts = [prompts]
        max_length = self.config.max_length
        rows = []
        for prompt in prompts:
            words = "".join(c if c.isalnum() else " " for c in prompt.lower()).split()
            ids = [self.index.get(w, self.index[UNK]) for w in words][:max_length]
            rows.append(ids + [self.index[PAD]] * (max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.token_embedding(input_ids) + self.position_embedding[: input_ids.shape[1]]  # [B, T, D]
        x = self.final_norm(self.encoder(x))  # [B, T, D]; no mask: padding is a learned token
        pooled = x.mean(dim=1)  # [B, D]
        return x, pooled
