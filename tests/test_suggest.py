"""`persres suggest-class`: the base model ranks candidate class words (diffusion classifier)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from persres.cli import app
from persres.suggest import DEFAULT_BUDGET, SuggestConfig, builtin_candidates, plan_rounds, screen, suggest_class


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_the_builtin_list_is_hundreds_of_distinct_words():
    words = builtin_candidates()
    assert len(words) >= 250 and len(set(words)) == len(words)
    assert {"dog", "cat", "teddy bear", "car", "mug", "chair"} <= set(words)


@pytest.mark.parametrize("k", [1, 2, 3, 17, 283, 1000])
def test_successive_halving_stays_within_the_budget(k):
    rounds = plan_rounds(k, DEFAULT_BUDGET)
    assert rounds[0][0] == k
    assert all(b[0] < a[0] for a, b in zip(rounds, rounds[1:]))  # fewer candidates every round
    if k <= 283:
        assert all(b[0] == -(-a[0] // 2) for a, b in zip(rounds, rounds[1:]))  # halved, where the budget allows
    assert sum(alive * draws for alive, draws in rounds) <= DEFAULT_BUDGET
    assert all(draws >= 1 for _, draws in rounds)


def test_screening_reports_what_it_leaves_out(pipe):
    kept, rejected = screen(pipe.tokenizer, ["circle", "", "Circle", "  ", "square", "x" * 65, "q" * 60])
    assert kept == ["circle", "square"]
    reasons = dict(rejected)
    assert reasons["Circle"] == "duplicate" and reasons[""] == "empty"
    assert "printable" in reasons["x" * 65] and "tokens" in reasons["q" * 60]
    assert len(rejected) == 5


def test_every_candidate_is_scored_on_the_same_draws(pipe, concept_dir):
    from persres.images import read_folder

    images = [r.image for r in read_folder(concept_dir)]
    # "red circle" and "red  circle" tokenize alike: on shared draws their errors are equal to the bit
    s = suggest_class(pipe, images, ["red circle", "red  circle", "blue star", "green heart"], SuggestConfig(budget=200))
    a, b = s.per_draw["red circle"], s.per_draw["red  circle"]
    shared = min(len(a), len(b))
    assert shared >= 25 and a[:shared] == b[:shared]
    assert s.per_draw["blue star"][:shared] != a[:shared]  # other prompts, other errors on the same draws
    assert s.evaluations == sum(len(v) for v in s.per_draw.values()) <= 200


def test_the_toy_model_names_the_shape_of_plain_pictures():
    from persres.models import load_pipeline, resolve_model
    from persres.toy import world

    pipe = load_pipeline(resolve_model("toy"))
    import random

    rng = random.Random(0)
    images = [world.render(world.Scene(bg, (world.Obj("heart", "red", *place),))) for bg, place in
              zip(("white", "blue", "yellow"), (p[0] for p in (world._place(rng, 1) for _ in range(3))))]
    s = suggest_class(pipe, images, list(world.SHAPES), SuggestConfig(budget=600))
    assert s.best == "heart", s.top(3)


def test_cli_suggest_class_and_train_without_a_class(tiny_model, concept_dir):
    result = run("suggest-class", concept_dir, "--model", tiny_model, "--candidates", "circle,square,,circle", "--json", "--budget", "60")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [t["class"] for t in data["top"]][0] == data["suggestion"] and data["evaluations"] <= 60
    assert sorted(t["class"] for t in data["top"]) == ["circle", "square"]  # the duplicate and the empty entry are out
    assert sorted(map(tuple, data["rejected"])) == [("", "empty"), ("circle", "duplicate")]
    table = run("suggest-class", concept_dir, "--model", tiny_model, "--candidates", "circle,square,star", "--budget", "90")
    assert table.exit_code == 0 and "suggested class:" in table.stdout and "runner-up" in table.stdout
    trained = run("train", concept_dir, "--name", "auto", "--model", tiny_model, "--steps", "1")
    assert trained.exit_code == 0, trained.output
    assert "suggested by the model" in trained.stdout
    shown = json.loads(run("show", "auto", "--json").stdout)
    cfg = shown["train_config"]
    assert cfg["class_source"] == "suggested" and shown["class_word"] == cfg["class_suggestions"][0]["class"]
    assert len(cfg["class_suggestions"]) == 5 and cfg["class_evaluations"] <= DEFAULT_BUDGET
    given = run("train", concept_dir, "--name", "given", "--class", "circle", "--model", tiny_model, "--steps", "1")
    assert given.exit_code == 0
    assert json.loads(run("show", "given", "--json").stdout)["train_config"]["class_source"] == "given"


def test_suggest_class_bad_input_is_one_line(tiny_model, concept_dir, tmp_path):
    for args, expected in (
        (("suggest-class", tmp_path / "nope", "--model", tiny_model), "does not exist"),
        (("suggest-class", concept_dir, "--model", tiny_model, "--candidates", ",,"), "--candidates holds no word"),
        (("suggest-class", concept_dir, "--model", tiny_model, "--candidates", "missing/list.txt"), "not found"),
        (("suggest-class", concept_dir, "--model", tiny_model, "--budget", "0"), "--budget"),
    ):
        result = run(*args)
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) <= 3 and expected in result.output, (args, result.output)


def test_a_model_can_name_its_own_class_candidates(tiny_model, concept_dir, tmp_path):
    """persres_defaults.json's "class_candidates" replaces the built-in list (the toy model lists its
    six shapes); --candidates still wins; a malformed list is one clear error."""
    import json
    import shutil

    from persres.workspace import Workspace
    from persres.errors import InputError
    from persres.registry import Registry
    from persres.suggest import SuggestConfig

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "persres_defaults.json").write_text(json.dumps({"train": {}, "class_candidates": ["circle", "square"]}))
    registry = Registry(tmp_path / "home")
    config = SuggestConfig(budget=40)
    got = Workspace(str(model), registry=registry).suggest_class(concept_dir, None, config)
    assert {c for c, _, _ in got.ranking} == {"circle", "square"}
    given = Workspace(str(model), registry=registry).suggest_class(concept_dir, "vase,cup", config)
    assert {c for c, _, _ in given.ranking} == {"vase", "cup"}
    (model / "persres_defaults.json").write_text(json.dumps({"train": {}, "class_candidates": "circle"}))
    with pytest.raises(InputError, match="class_candidates"):
        Workspace(str(model), registry=registry).suggest_class(concept_dir, None, config)
