"""persres: personalized residuals and localized attention-guided sampling for Stable Diffusion.

Implements "Personalized Residuals for Concept-Driven Text-to-Image Generation"
(Ham et al., CVPR 2024) and extends LAG sampling to several concepts in one pass.

    import persres
    ws = persres.Workspace()
    ws.train("photos/", name="mydog", class_word="dog")
    ws.generate("a V* dog on the beach", ["mydog"], lag=True, out_dir="out/")

`persres.Workspace` is the library API (docs/python-api.md); `persres.cli` is a thin Typer
front end over it.
"""

from persres.version import __version__
__all__ = ["Workspace", "SampleConfig", "TrainConfig", "__version__"]


def __getattr__(name: str):  # imported on first use: `import persres` stays light
    if name == "Workspace":
        from persres.workspace import Workspace

        return Workspace
    if name in ("SampleConfig", "TrainConfig"):
        from persres import config

        return getattr(config, name)
    raise AttributeError(f"module 'persres' has no attribute {name!r}")
