"""The split itself: which values cross the cuts, and how streams are matched when shapes coincide."""

import re

import torch
import torch._dynamo
from diffusers import SD3Transformer2DModel

from cachedit.api import _graphs


def _stream(name: str) -> str:
    return re.sub(r"_\d+$", "", name)  # Dynamo's node names keep the source variable's name


def test_streams_of_equal_shape_are_matched_by_their_own_residual_path():
    """16 image and 16 text tokens: both streams are [1, 16, 32]; shape alone cannot tell them apart."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8,
    ).eval()
    g = torch.Generator().manual_seed(0)
    kw = dict(
        hidden_states=torch.randn(1, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 16, 32, generator=g),
        pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([500.0]),
    )
    fast = torch.compile(model, backend="cachedit", options=dict(Fn=1, Bn=1, threshold=0.0, inner="eager"))
    with torch.no_grad():
        assert torch.equal(fast(**kw).sample, model(**kw).sample)
    graph = _graphs(model)[-1]
    layout, top = graph.layout, graph.module()
    assert [_stream(n) for n in layout.carried] == ["hidden_states", "encoder_hidden_states"]
    assert _stream(layout.carried[layout.primary]) == "hidden_states", "the image stream drives the decision"
    middle_outputs = top.middle.graph_module.graph.find_nodes(op="output")[0].args[0][: len(layout.residual_of)]
    # each middle output is the residual partner of the carried input of its own stream
    for out, j in zip(middle_outputs, layout.residual_of):
        assert _stream(out.name) == _stream(layout.carried[j]), (out.name, layout.carried[j])
