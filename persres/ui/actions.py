"""What each button of `persres ui` does: one call into the library, its result shaped for a page.

No method, SQL or torch here: the handlers call `persres.Workspace` (and the registry it
holds) and turn a `PersresError` into a Gradio error toast carrying the same one-line text
the CLI prints. Uploaded files reach the library under names this module gives them, never
under the names the browser sent.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
from PIL import Image

from persres.errors import Cancelled, InputError, PersresError

META_FIELDS = ("name", "class_word", "identifier", "family", "parameter_count", "created_at", "loss_start", "loss_end")


def one_line(fn):
    """persres errors as a toast with the CLI's one line; anything else as one line too, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except PersresError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except OSError as e:
            raise gr.Error(f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", print_exception=False) from None

    return wrapper


@dataclass
class Session:
    """What the app holds for its whole life: the workspace (one pipeline, loaded once), where
    generated images go, and the stop flag of the training running now."""

    workspace: object
    out_dir: Path
    upload_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="persres-ui-")))
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def registry(self):
        return self.workspace.registry


# --- concepts ---------------------------------------------------------------------------
def gallery(session: Session) -> list[tuple[str, str]]:
    """One card per concept: its references' contact sheet (or a blank tile) and a caption."""
    cards = []
    for record in session.registry.list():
        m = record.meta
        sheet = session.registry.reference_sheet(m.name)
        if not sheet.is_file():
            sheet = _blank(session)
        loss = f", loss {m.loss_start:.3f} → {m.loss_end:.3f}" if m.loss_start is not None else ""
        ranks = "/".join(str(r) for r in sorted({*m.ranks.values(), *(spec[0] for spec in m.layers.values())}))
        cards.append((str(sheet), f"{m.name} · {m.class_word} · {m.identifier} · {m.family} · rank {ranks} · "
                                  f"{m.parameter_count:,} params · {m.created_at[:10]}{loss}"))
    return cards


def _blank(session: Session) -> Path:
    path = session.out_dir / ".blank.png"
    if not path.exists():
        session.out_dir.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (96, 96), (235, 235, 235)).save(path)
    return path


def names(session: Session) -> list[str]:
    return session.registry.names()


@one_line
def show(session: Session, name: str) -> dict:
    if not name:
        raise InputError("choose a concept first")
    data = session.registry.get(name).to_dict()
    data["pack_file"] = data.pop("path")  # a "path" key would make the page treat the metadata as a file to serve
    return data


@one_line
def export(session: Session, name: str, fmt: str) -> str:
    """The concept as a file to download (the pack, or a diffusers / kohya LoRA)."""
    from persres.interop import export_concept

    if not name:
        raise InputError("choose a concept first")
    target = session.out_dir / "exports" / f"{name}-{fmt}.safetensors"
    return str(export_concept(session.registry, name, target, fmt, force=True))


@one_line
def import_file(session: Session, upload, name: str, class_word: str) -> str:
    if not upload:
        raise InputError("drop a .safetensors file to import")
    local = _take_upload(session, upload, ".safetensors")
    record = session.workspace.import_concept(local, name or None, class_word or None)
    return f"imported {record.name} ({record.meta.class_word}, identifier {record.meta.identifier!r})"


@one_line
def remove(session: Session, name: str, confirmed: bool) -> str:
    if not name:
        raise InputError("choose a concept first")
    if not confirmed:
        raise InputError(f"tick 'yes, remove {name}' to remove it")
    session.registry.remove(name)
    return f"removed {name}"


@one_line
def doctor(session: Session) -> str:
    problems = session.registry.doctor(repair=False)
    return "\n".join(problems) or f"{len(session.registry.list())} concepts, no problems"


# --- training ---------------------------------------------------------------------------
def defaults(session: Session) -> dict:
    """The settings the model in use starts from: training (its own defaults over the paper's) and sampling (its family's)."""
    config, sampling = session.workspace.train_config({}), session.workspace.sample_config()
    return {"steps": config.steps, "lr": config.lr, "rank_ratio": config.rank_ratio, "gen_steps": sampling.steps,
            "guidance": sampling.guidance}


@one_line
def suggest(session: Session, uploads, folder: str) -> list[list]:
    suggestion = session.workspace.suggest_class(_references(session, uploads, folder))
    return [[word, round(error, 5), draws] for word, error, draws in suggestion.ranking[:5]]


@one_line
def train(session: Session, uploads, folder: str, name: str, class_word: str, steps, lr, rank_ratio, progress=gr.Progress()):
    """Train and register; the page's Cancel sets the stop flag, which ends the run before anything is registered."""
    references = _references(session, uploads, folder)
    session.stop.clear()
    settings = {"steps": _int(steps, "steps"), "lr": _float(lr, "lr"), "rank_ratio": _float(rank_ratio, "rank ratio")}

    def step(done: int, loss: float) -> None:
        if session.stop.is_set():
            raise Cancelled(f"training {name!r} cancelled: nothing was registered")
        progress(done / settings["steps"], desc=f"step {done}/{settings['steps']}, loss {loss:.4f}")

    progress(0, desc="loading the model")
    outcome = session.workspace.train(references, name, class_word or "auto", progress=step, **settings)
    m = outcome.record.meta
    return (f"trained {m.name} ({m.parameter_count:,} parameters, loss {m.loss_start:.4f} → {m.loss_end:.4f}) "
            f"in {outcome.seconds:.1f}s; prompt it as <{m.name}> or V* (identifier {m.identifier!r})")


