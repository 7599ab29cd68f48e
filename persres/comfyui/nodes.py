"""persres's ComfyUI nodes: each one library call (`persres.comfyui.apply`), rendered as a node.

The node keys (`PersresConcepts`, `PersresRegions`) and their input names are what saved
workflows refer to: they stay. A persres error reaches ComfyUI as its one-line message; what can be
checked without the model (the concepts text, the names, the placeholders) is checked when the
prompt is queued (`VALIDATE_INPUTS`), before anything runs.
"""

from __future__ import annotations

import numpy as np
import torch

from persres.comfyui import NODE_PACK
from persres.errors import PersresError

CONCEPTS_HELP = ("name[:strength], ... : concepts of the persres registry, or files in ComfyUI's loras folder "
                 "(any LoRA persres imports; its trigger words from its metadata)")
TEXT_HELP = "the prompt; V1, V2, ... (or V* for one) and <name> stand for the concepts' identifiers"


class PersresConcepts:
    """Several concepts in one picture, each in its own region found in the same evaluation (LAG)."""

    DESCRIPTION = ("Puts persres concepts and LoRAs on the model, each acting only where the prompt's words for it "
                   "attend (LAG: one model evaluation per step), and encodes the prompt with their identifiers.")
    CATEGORY = NODE_PACK
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "CONDITIONING")
    RETURN_NAMES = ("model", "positive")
    OUTPUT_TOOLTIPS = ("the model with the concepts on it (sample with this one)", "the prompt, identifiers bound")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "clip": ("CLIP",),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "a photo of V1 dog and V2 cat",
                                "tooltip": TEXT_HELP}),
            "concepts": ("STRING", {"default": "", "tooltip": CONCEPTS_HELP}),
            "lag": ("BOOLEAN", {"default": True, "tooltip": "each concept only in its own region (off: everywhere, as LoraLoader)"}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, text=None, concepts=None):
        if text is None or concepts is None:  # linked from another node: checked when it runs
            return True
        from persres.comfyui import apply
        from persres.comfyui.concepts import bind, parse

        try:
            bind(text, parse(concepts), apply.sources())
        except PersresError as e:
            return str(e)
        return True

    def apply(self, model, clip, text, concepts, lag):
        from persres.comfyui.apply import apply_concepts

        return _one_line(apply_concepts, model, clip, text, concepts, lag)


class PersresRegions:
    """Where each concept acted in the last sampling with this model, as --save-masks shows."""

    DESCRIPTION = ("Each concept's region from the last sampling with the model of PersresConcepts: one mask per "
                   "concept and image (concepts in order), and the images with every region tinted.")
    CATEGORY = NODE_PACK
    FUNCTION = "show"
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("masks", "overlay")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "the model PersresConcepts put out"}),
            "images": ("IMAGE", {"tooltip": "the images decoded from that model's sampler (runs this node after it)"}),
        }}

    def show(self, model, images):
        from persres.comfyui.apply import regions

        masks = _one_line(regions, model)
        return overlay(masks, images)


def overlay(masks: dict[str, torch.Tensor], images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(MASK (K * B, H, W) one per concept and image, IMAGE (B, H, W, 3) with every region tinted)."""
    from PIL import Image

    from persres.generation import mask_overlay

    b, h, w = images.shape[:3]
    out, tinted = [], []
    for m in masks.values():
        m = m[-b:] if m.shape[0] >= b else m.repeat(b // m.shape[0], 1, 1)  # (B, h, w): one per image
        out.append(torch.nn.functional.interpolate(m[:, None].float(), size=(h, w), mode="nearest")[:, 0])
    for i in range(b):
        picture = Image.fromarray((images[i].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))
        for k, m in enumerate(out):
            picture = mask_overlay(picture, m[i].cpu().numpy(), k)
        tinted.append(torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255))
    return torch.cat(out) if out else torch.zeros(0, h, w), torch.stack(tinted)


def _one_line(call, *args):
    """The call; a persres error re-raised as its one-line message alone (no chain of library frames)."""
    try:
        return call(*args)
    except PersresError as e:
        raise type(e)(str(e)) from None


NODE_CLASS_MAPPINGS = {"PersresConcepts": PersresConcepts, "PersresRegions": PersresRegions}
NODE_DISPLAY_NAME_MAPPINGS = {"PersresConcepts": "persres concepts (LAG regions)", "PersresRegions": "persres regions"}
