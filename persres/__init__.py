"""persres: personalized residuals and localized attention-guided sampling for Stable Diffusion.

Implements "Personalized Residuals for Concept-Driven Text-to-Image Generation"
(Ham et al., CVPR 2024) and extends LAG sampling to several concepts in one pass.
The library API lives in `persres.api`; `persres.cli` is a thin Typer front end.
"""

__version__ = "0.1.0"
