"""Hub ids: a model not yet on this machine is downloaded once, or refused in one line at once."""

from __future__ import annotations

from pathlib import Path

from persres.errors import ModelNotFound
from persres.models.names import HUB_ID_RE, TOY


def local_snapshot(model: str, on_download=None) -> str:
    """Where `model` is read from: itself, unless it is a hub id not yet in the local cache; then it is
    downloaded first (diffusers' `DiffusionPipeline.download`: what the pipeline needs, with the hub's
    own progress bars), after `on_download(model)` is told, and its snapshot folder is returned."""
    if model == TOY or Path(model).expanduser().exists() or not HUB_ID_RE.fullmatch(model):
        return model
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        return model  # cached: diffusers reads it by its id
    from huggingface_hub import constants

    fix = "download it once with network access, or pass --model /path/to/a/diffusers/directory"
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFound(f"model {model!r} is not on disk and could not be fetched: HF_HUB_OFFLINE is set; {fix}")
    unreachable = hub_unreachable(constants.ENDPOINT)
    if unreachable:  # said at once, not after the hub client's retries
        raise ModelNotFound(f"model {model!r} is not on disk and could not be fetched: {constants.ENDPOINT} "
                            f"cannot be reached ({unreachable}); {fix}")
    if on_download is not None:
        on_download(model)
    from diffusers import DiffusionPipeline

    try:
        return str(DiffusionPipeline.download(model))
    except Exception as e:
        raise ModelNotFound(why_not_fetched(model, e, fix)) from None


def why_not_fetched(model: str, error: Exception, fix: str) -> str:
    """The one line for a hub download that failed: a gated model needs its licence accepted and a
    login, a model the hub does not know may be private or misspelt; anything else, `fix`."""
    kinds = {type(k).__name__ for k in (error, error.__cause__, error.__context__) if k is not None}
    if "GatedRepoError" in kinds:
        return (f"model {model!r} is gated on the hub: accept its licence on its hub page, log in once with "
                "`huggingface-cli login` (or set HF_TOKEN), then run again")
    if "RepositoryNotFoundError" in kinds:
        return (f"model {model!r} is not on the hub under that id (check the spelling; a private model needs "
                "`huggingface-cli login` or HF_TOKEN)")
    return f"model {model!r} is not on disk and could not be fetched ({type(error).__name__}); {fix}"


def hub_unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """Why a TCP connection to `endpoint`'s host cannot be made within `timeout` seconds (name
    lookup included), or None if it can."""
    import socket
    import threading
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e.strerror or type(e).__name__)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return outcome[0] if outcome else f"no answer in {timeout:g} s"
