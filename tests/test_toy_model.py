"""The toy model shipped in the package: the default model, loaded by the normal path."""

from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from persres.settings import train_config_for
from persres.cli import app
from persres.config import TrainConfig
from persres.models import TOY_DIR, load_pipeline
from persres.settings import model_defaults
from persres.toy import world

CONCEPTS = Path(world.__file__).parent / "concepts"


def test_packaged_model_is_the_default_and_draws_toy_sized_images(tmp_path):
    result = CliRunner().invoke(app, ["gen", "a red circle on a blue background", "--steps", "3", "-n", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "toy model" in result.stderr  # the one-line notice of the default
    images = sorted(tmp_path.glob("*.png"))
    assert len(images) == 2
    assert all(Image.open(p).size == (world.SIZE, world.SIZE) for p in images)
    again = CliRunner().invoke(app, ["gen", "a red circle", "--steps", "2", "--out", str(tmp_path / "again")])
    assert again.exit_code == 0 and "toy model" not in again.stderr  # said once, not every time


def test_packaged_model_is_sd_v1_structured_and_small():
    pipe = load_pipeline("toy")
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and pipe.unet.config.use_linear_projection is False
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    from persres.toy.build import IDENTIFIERS

    for word in [*world.vocabulary(), *IDENTIFIERS]:  # every caption word and filler identifier is one known token
        ids = pipe.tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and pipe.tokenizer.decode(ids).strip() == word, word
    size = sum(p.stat().st_size for p in TOY_DIR.rglob("*") if p.is_file())
    assert size < 30 * 2**20
    from persres.toy.build import RECOMMENDED_TRAIN

    # what a rebuild would write is what ships, and what `persres train` uses on it
    assert model_defaults(str(TOY_DIR)) == RECOMMENDED_TRAIN
    config = train_config_for(str(TOY_DIR), {})
    assert (config.lr, config.steps, config.prompt) == (RECOMMENDED_TRAIN["lr"], RECOMMENDED_TRAIN["steps"], RECOMMENDED_TRAIN["prompt"])
    assert config.rank_ratio == RECOMMENDED_TRAIN["rank_ratio"] == 1.0  # the toy's, from toy_seeds
    assert (config.lr_schedule, config.snr_gamma) == ("cosine", 5.0)  # chosen with benchmarks/toy_seeds.py
    assert (TrainConfig().lr_schedule, TrainConfig().snr_gamma) == ("constant", None)  # the paper's, for every other model
    assert TrainConfig().rank_ratio == 0.05  # the paper's, for every other model


def test_short_training_on_a_shipped_concept_lowers_the_loss():
    from persres import residuals
    from persres.settings import train_config_for
    from persres.images import read_folder
    from persres.testing import fixed_noise_loss
    from persres.tokens import training_prompt
    from persres.train import train_residuals

    pipe = load_pipeline("toy")
    config = train_config_for(str(TOY_DIR), {"steps": 60})  # the model's recommended lr and prompt
    images = [r.image for r in read_folder(CONCEPTS / "checker_circle")]
    prompt = training_prompt("sks", "circle", config.prompt)
    before = fixed_noise_loss(pipe, images, prompt, world.SIZE)
    result = train_residuals(pipe, images, "sks", "circle", config)
    residuals.load_concept(pipe.unet, "checker", result.tensors)
    with residuals.use_concepts(pipe.unet, ["checker"], merged=True):
        after = fixed_noise_loss(pipe, images, prompt, world.SIZE)
    assert after < 0.9 * before, (before, after)


def test_training_captions_vary_like_real_captions():
    import random

    from persres.toy.build import IDENTIFIERS, training_caption

    rng = random.Random(0)
    captions = [training_caption(world.random_scene(rng), rng) for _ in range(2000)]
    assert any(c.startswith("a photo of a ") for c in captions)
    assert any(not c.endswith("background") for c in captions)  # background left out
    assert any(c.split()[1] in world.SHAPES for c in captions)  # color left out: "a circle ..."
    with_filler = [c for c in captions if set(c.split()) & set(IDENTIFIERS)]
    assert 0.05 < len(with_filler) / len(captions) < 0.25  # identifiers: rare, meaningless fillers


def test_unnamed_appearances_are_drawn_but_never_named():
    """Objects whose look no caption names: rendered in their own pattern, captioned by shape only,
    and kept unnamed through the dataset's scene encoding."""
    import random

    import numpy as np

    from persres.toy.build import decode_scene, encode_scenes, training_caption

    rng = random.Random(0)
    scenes = [world.random_scene(rng, two_prob=0.3, unnamed=0.5) for _ in range(400)]
    unnamed = [o for s in scenes for o in s.objects if o.color == world.UNNAMED]
    assert 0.4 < len(unnamed) / sum(len(s.objects) for s in scenes) < 0.6
    assert {o.pattern[0] for o in unnamed} == set(world.PATTERNS)
    for scene in scenes[:60]:
        decoded = decode_scene(encode_scenes([scene])[0].tolist())
        assert [o.color for o in decoded.objects] == [o.color for o in scene.objects]
        words = set(training_caption(decoded, rng).split())
        assert world.UNNAMED not in words
        for o in scene.objects:
            assert o.shape in words
    img = np.asarray(world.render(world.Scene("white", (unnamed[0],))))
    obj = np.asarray(world.shape_mask(unnamed[0].shape, unnamed[0].cx, unnamed[0].cy, unnamed[0].size)) > 0
    expected = world.pattern_pixels(unnamed[0].pattern, world.SIZE, unnamed[0].cx, unnamed[0].cy, unnamed[0].size)
    assert np.array_equal(img[obj], expected[obj])
    plain = [world.random_scene(random.Random(3)) for _ in range(50)]
    assert all(o.color in world.PALETTE and o.pattern is None for s in plain for o in s.objects)


def test_the_toy_model_holds_256_concepts_and_refuses_the_next_in_one_line(persres_home):
    """Every identifier of the toy tokenizer is handed out once; past them the refusal says what to do."""
    from contextlib import ExitStack

    from persres.errors import RegistryError
    from persres.registry import Registry
    from persres.tokens import is_single_token
    from persres.toy.vocabulary import IDENTIFIER_COUNT

    tokenizer = load_pipeline("toy").tokenizer
    registry = Registry()
    with ExitStack() as held:
        got = [held.enter_context(registry.reservation(f"c{i}", lambda ident: is_single_token(tokenizer, ident)))
               for i in range(IDENTIFIER_COUNT)]
        assert len(set(got)) == IDENTIFIER_COUNT >= 200
        with pytest.raises(RegistryError, match="no free identifier"):
            held.enter_context(registry.reservation("one-too-many", lambda ident: is_single_token(tokenizer, ident)))
