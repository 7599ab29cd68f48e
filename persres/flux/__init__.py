"""FLUX.1 (diffusers `FluxPipeline` / `FluxTransformer2DModel`): personalized residuals on the
diffusion transformer.

- residuals: ΔW = A·B on each single-stream block's `proj_out` (attention + MLP features ->
  the residual stream: 15360 -> 3072 on FLUX.1-dev), the direct analogue of the paper's layer;
  `persres.residuals` finds these blocks on a FLUX transformer as it finds a UNet's.
- rank: the paper's *budget*, not its ratio (`persres.families.FLUX_RANK_RATIO`).
- LAG on joint attention (`persres.kernels.joint`, installed by `persres.lag`): a concept's map
  is the image queries' attention to its T5 tokens, from the fused kernel's log-sum-exp; the
  residual acts on image tokens only.
- training (`train.py`): flow matching, the pipeline's own shifted sigmas and guidance input.
- `tiny.py`: a FLUX pipeline small enough for tests, saved and loaded like a real one.
"""