def cancel(session: Session) -> str:
    session.stop.set()
    return "cancelling..."


def _references(session: Session, uploads, folder: str):
    """Uploaded images (copied under names of ours) or a folder on this machine ("toy:NAME" too)."""
    if uploads:
        target = Path(tempfile.mkdtemp(dir=session.upload_dir))
        for i, upload in enumerate(uploads):
            _take_upload(session, upload, Path(_path_of(upload)).suffix.lower()[:8] or ".png", target / f"{i:03d}")
        return session.workspace.references(target)
    if folder and folder.strip():
        return session.workspace.references(folder.strip())
    raise InputError("drop 3-15 images of the concept, or give a folder")


def _path_of(upload) -> str:
    return upload if isinstance(upload, str) else getattr(upload, "name", None) or upload["path"]


def _take_upload(session: Session, upload, suffix: str, stem: Path | None = None) -> Path:
    """Copy an upload to a path persres names: the browser's file name never becomes a path."""
    stem = stem or Path(tempfile.mkdtemp(dir=session.upload_dir)) / "upload"
    local = stem.with_suffix(suffix if suffix.startswith(".") and suffix[1:].isalnum() else ".bin")
    shutil.copyfile(_path_of(upload), local)
    return local


def _int(value, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a whole number, got {value!r}") from None


def _float(value, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, got {value!r}") from None


# --- generation -------------------------------------------------------------------------
@one_line
def generate(session: Session, prompt: str, concepts: list[str], lag: bool, steps, guidance, seed, count, size, overlay: list[str]):
    """Images in a gallery, and for LAG each chosen concept's region tinted over each image."""
    result = _run(session, prompt, concepts, lag, steps, guidance, seed, count, size)
    return _cards(result, overlay), _regions(result)


@one_line
def compare(session: Session, prompt: str, concepts: list[str], steps, guidance, seed, count, size):
    """The same seeds with LAG and without (several concepts without LAG: their residuals summed)."""
    with_lag = _run(session, prompt, concepts, True, steps, guidance, seed, count, size)
    without = _run(session, prompt, concepts, False, steps, guidance, seed, count, size)
    label = "summed residuals" if len(concepts or ()) > 1 else "no LAG"
    cards = [(str(p), f"LAG, seed {s}") for p, s in zip(with_lag.image_paths, with_lag.seeds)]
    cards += [(str(p), f"{label}, seed {s}") for p, s in zip(without.image_paths, without.seeds)]
    return cards


def _run(session: Session, prompt, concepts, lag, steps, guidance, seed, count, size):
    height, width = _size(size)
    return session.workspace.generate(prompt or "", list(concepts or ()), lag=bool(lag), steps=_int(steps, "steps"),
                                      guidance=_float(guidance, "guidance"), seed=_int(seed, "seed"),
                                      num_images=_int(count, "count"), height=height, width=width, save_masks=bool(lag),
                                      out_dir=session.out_dir)


def _size(size) -> tuple[int | None, int | None]:
    if not size or str(size).strip() in ("", "model"):
        return None, None
    try:
        w, h = (int(v) for v in str(size).lower().split("x"))
    except ValueError:
        raise InputError(f"size must be WIDTHxHEIGHT (e.g. 512x512) or empty for the model's, got {size!r}") from None
    return h, w


def _cards(result, overlay) -> list[tuple[str, str]]:
    """Each image, then (for LAG) its overlay for every concept ticked in `overlay`."""
    from persres.generation import mask_path

    cards = []
    for path, seed in zip(result.image_paths, result.seeds):
        cards.append((str(path), f"seed {seed}"))
        for name in result.masks:
            if name in (overlay or result.masks):
                cards.append((str(mask_path(path, name)), f"seed {seed}: where {name} acted"))
    return cards


def _regions(result) -> str:
    if not result.masks:
        return "no regions (LAG off)"
    return ", ".join(f"{name}: {sum(float(m.mean()) for m in masks) / len(masks):.0%} of the image" for name, masks in result.masks.items())


@one_line
def settings_from_png(upload) -> tuple:
    """(prompt, concepts, lag, steps, guidance, seed) from a PNG persres wrote."""
    from persres.generation import read_generation_metadata

    if not upload:
        raise InputError("drop a PNG that persres generated")
    s = read_generation_metadata(_path_of(upload))
    return s.prompt, s.concepts, s.lag, s.steps, s.guidance, s.seed


def model_line(session: Session) -> str:
    ws = session.workspace
    return f"model: `{ws.model}`" + (" (the built-in toy model)" if ws.toy_is_silent_default else "")


def as_json(data) -> str:
    return json.dumps(data, indent=2, default=str)
