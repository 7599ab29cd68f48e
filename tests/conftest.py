import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it: tests never reach the network

import pytest
import torch

from persres.testing import build_tiny_pipeline
from persres.toy import world


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def persres_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PERSRES_HOME", str(home))
    monkeypatch.delenv("PERSRES_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_linear_model(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd-linear", linear_proj=True)


@pytest.fixture(scope="session")
def tiny_other_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd-seed1", seed=1)


@pytest.fixture(scope="session")
def tiny_xl_model(tmp_path_factory) -> Path:
    from persres.testing import build_tiny_xl_pipeline

    return build_tiny_xl_pipeline(tmp_path_factory.mktemp("tiny-xl"))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    from persres.testing.flux import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="session")
def tiny_zimage(tmp_path_factory) -> Path:
    from persres.testing.zimage import build_tiny_zimage_pipeline

    return build_tiny_zimage_pipeline(tmp_path_factory.mktemp("models") / "tiny-zimage")


@pytest.fixture(scope="session")
def tiny_qwenimage(tmp_path_factory) -> Path:
    from persres.testing.qwenimage import build_tiny_qwenimage_pipeline

    return build_tiny_qwenimage_pipeline(tmp_path_factory.mktemp("models") / "tiny-qwenimage")


@pytest.fixture(scope="session")
def tiny_flux2_klein(tmp_path_factory) -> Path:
    from persres.testing.flux2 import build_tiny_flux2_klein_pipeline

    return build_tiny_flux2_klein_pipeline(tmp_path_factory.mktemp("models") / "tiny-flux2-klein")


@pytest.fixture(scope="session")
def tiny_flux2_dev(tmp_path_factory) -> Path:
    from persres.testing.flux2 import build_tiny_flux2_dev_pipeline

    return build_tiny_flux2_dev_pipeline(tmp_path_factory.mktemp("models") / "tiny-flux2-dev")


@pytest.fixture
def pipe(tiny_model):
    from persres.models import load_pipeline

    return load_pipeline(str(tiny_model))


def write_concept_images(folder: Path, concept: str = "checker_circle", n: int = 4, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        world.render(world.novel_scene(rng, concept, "blue")).save(folder / f"{i}.png")
    return folder


@pytest.fixture
def concept_dir(tmp_path) -> Path:
    return write_concept_images(tmp_path / "refs")


@pytest.fixture
def second_concept_dir(tmp_path) -> Path:
    return write_concept_images(tmp_path / "refs2", "striped_heart", seed=1)
