"""Memory a training step and a sampling step need on a GPU, as persres estimates it (no GPU used).

    python -m benchmarks.memory_estimate

Activations: `persres.sizes` (the UNet estimate fitted on the toy model's UNet, scaled by latent
pixels x latents x the UNet's width), in bf16, at each model's native side: training at batch 4
(the paper's), sampling one image under classifier-free guidance (two latents per pass). Weights:
the UNet's parameters counted from its real config on the meta device, in bf16; the text
encoders and the VAE come on top (about 0.2 B parameters on SD 1.x, 0.9 B on SDXL).
"""

from __future__ import annotations

import torch


def main() -> None:
    from diffusers import UNet2DConditionModel

    from persres.families.sd import GEN_BYTES, TRAIN_BYTES, unet_width
    from persres.testing import SD14_UNET_CONFIG, SD21_UNET_CONFIG, SDXL_UNET_CONFIG

    print("model | side | UNet weights (bf16) | training activations, batch 4 | sampling activations, 1 image")
    for name, config, side in (("SD v1.4/1.5", SD14_UNET_CONFIG, 512), ("SD 2.1 (768)", SD21_UNET_CONFIG, 768),
                               ("SDXL base", SDXL_UNET_CONFIG, 1024)):
        with torch.device("meta"):
            params = sum(p.numel() for p in UNet2DConditionModel(**config).parameters())
        latent = (side // 8) ** 2
        width = unet_width(config)
        train = latent * 4 * width * TRAIN_BYTES * 0.5
        gen = latent * 2 * width * GEN_BYTES * 0.5
        print(f"{name} | {side} px | {params * 2 / 2**30:.1f} GB ({params / 1e9:.2f} B) | {train / 2**30:.1f} GB | {gen / 2**30:.1f} GB")


if __name__ == "__main__":
    main()
