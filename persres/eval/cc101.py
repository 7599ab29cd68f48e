"""Reading the user's copy of CustomConcept101 (dataset.json, dataset_multiconcept.json, prompts/).

The benchmark's files are under Adobe's noncommercial research license: persres does not
ship them and reads them from a path the user gives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from persres.errors import InputError


@dataclass(frozen=True)
class CC101Concept:
    key: str  # the image folder's name, e.g. "pet_dog1"
    category: str  # its prefix, e.g. "pet"
    class_word: str
    images_dir: Path
    templates: tuple[str, ...]  # prompts with a "{}" placeholder

    def prompts(self, n: int | None = None, placeholder: str = "V*") -> list[str]:
        """The first n prompts with "{}" replaced by "V* class" (the paper: 20 per concept)."""
        return [t.replace("{}", f"{placeholder} {self.class_word}") for t in self.templates[:n]]


@dataclass(frozen=True)
class CC101Pair:
    first: CC101Concept
    second: CC101Concept
    templates: tuple[str, ...]  # prompts with "{0}" and "{1}"

    @property
    def key(self) -> str:
        return f"{self.first.key}+{self.second.key}"

    def prompts(self, n: int | None = None) -> list[str]:
        """The first n prompts naming both concepts. (scene_pet.txt has one "{0} ... {0}" template:
        it names one concept twice, so the pair cannot be bound to it; it is skipped.)"""
        usable = [t for t in self.templates if "{0}" in t and "{1}" in t]
        return [t.replace("{0}", f"V1 {self.first.class_word}").replace("{1}", f"V2 {self.second.class_word}") for t in usable[:n]]


def _json(path: Path):
    if not path.is_file():
        raise InputError(f"{str(path)!r} not found: --root must be your copy of the customconcept101 folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{str(path)!r} is not valid JSON: {e}") from None


def _templates(root: Path, rel: str) -> tuple[str, ...]:
    path = root / rel
    if not path.is_file():
        raise InputError(f"prompt file {str(path)!r} not found")
    return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())


def _concept(root: Path, entry: dict) -> CC101Concept:
    key = Path(entry["instance_data_dir"]).name
    return CC101Concept(
        key=key, category=key.split("_")[0], class_word=entry["class_prompt"],
        images_dir=(root / entry["instance_data_dir"]).resolve(), templates=_templates(root, entry["prompt_filename"]),
    )


def load_concepts(root: Path) -> list[CC101Concept]:
    return [_concept(Path(root), e) for e in _json(Path(root) / "dataset.json")]


def load_pairs(root: Path) -> list[CC101Pair]:
    pairs = []
    for first, second, compose in _json(Path(root) / "dataset_multiconcept.json"):
        pairs.append(CC101Pair(_concept(Path(root), first), _concept(Path(root), second), _templates(Path(root), compose["prompt_filename_compose"])))
    return pairs


def select(concepts: list[CC101Concept], names: list[str] | None = None, first_n: int | None = None) -> list[CC101Concept]:
    if names:
        by_key = {c.key: c for c in concepts}
        unknown = [n for n in names if n not in by_key]
        if unknown:
            raise InputError(f"unknown CustomConcept101 concept {unknown[0]!r} (e.g. {', '.join(list(by_key)[:3])})")
        return [by_key[n] for n in names]
    return concepts[:first_n] if first_n else concepts
