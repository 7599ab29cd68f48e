"""Where the registry lives, and where an export may not write."""

from __future__ import annotations

import os
from pathlib import Path

from persres.errors import InputError, PackError
from persres.packs import check_regular_file


def persres_home() -> Path:
    env = os.environ.get("PERSRES_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("persres", appauthor=False))


def check_export_target(out: Path, registry, force: bool) -> None:
    """An export never writes into the registry's own folders, over a folder, or over a file unless forced."""
    target = out.expanduser().resolve()
    for inside in (registry.packs_dir, registry.orphans_dir, registry.home / "registry.db"):
        inside = inside.resolve()
        if target == inside or inside in target.parents:
            raise InputError(f"{str(out)!r} is inside the registry ({str(inside)}): export somewhere else")
    if target.is_dir():
        raise InputError(f"{str(out)!r} is a folder: give a file name, e.g. {str(out / 'concept.safetensors')!r}")
    if target.exists() and not force:
        raise InputError(f"{str(out)!r} exists: pass --force to overwrite it")
    if target.exists():
        check_regular_file(target, "export target")
    if not target.parent.exists():
        return
    if not os.access(target.parent, os.W_OK):
        raise InputError(f"cannot write to {str(target.parent)!r}: permission denied")


def _fault(point: str) -> None:
    """Fault injection for the kill tests: PERSRES_FAULT=point makes this process SIGKILL itself there."""
    if os.environ.get("PERSRES_FAULT") == point:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _move_no_replace(src: Path, dst: Path) -> None:
    """Move src to dst, failing if dst exists (a hard link where the filesystem has them)."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise PackError(f"{str(dst)!r} appeared while registering; nothing was overwritten") from None
    except OSError:  # no hard links here: the registry's write lock already excludes other persres writers
        if dst.exists():
            raise PackError(f"{str(dst)!r} appeared while registering; nothing was overwritten") from None
        os.replace(src, dst)
