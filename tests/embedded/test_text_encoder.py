import torch

from cachedit.embedded import data
from cachedit.embedded.text_encoder import WordTextEncoder


def make(**kwargs):
    torch.manual_seed(0)
    return WordTextEncoder(vocab=list(data.VOCAB), max_length=12, hidden_size=16, num_layers=1, num_heads=2, **kwargs)


def test_tokenize_pads_truncates_and_maps_unknown_words():
    enc = make()
    ids = enc.tokenize(["A red, CIRCLE!", "", "zebra"])
    assert ids.shape == (3, 12)
    assert ids[0, :3].tolist() == [enc.index["a"], enc.index["red"], enc.index["circle"]]
    assert ids[0, 3:].eq(enc.index["<pad>"]).all()
    assert ids[1].eq(enc.index["<pad>"]).all()  # the empty prompt is the unconditional input
    assert ids[2, 0] == enc.index["<unk>"]
    assert enc.tokenize(" ".join(["red"] * 20)).shape == (1, 12)


def test_forward_shapes_and_save_load_roundtrip(tmp_path):
    enc = make().eval()
    ids = enc.tokenize(["a small blue square", "a"])
    states, pooled = enc(ids)
    assert states.shape == (2, 12, 16) and pooled.shape == (2, 16)
    enc.save_pretrained(tmp_path)
    loaded = WordTextEncoder.from_pretrained(tmp_path, low_cpu_mem_usage=False).eval()
    assert loaded.words == enc.words
    assert torch.equal(loaded(ids)[0], states)
