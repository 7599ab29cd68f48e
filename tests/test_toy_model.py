"""The toy model shipped in the package: the default model, loaded by the normal path."""

from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from persres.cli import app
from persres.models import TOY_DIR, load_pipeline, model_defaults
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
    assert model_defaults(str(TOY_DIR))["lr"] > 0


def test_short_training_on_a_shipped_concept_lowers_the_loss():
    from persres import residuals
    from persres.api import train_config_for
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
