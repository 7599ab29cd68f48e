import random

import numpy as np

import pytest
import torch

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


def test_bench_toy_quick_runs_end_to_end(tiny_model, tmp_path):
    import json

    from typer.testing import CliRunner

    from persres.cli import app

    out = tmp_path / "bench"
    args = ["bench", "toy", "--quick", "--model", str(tiny_model), "--steps", "2", "--train-steps", "2", "--out", str(out),
            "--concept", "checker_circle", "--concept", "striped_heart"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert {(r["category"], r["method"]) for r in summary} >= {
        ("identity", "base"), ("background", "lag"), ("two_concepts", "lag"), ("two_concepts", "summed"), ("background", "nolag-base")}
    assert {r["set"] for r in summary} == {"tuning"}
    samples = [r for r in summary if r["category"] != "references" and not r["method"].endswith("-base")]
    assert all(0 <= r["identity"] <= 1 for r in samples)
    assert all(0 <= r["drawn"] <= 1 for r in samples if r["category"] != "two_concepts")
    pair = next(r for r in summary if (r["category"], r["method"]) == ("two_concepts", "lag"))
    assert 0 <= pair["both_present"] <= 1 and -1 <= pair["own_minus_other"] <= 1 and pair["n"] == 2
    refs = {r["method"]: r for r in summary if r["category"] == "references"}
    assert refs["references"]["delta_e"] == 0 and refs["references"]["within_20"] == 1 and refs["references"]["n"] == 10
    assert refs["vae"]["delta_e"] > 0 and refs["vae"]["n"] == 10  # the tiny model's untrained VAE is far from the colors
    rows = (out / "results.csv").read_text().splitlines()
    # header; 2 concepts x 5 quick prompts x 3 methods x 2 images; each concept's 5 references and their VAE round trip; the pair
    assert len(rows) == 1 + 2 * 5 * 3 * 2 + 2 * 5 * 2 + 3 * 2
    assert (out / "references.png").exists()
    for category in ("identity", "background", "add_object", "attribute", "two_concepts"):
        assert (out / f"grid-{category}.png").exists()
    bad = CliRunner().invoke(app, ["bench", "toy", "--concept", "nope"])
    assert bad.exit_code == 1 and "unknown toy concept 'nope'" in bad.stderr
    bad = CliRunner().invoke(app, ["bench", "toy", "--set", "nope"])
    assert bad.exit_code == 1 and "unknown concept set 'nope'" in bad.stderr


def test_bench_toy_with_suggested_class_words(tiny_model, tmp_path, monkeypatch):
    """--class-words suggested: each pack's class comes from `train --class auto`, the prompts use it,
    and every row says which word it was and whether it is the true shape."""
    import json

    from typer.testing import CliRunner

    from persres.cli import app
    from persres.registry import Registry
    from persres.suggest import builtin_candidates

    monkeypatch.setenv("PERSRES_HOME", str(tmp_path / "home"))
    out = tmp_path / "bench"
    args = ["bench", "toy", "--quick", "--model", str(tiny_model), "--steps", "2", "--train-steps", "2", "--out", str(out),
            "--concept", "checker_circle", "--no-pairs", "--category", "identity", "--class-words", "suggested"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "results.json").read_text())["meta"]
    word = meta["class_word_of"]["checker_circle"]
    assert meta["class_words"] == "suggested" and word in builtin_candidates()
    rows = (out / "results.csv").read_text().splitlines()
    header = rows[0].split(",")
    for line in rows[1:]:
        row = dict(zip(header, line.split(",")))
        if row["category"] == "references":
            continue
        assert row["class_word"] == word and row["right_class"] == str(word == "circle")
        assert row["prompt"] == f"a photo of a V* {word}"
    packs = [r for r in Registry(tmp_path / "home").list() if r.name.startswith("toybench-checker_circle")]
    assert len(packs) == 1 and packs[0].name.endswith("-suggested")
    assert packs[0].meta.train_config["class_source"] == "suggested"
    bad = CliRunner().invoke(app, [*args, "--class-words", "guess"])
    assert bad.exit_code == 1 and "--class-words must be given or suggested" in bad.stderr


def test_bench_toy_strength_scales_the_residuals_it_samples_with(tiny_model, tmp_path, monkeypatch):
    import csv
    import json

    from typer.testing import CliRunner

    from persres.cli import app

    monkeypatch.setenv("PERSRES_HOME", str(tmp_path / "home"))
    args = ["bench", "toy", "--quick", "--model", str(tiny_model), "--steps", "2", "--train-steps", "3", "--lr", "0.3",
            "--concept", "checker_circle", "--no-pairs", "--category", "background"]

    def identities(strength: str) -> dict[tuple, float]:  # (prompt, image, method) -> identity
        out = tmp_path / f"bench-{strength}"
        result = CliRunner().invoke(app, [*args, "--out", str(out), "--strength", strength])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "results.json").read_text())["meta"]["strength"] == float(strength)
        with open(out / "results.csv") as f:
            return {(r["prompt"], r["image"], r["method"]): float(r["identity"]) for r in csv.DictReader(f) if r["category"] != "references"}

    zero, one = identities("0"), identities("1")  # the same pack: trained once, reused
    assert all(zero[(p, i, "nolag")] == zero[(p, i, "lag")] for p, i, m in zero if m == "base")  # no residual acts at all
    assert any(one[(p, i, "nolag")] != zero[(p, i, "nolag")] for p, i, m in one if m == "base")
    bad = CliRunner().invoke(app, [*args, "--strength", "2.5"])
    assert bad.exit_code == 1 and "from 0 to 2" in bad.stderr


