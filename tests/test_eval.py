import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from persres.eval import bench as bench_mod
from persres.eval.bench import BenchConfig, run_bench, work_units
from persres.workspace import Workspace
from persres.eval.cc101 import load_concepts, load_pairs
from persres.registry import Registry
from persres.eval.folder import eval_folder, strip_identifiers
from persres.eval.metrics import CLIP_MEAN, CLIP_PREPROCESS, CLIP_STD, DINO_PREPROCESS, Scorer, image_alignment, text_alignment
from persres.config import SampleConfig, TrainConfig
from persres.testing import build_mini_cc101, build_tiny_scorers

from conftest import write_concept_images

SHARED = Path(__file__).resolve().parents[2] / "shared" / "customconcept101"


@pytest.fixture(scope="session")
def scorer(tmp_path_factory):
    clip, dino = build_tiny_scorers(tmp_path_factory.mktemp("scorers"))
    return Scorer(str(clip), str(dino))


def test_clip_t_is_2_5_times_the_clamped_cosine():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    txt = torch.tensor([[1.0, 1.0], [-1.0, 0.2], [3.0, 4.0]])
    per = text_alignment(img, txt)
    assert per[0].item() == pytest.approx(2.5 / math.sqrt(2))  # cos 45 degrees
    assert per[1].item() == 0.0  # negative cosine clamps to zero
    assert per[2].item() == pytest.approx(2.5)


def test_image_alignment_is_the_mean_of_all_pairs():
    gen = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    ref = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    s = 1 / math.sqrt(2)
    by_hand = (1 + s + 0 + s + s + 1) / 6  # cos(g_i, r_j) for i in 3, j in 2
    assert image_alignment(gen, ref) == pytest.approx(by_hand)


def striped(width=300, height=200):
    im = Image.new("RGB", (width, height), (0, 200, 0))
    im.paste((255, 0, 0), (0, 0, 50, height))  # red left strip
    im.paste((0, 0, 255), (width - 50, 0, width, height))  # blue right strip
    return im


@pytest.mark.parametrize("preprocess", [CLIP_PREPROCESS, DINO_PREPROCESS])
def test_preprocessing_resizes_the_shorter_side_and_keeps_the_center(preprocess):
    x = preprocess(striped())
    assert x.shape == (3, 224, 224)
    mean = torch.tensor(preprocess.mean).view(3, 1)
    std = torch.tensor(preprocess.std).view(3, 1)
    green = (torch.tensor([0.0, 200 / 255, 0.0]).view(3, 1) - mean) / std
    inner = x[:, :, 8:-8].reshape(3, -1)  # the side strips fall outside the center crop
    torch.testing.assert_close(inner, green.expand_as(inner), atol=0.05, rtol=0)


def test_each_preprocessing_normalizes_with_its_models_published_statistics():
    # CLIP (Radford et al.) and DINO (ImageNet) statistics, written out here independently of the code
    assert CLIP_PREPROCESS.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert CLIP_PREPROCESS.std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    assert DINO_PREPROCESS.mean == pytest.approx((0.485, 0.456, 0.406))
    assert DINO_PREPROCESS.std == pytest.approx((0.229, 0.224, 0.225))
    assert (CLIP_PREPROCESS.mean, CLIP_PREPROCESS.std) == (CLIP_MEAN, CLIP_STD)


def test_portrait_image_is_cropped_vertically():
    x = CLIP_PREPROCESS(striped().rotate(90, expand=True))  # 200 x 300
    assert x.shape == (3, 224, 224)


def test_an_image_scored_against_itself_has_image_alignment_one(scorer, tmp_path):
    folder = write_concept_images(tmp_path / "imgs", n=1)
    files = sorted(folder.iterdir())
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({files[0].stem: "a photo of a <new1> circle"}))
    scores = eval_folder(folder, [folder], scorer, prompts, strip=["<new1>"])
    assert scores.clip_i[0] == pytest.approx(1.0, abs=1e-6)
    assert scores.dino_i[0] == pytest.approx(1.0, abs=1e-6)
    # CLIP-T recomputed: 2.5 * max(cos, 0) of the image and the prompt with the placeholder removed
    image, text = scorer.clip_images([Image.open(files[0]).convert("RGB")]), scorer.clip_texts(["a photo of a circle"])
    cos = torch.nn.functional.cosine_similarity(image, text).item()
    assert scores.clip_t == pytest.approx(2.5 * max(cos, 0.0), abs=1e-5)


def test_strip_identifiers():
    assert strip_identifiers("a sks dog on the beach", ["sks"]) == "a dog on the beach"
    assert strip_identifiers("photo of a <new1> cat.", ["<new1>"]) == "photo of a cat."
    assert strip_identifiers("asks a sks", ["sks"]) == "asks a"


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/customconcept101 not beside the repo")
def test_customconcept101_files_parse():
    concepts = load_concepts(SHARED)
    assert len(concepts) == 101
    assert len({c.key for c in concepts}) == 101
    for c in concepts:
        prompts = c.prompts(20)
        assert prompts and all("{}" not in p and f"V* {c.class_word}" in p for p in prompts)
    pairs = load_pairs(SHARED)
    assert len(pairs) == 101
    assert all("{0}" not in p and "V1" in p and "V2" in p for pair in pairs for p in pair.prompts())
    skipped = sum(len(pair.templates) - len(pair.prompts()) for pair in pairs)
    assert skipped == sum("A photo of {0} at dawn with {0}" in t for pair in pairs for t in pair.templates) > 0


