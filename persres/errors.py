"""Typed errors. The CLI turns every `PersresError` into one line on stderr and exit code 1."""

from __future__ import annotations


class PersresError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class InputError(PersresError):
    """Bad user input: a missing folder, no readable image, a non-positive step count."""


class ConceptNotFound(PersresError):
    """A concept name that the registry does not hold."""


class DuplicateConcept(PersresError):
    """A concept name that the registry already holds."""


class PromptError(PersresError):
    """A prompt that cannot be bound: unbound placeholder, unknown <name>, concept tokens cut off."""


class PackError(PersresError):
    """A pack file that is truncated, corrupt, or whose tensors do not match its metadata."""


class IncompatiblePack(PackError):
    """A pack trained on a base model of another architecture."""


class ModelNotFound(PersresError):
    """A base model that is neither on disk nor fetchable."""


class BackendUnavailable(PersresError):
    """An attention backend that cannot run here (xformers without CUDA, say)."""


class RegistryError(PersresError):
    """A registry home or database that cannot be used: unreadable, newer schema, read-only."""


class SizeError(InputError):
    """A size the model or this machine cannot do (`persres.sizes`)."""


class Cancelled(PersresError):
    """A training stopped on request (the web app's Cancel); nothing was registered."""


class GenerationError(PersresError):
    """Sampling produced something that must not be written (non-finite pixels)."""