def test_identity_score_prefers_the_concept():
    import numpy as np

    from persres.toy.scoring import color_histogram, identity

    rng = random.Random(3)
    refs = [world.render(world.novel_scene(rng, "checker_circle", "white")) for _ in range(3)]
    pixels = [np.asarray(r, dtype=np.float32)[checker.object_mask(np.asarray(r, dtype=np.float32), "white")] for r in refs]
    ref_hist = color_histogram(np.concatenate(pixels))
    same = world.render(world.novel_scene(rng, "checker_circle", "blue"))
    plain = world.render(world.Scene("blue", (world.Obj("circle", "red", 16, 16, 18),)))
    assert identity(same, ref_hist) > 0.8 > 0.2 > identity(plain, ref_hist)


def _bench_concept(name: str, backgrounds=("white", "blue", "green")):
    from persres.toy.bench import BenchConcept, object_pixels
    from persres.toy.scoring import color_histogram

    rng = random.Random(7)
    refs = [world.render(world.novel_scene(rng, name, bg)) for bg in backgrounds]
    pixels = object_pixels(refs)
    return BenchConcept(name, None, world.NOVEL_CONCEPTS[name][0], "test", color_histogram(pixels), pixels, refs, refs)


def test_color_fidelity_is_zero_on_the_concept_and_far_on_palette_colors():
    from persres.toy.scoring import color_fidelity, shape_match

    concept = _bench_concept("teal_coral_triangle")
    same = world.render(world.novel_scene(random.Random(1), "teal_coral_triangle", "purple"))
    fid = color_fidelity(same, concept.ref_lab)
    assert fid["delta_e"] == 0 and fid["delta_e2000"] == 0 and fid["within_20"] == 1
    palette = world.render(world.Scene("purple", (world.Obj("triangle", "green", 16, 16, 18),)))  # right shape, palette color
    far = color_fidelity(palette, concept.ref_lab)
    assert far["delta_e"] > 30 and far["within_20"] == 0 and shape_match(palette, "triangle") == 1.0
    assert color_fidelity(world.render(world.Scene("purple", ())), concept.ref_lab) == {}  # nothing drawn: nothing scored


def test_several_concepts_are_scored_side_by_side_by_their_own_colors():
    from persres.toy.scoring import score_group

    names = ["salmon_spotted_heart", "chevron_star", "olive_concentric_square"]
    concepts = [_bench_concept(n) for n in names]
    objs = [world.Obj(world.NOVEL_CONCEPTS[n][0], n, cx, 16, 9, texture=world.NOVEL_CONCEPTS[n][1]) for n, cx in zip(names, (5.5, 16, 26.5))]
    trio = world.render(world.Scene("red", tuple(objs)))
    row = score_group(trio, concepts)
    assert row["both_present"] == 1.0
    assert [row[f"nearer_own{s}"] for s in ("", "_2", "_3")] == [1.0, 1.0, 1.0]
    assert all(row[f"delta_e{s}"] < 5 for s in ("", "_2", "_3"))
    swapped = score_group(trio, [concepts[1], concepts[0], concepts[2]])  # the first two sides scored against each other's colors
    assert (swapped["nearer_own"], swapped["nearer_own_2"], swapped["nearer_own_3"]) == (0.0, 0.0, 1.0)
    assert swapped["lab_margin"] < 0 < row["lab_margin"]


def test_bench_counts_objects_and_picks_a_pair_background_away_from_the_concepts():
    from persres.toy.scoring import count_objects, pair_background

    one = world.render(world.Scene("white", (world.Obj("circle", "red", 16, 16, 18),)))
    two = world.render(world.Scene("white", (world.Obj("circle", "red", 8, 16, 10), world.Obj("star", "blue", 24, 16, 12))))
    assert (count_objects(one), count_objects(two), count_objects(world.render(world.Scene("white", ())))) == (1, 2, 0)
    from persres.toy.bench import ToyPrompt
    from persres.toy.scoring import score_image

    asked = ToyPrompt("background", "a V* circle on a white background", background="white")
    none = world.render(world.Scene("white", ()))
    assert [score_image(im, asked, np.ones(64) / 64)["drawn"] for im in (one, two, none)] == [1.0, 0.0, 0.0]
    white = np.full((10, 3), 245.0)
    yellow = np.array([world.PALETTE["yellow"]] * 10, dtype=np.float64)
    assert pair_background(white, yellow) not in ("white", "yellow")


