import random

import pytest

from persres.toy import checker, world


@pytest.mark.parametrize("two_prob", [0.0, 1.0])
def test_generator_renders_what_its_caption_says(two_prob):
    rng = random.Random(5)
    results = [checker.check(world.render(s), s) for s in (world.random_scene(rng, two_prob=two_prob) for _ in range(100))]
    for key in ("background", "color", "shape"):
        accuracy = sum(r[key] for r in results) / len(results)
        assert accuracy >= 0.97, (key, accuracy)


def test_held_out_triples_never_appear_in_training_scenes():
    rng = random.Random(0)
    for _ in range(2000):
        scene = world.random_scene(rng)
        assert all((o.color, o.shape, scene.background) not in world.HELD_OUT for o in scene.objects)
    held = world.random_scene(rng, held_out=True)
    assert (held.objects[0].color, held.objects[0].shape, held.background) in world.HELD_OUT


def test_captions():
    scene = world.Scene("blue", (world.Obj("star", "red", 16, 16, 18),))
    assert scene.caption() == "a red star on a blue background"
    two = world.Scene("white", (world.Obj("circle", "red", 8, 16, 12), world.Obj("heart", "green", 24, 16, 12)))
    assert two.caption() == "a red circle and a green heart on a white background"


def test_checker_sees_a_wrong_shape_and_color():
    rng = random.Random(1)
    scene = world.random_scene(rng, two_prob=0.0)
    other_shape = next(s for s in world.SHAPES if s != scene.objects[0].shape)
    other_color = next(c for c in world.COLORS if c not in (scene.objects[0].color, scene.background))
    o = scene.objects[0]
    wrong = world.Scene(scene.background, (world.Obj(other_shape, other_color, o.cx, o.cy, o.size),))
    result = checker.check(world.render(wrong), scene)
    assert result == {"background": True, "color": False, "shape": False}


def test_shipped_concept_examples_exist():
    from pathlib import Path

    import persres.toy

    root = Path(persres.toy.__file__).parent / "concepts"
    for name in world.NOVEL_CONCEPTS:
        assert len(list((root / name).glob("*.png"))) >= 4
