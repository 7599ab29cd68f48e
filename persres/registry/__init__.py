"""The concept registry: SQLite rows (numbered migrations) over pack files."""

from persres.registry.store import ConceptRecord, Registry, persres_home

__all__ = ["ConceptRecord", "Registry", "persres_home"]