def test_concept_sets_are_disjoint_and_cover_every_shipped_concept():
    sets = [set(names) for names in world.CONCEPT_SETS.values()]
    assert sum(len(s) for s in sets) == len(set().union(*sets))  # no concept in two sets
    assert set().union(*sets) == set(world.NOVEL_CONCEPTS)
    assert {"tuning", "held_out"} <= set(world.CONCEPT_SETS) and len(world.CONCEPT_SETS["held_out"]) >= 4


def test_quality_measure_reports_fractions(tiny_model):
    from persres.models import load_pipeline
    from persres.toy.quality import measure

    report = measure(load_pipeline(str(tiny_model)), samples=4, held_out=True, steps=2)
    assert set(report) == {"background", "color", "shape"}
    assert all(0 <= v <= 1 and (v * 4).is_integer() for v in report.values())


def test_build_script_exports_a_loadable_model_and_resumes(tmp_path):
    from persres.config import SampleConfig
    from persres.models import load_pipeline
    from persres.settings import model_defaults
    from persres.sample import generate
    from persres.toy import build

    args = ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "model"), "--vae-steps", "2", "--steps", "2",
            "--batch", "4", "--dataset", "64"]
    build.main(args)
    pipe = load_pipeline(str(tmp_path / "model"))
    image = generate(pipe, "a red circle on a blue background", [], SampleConfig(steps=2)).images[0]
    assert image.size == (world.SIZE, world.SIZE)
    assert pipe.unet.config.use_linear_projection is False
    assert model_defaults(str(tmp_path / "model"))["lr"] > 0
    build.main(args[:-6] + ["--steps", "3", "--batch", "4", "--dataset", "64"])
    assert "resumed at step 2" in (tmp_path / "work" / "log.txt").read_text()


def test_build_grows_an_exported_model_and_keeps_its_vae(tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from persres.models import load_pipeline
    from persres.residuals import transformer_blocks
    from persres.toy import build

    small = ["--vae-steps", "2", "--steps", "2", "--batch", "4", "--dataset", "64"]
    build.main(["--work", str(tmp_path / "w1"), "--out", str(tmp_path / "first"), *small])
    build.main(["--work", str(tmp_path / "w2"), "--out", str(tmp_path / "grown"), "--init-from", str(tmp_path / "first"),
                "--grow-layers", "2,2,1", *small])
    first, grown = load_pipeline(str(tmp_path / "first")), load_pipeline(str(tmp_path / "grown"))
    assert len(transformer_blocks(first.unet)) == 7 and len(transformer_blocks(grown.unet)) == 11
    for name, weight in first.vae.state_dict().items():  # fine-tuning never touches the VAE
        torch.testing.assert_close(grown.vae.state_dict()[name], weight)
    with safe_open(str(tmp_path / "grown" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16  # stored small
    plain = StableDiffusionPipeline.from_pretrained(str(tmp_path / "grown"))  # no dtype given: one dtype throughout
    assert {plain.unet.dtype, plain.vae.dtype, plain.text_encoder.dtype} == {torch.float32}


@pytest.mark.parametrize("lab1, lab2, expected", [  # CIEDE2000 test data of Sharma, Wu and Dalal (2005), pairs 1, 7, 17, 25, 34
    ((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),
    ((50.0, 0.0, 0.0), (50.0, -1.0, 2.0), 2.3669),
    ((50.0, 2.5, 0.0), (73.0, 25.0, -18.0), 27.1492),
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
    ((2.0776, 0.0795, -1.1350), (0.9033, -0.0636, -0.5514), 0.9082),
])
def test_ciede2000_matches_the_published_test_data(lab1, lab2, expected):
    from persres.toy.color import delta_e2000

    assert float(delta_e2000(np.array(lab1), np.array(lab2))) == pytest.approx(expected, abs=1e-4)
    assert float(delta_e2000(np.array(lab2), np.array(lab1))) == pytest.approx(expected, abs=1e-4)


def test_srgb_to_lab_matches_known_colors():
    from persres.toy.color import delta_e76, srgb_to_lab

    lab = srgb_to_lab(np.array([[255, 0, 0], [255, 255, 255], [0, 0, 0], [128, 128, 128]]))
    assert lab[0] == pytest.approx([53.24, 80.09, 67.20], abs=0.02)
    assert lab[1] == pytest.approx([100, 0, 0], abs=0.01) and lab[2] == pytest.approx([0, 0, 0], abs=1e-6)
    assert lab[3] == pytest.approx([53.59, 0, 0], abs=0.01)
    assert float(delta_e76(lab[1], lab[2])) == pytest.approx(100, abs=0.01)
