"""The toy world: a tiny text-to-image world of colored shapes, its model's build, and its shipped concepts."""

from pathlib import Path as _Path

TOY_PREFIX = "toy:"  # "toy:checker_circle": a reference folder shipped with persres, usable from any directory
CONCEPTS_DIR = _Path(__file__).parent / "concepts"


def resolve_folder(folder) -> _Path:
    """A folder of reference images: as given, or for "toy:NAME" the shipped toy concept's."""
    text = str(folder)
    if not text.startswith(TOY_PREFIX):
        return _Path(folder)
    from persres.errors import InputError
    from persres.toy.world import NOVEL_CONCEPTS

    name = text[len(TOY_PREFIX):]
    if name not in NOVEL_CONCEPTS:
        raise InputError(f"unknown toy concept {name!r} (choose from {', '.join(NOVEL_CONCEPTS)})")
    return CONCEPTS_DIR / name
