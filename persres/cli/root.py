"""The `persres` app: its Typer objects, the options commands share, and one-line errors.

Each command (in `persres.cli.*`) parses options, makes one library call and renders with
Rich. No SQL and no torch here: library modules are imported inside the commands, so that
`persres list` starts without a model library. Every `PersresError` becomes one line on
stderr and exit code 1.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import Annotated, Optional

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from persres.version import __version__


class BoolHelp:
    """`--help` read as a plain flag: False when absent. Typer coerces a flag left at its default
    (None) through pydantic, and importing pydantic costs a registry command a fifth of its start."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.default = False
        return option


class OneLineErrors(BoolHelp, TyperGroup):
    """Usage errors (a missing argument, an unknown option, a value of the wrong type) as one
    `error:` line and exit code 1, like every other bad input, instead of click's usage block."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            err.print("interrupted", markup=False)
            rv = 130
        except typer.TyperException as e:  # click's usage errors, as Typer vendors them
            if type(e).__name__ == "NoArgsIsHelpError":  # a bare `persres` or `persres config`: help on stdout, not an error
                print(e.ctx.get_help())
                if e.ctx.parent is None:
                    print(GETTING_STARTED)
                rv = 0
            else:
                where = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) is not None else ""
                err.print(f"error: {' '.join(e.format_message().split())}{where}", markup=False)
                rv = 1
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)

    def list_commands(self, ctx) -> list[str]:
        """In the order of `persres.cli.COMMAND_MODULES`, whichever command modules were imported first."""
        from persres.cli import COMMAND_MODULES

        order = list(COMMAND_MODULES)
        return sorted(super().list_commands(ctx), key=lambda name: order.index(name) if name in order else len(order))


GETTING_STARTED = """
Get started offline, on the built-in toy model (a few minutes on a CPU):
  persres train toy:checker_circle --name checker --class circle
  persres gen "a V* circle on a green background" -c checker --lag --out out/"""


class Command(BoolHelp, TyperCommand):
    """Help that names arguments by their metavar alone: `IMAGES_DIR`, not `IMAGES_DIR <str>`."""

    def format_options(self, ctx, formatter) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                args.append((param.metavar or record[0].split(" <")[0], record[1]))
            else:
                opts.append(record)
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


app = typer.Typer(
    help="Personalized residuals for Stable Diffusion: learn a concept from a few photos, draw it anywhere.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=OneLineErrors,
    rich_markup_mode=None,  # help strings render as written: "[default: 150, paper]" is text, not markup
)
config_app = typer.Typer(help="Show or change persres settings (the default model).", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(config_app, name="config")
bench_app = typer.Typer(help="Benchmarks of the method: CustomConcept101 (CLIP/DINO) and the toy world.", no_args_is_help=True,
                        rich_markup_mode=None)
app.add_typer(bench_app, name="bench")
out = Console(soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        print(f"persres {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False):
    """Personalized residuals for Stable Diffusion: learn a concept from a few photos, draw it anywhere."""


# --- options several commands share -------------------------------------------------------
MODEL_HELP = "Diffusers directory, .safetensors/.ckpt checkpoint, hub id, or 'toy'."
ModelOption = Annotated[Optional[str], typer.Option("--model", help=MODEL_HELP, metavar="MODEL")]
ConfigOption = Annotated[Optional[str], typer.Option("--config", help="Diffusers directory with the configs of a single-file --model (offline).",
                                                     metavar="DIR")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.", metavar="DEVICE")]
PrecisionOption = Annotated[str, typer.Option("--precision", help="auto, fp32, fp16 or bf16.", metavar="PRECISION")]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def opt(help: str, metavar: str | None = None, *names: str):
    """An option with its help and a metavar users know (INTEGER, DIR, ...)."""
    return typer.Option(*names, help=help, metavar=metavar)


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # their info logs; their warnings still reach _show_warning
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.simplefilter("default")  # each distinct warning once per place


PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_shown: set[tuple[str, str]] = set()


def _package_of(filename: str) -> str:
    """'diffusers' for .../site-packages/diffusers/models/x.py: which library warned."""
    parts = os.path.abspath(filename).split(os.sep)
    for marker in ("site-packages", "dist-packages"):
        if marker in parts and parts.index(marker) + 1 < len(parts):
            return parts[parts.index(marker) + 1].removesuffix(".py")
    return os.path.basename(filename).removesuffix(".py")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """persres's own warnings, and a library's once per message. A library's deprecation of an API that
    persres itself calls (the warning points into persres's code) is for persres's developers, not shown."""
    ours = category.__module__.startswith("persres")
    about_our_call = issubclass(category, (DeprecationWarning, FutureWarning)) and os.path.abspath(filename).startswith(PACKAGE_DIR)
    if not ours and (about_our_call or issubclass(category, (DeprecationWarning, PendingDeprecationWarning, ResourceWarning))):
        return
    key = (category.__name__, str(message))
    if key in _shown:
        return
    _shown.add(key)
    source = "" if ours else f" ({_package_of(filename)})"
    err.print(f"warning{source}: {' '.join(str(message).split())}", markup=False)


def command(fn):
    """Turn persres errors into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from persres.errors import PersresError

        _quiet_libraries()
        warnings.showwarning = _show_warning
        try:
            return fn(*args, **kwargs)
        except PersresError as e:
            err.print(f"error: {e}", markup=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted: nothing was registered", markup=False)
            raise typer.Exit(130) from None
        except OSError as e:  # the filesystem said no: a path we could not create, read or write
            where = f": {e.filename}" if e.filename else ""
            err.print(f"error: {e.strerror or e}{where}", markup=False)
            raise typer.Exit(1) from None
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except (MemoryError, RuntimeError) as e:
            if not isinstance(e, MemoryError) and not out_of_memory(e):
                return _internal(e)
            err.print(f"error: out of memory ({' '.join(str(e).split())[:160] or type(e).__name__}): try a smaller --resolution, "
                      "--height/--width, --batch-size or -n, or --precision bf16", markup=False)
            raise typer.Exit(1) from None
        except Exception as e:  # a bug: still one line; PERSRES_DEBUG=1 shows the traceback
            return _internal(e)

    return wrapper


def out_of_memory(e: BaseException) -> bool:
    """A CUDA OutOfMemoryError, or the CPU allocator's "can't allocate memory"."""
    text = str(e).lower()
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in text or "can't allocate memory" in text


def _internal(e: Exception):
    """A bug: still one line; PERSRES_DEBUG=1 shows the traceback."""
    if os.environ.get("PERSRES_DEBUG"):
        raise e
    err.print(f"error: internal error {type(e).__name__}: {' '.join(str(e).split())[:300]} "
              "(please report it; PERSRES_DEBUG=1 shows the traceback)", markup=False)
    raise typer.Exit(1) from None


def registry():
    """The registry, with a note for each leftover of a crashed writer it moved aside at start."""
    from persres.registry import Registry

    opened = Registry()
    for note in opened.notes:
        err.print(f"note: {note}", markup=False)
    return opened


def workspace(model: Optional[str] = None, model_config: Optional[str] = None, device="auto", precision: str = "auto", reg=None):
    """The workspace of `model`, checked before any work (a bad path or checkpoint is one line, not a late failure)."""
    from persres.workspace import Workspace

    ws = Workspace(model, registry=reg if reg is not None else registry(), model_config=model_config, device=device, precision=precision)
    quiet_loading()
    if ws.first_toy_use():
        err.print("note: using persres's built-in toy model; pass --model, set PERSRES_MODEL or run "
                  "`persres config model PATH_OR_HUB_ID` to use real Stable Diffusion weights", markup=False)
    return ws


def quiet_loading() -> None:
    """No per-component loading bars from diffusers and transformers; a download keeps the hub's own."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    enable_progress_bars()


def say_download(model: str) -> None:
    err.print(f"downloading {model} from the Hugging Face hub (once; later runs read the local cache)", markup=False)