@pytest.fixture
def mini_root(tmp_path):
    """A two-concept CustomConcept101 layout with tiny toy-world images."""
    return build_mini_cc101(tmp_path / "cc101")


def test_bench_runs_end_to_end_and_resumes_without_redoing_work(mini_root, tiny_model, scorer, pipe, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    cfg = BenchConfig(out=out, prompts_per_concept=2, samples_per_prompt=2, sample=SampleConfig(steps=2),
                      train=TrainConfig(steps=2), model=str(tiny_model))
    concepts, pairs = load_concepts(mini_root), load_pairs(mini_root)
    messages = []

    def interrupt(msg):
        messages.append(msg)
        if msg.startswith("toy_heart/"):  # the heart's first prompt is sampled: stop there
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench(concepts, pairs, cfg, scorer, Workspace(str(tiny_model), pipe=pipe), log=interrupt)
    assert sum("training on rank" in m for m in messages) == 2  # both packs, first
    done = sorted(out.glob("toy_circle/*/*.png"))
    assert len(done) == 2 * 2 * 2  # modes x prompts x samples
    stamps = {p: p.stat().st_mtime_ns for p in [*done, *out.glob("toy_heart/*/*.png")]}
    assert len(stamps) == len(done) + 2  # and the heart's first prompt
    packs = {r.name: r.meta.created_at for r in Registry().list()}

    calls = {"score": 0}
    real_eval = bench_mod.eval_folder

    def count(*a, **k):
        calls["score"] += 1
        return real_eval(*a, **k)

    monkeypatch.setattr(bench_mod, "eval_folder", count)
    messages.clear()
    rows = run_bench(concepts, pairs, cfg, scorer, Workspace(str(tiny_model), pipe=pipe), log=messages.append)
    assert not any("training on rank" in m for m in messages)
    assert {r.name: r.meta.created_at for r in Registry().list()} == packs
    assert calls == {"score": 6}  # nothing was scored before the interrupt
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert len(rows) == 6 and {r["method"] for r in rows} == {"persres lag", "persres nolag"}
    pair_row = next(r for r in rows if r["category"] == "multi")
    assert {"clip_i", "clip_i1", "dino_i", "dino_i1"} <= set(pair_row)
    results = json.loads((out / "results.json").read_text())
    assert set(results["overall"]) == {"persres lag", "persres nolag"}
    assert (out / "results.csv").read_text().count("\n") == 7
    assert (out / "figure.png").stat().st_size > 0
    # a finished bench reruns without any new work
    calls.update(score=0)
    advanced = []
    run_bench(concepts, pairs, cfg, scorer, Workspace(str(tiny_model), pipe=pipe), advance=advanced.append)
    assert calls == {"score": 0}
    assert sum(advanced) == work_units(concepts, pairs, cfg) == 2 * (2 + 2 + 1)


def test_cli_eval_and_bench(mini_root, tiny_model, tmp_path, monkeypatch):
    import sys

    from typer.testing import CliRunner

    from persres.cli import app

    clip, dino = build_tiny_scorers(tmp_path / "scorers")
    runner = CliRunner()
    out = tmp_path / "b"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the optional plotting library is missing
    result = runner.invoke(app, ["bench", "customconcept101", "--root", str(mini_root), "--concepts", "1", "--samples-per-prompt", "1",
                                 "--prompts-per-concept", "1", "--steps", "2", "--train-steps", "2", "--lag", "on", "--out", str(out),
                                 "--model", str(tiny_model), "--clip", str(clip), "--dino", str(dino)])
    assert result.exit_code == 0, result.output
    assert (out / "results.json").exists() and not (out / "figure.png").exists()
    said = [line for line in result.stdout.splitlines() if line.startswith("results in ")]
    assert said == [f"results in {out / 'results.csv'}, {out / 'results.json'}"]  # only the files written
    assert "figure.png not drawn: matplotlib is not installed" in result.stderr
    samples = out / "toy_circle" / "lag"
    result = runner.invoke(app, ["eval", str(samples), "--refs", str(mini_root / "benchmark_dataset" / "toy_circle"),
                                 "--clip", str(clip), "--dino", str(dino), "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert set(scores) == {"clip_t", "clip_i", "dino_i", "n_images"} and scores["n_images"] == 1
    result = runner.invoke(app, ["eval", str(samples), "--refs", str(samples), "--clip", str(tmp_path / "nope"), "--dino", str(dino)])
    assert result.exit_code == 1 and "CLIP model" in result.stderr
    result = runner.invoke(app, ["bench", "customconcept101", "--root", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "dataset.json" in result.stderr
