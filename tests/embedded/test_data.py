import torch

from cachedit.embedded import data


def test_caption_names_every_attribute_and_parses_back():
    scene = data.Scene("triangle", "yellow", "large", "bottom right", "black")
    assert scene.caption == "a large yellow triangle at the bottom right on a black background"
    assert data.parse_caption(scene.caption) == {
        "shape": "triangle", "color": "yellow", "size": "large", "position": "bottom right", "background": "black"
    }
    assert data.parse_caption(data.Scene("circle", "red", "small", "center", "gray").caption)["position"] == "center"


def test_every_caption_word_is_in_the_vocabulary():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        assert set(data.random_scene(g).caption.split()) <= set(data.VOCAB)


def test_batches_are_seeded_and_in_range():
    a, caps_a = data.sample_batch(8, torch.Generator().manual_seed(3))
    b, caps_b = data.sample_batch(8, torch.Generator().manual_seed(3))
    assert a.shape == (8, 3, data.IMAGE_SIZE, data.IMAGE_SIZE)
    assert torch.equal(a, b) and caps_a == caps_b
    assert a.min() >= -1 and a.max() <= 1


def test_read_scene_recovers_rendered_scenes():
    # The prompt-following check is only as good as this reader: on clean renders it must be exact.
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        scene = data.random_scene(g)
        read = data.read_scene((data.render(scene, g) + 1) / 2)
        assert read == {"background": scene.background, "color": scene.color, "shape": scene.shape,
                        "position": scene.position}, scene


def test_read_scene_of_a_blank_image_reads_no_shape():
    read = data.read_scene(torch.full((3, 32, 32), 0.5))
    assert read["background"] == "gray" and read["shape"] is None and read["color"] is None
