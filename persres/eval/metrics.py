"""The paper's metrics, as CustomConcept101's evaluate.py defines them (adobe-research/custom-diffusion).

- CLIP-T (text alignment): per image 2.5 * max(cos(image feature, prompt feature), 0), averaged.
- CLIP-I / DINO-I (image alignment): the mean of the full generated x reference cosine matrix.
CLIP is ViT-B/32 (`openai/clip-vit-base-patch32`: projected image/text embeddings); DINO is
ViT-S/16 (`facebook/dino-vits16`: the CLS token of the last, layer-normed hidden state).
Preprocessing is the benchmark's torchvision pipeline, written with PIL and torch:
resize the shorter side (bicubic), center crop 224, RGB, [0, 1], normalize.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from persres.errors import ModelNotFound

CLIP_MODEL = "openai/clip-vit-base-patch32"
DINO_MODEL = "facebook/dino-vits16"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_T_WEIGHT = 2.5  # CLIPScore's w


@dataclass(frozen=True)
class Preprocess:
    resize: int  # shorter side after resizing
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, crop, crop) normalized tensor, as torchvision's Resize/CenterCrop/ToTensor/Normalize."""
        w, h = image.size
        if w <= h:
            size = (self.resize, int(self.resize * h / w))
        else:
            size = (int(self.resize * w / h), self.resize)
        image = image.resize(size, Image.Resampling.BICUBIC)
        w, h = image.size
        top, left = int(round((h - self.crop) / 2.0)), int(round((w - self.crop) / 2.0))
        image = image.crop((left, top, left + self.crop, top + self.crop)).convert("RGB")
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, crop, crop)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std


CLIP_PREPROCESS = Preprocess(224, 224, CLIP_MEAN, CLIP_STD)
DINO_PREPROCESS = Preprocess(256, 224, IMAGENET_MEAN, IMAGENET_STD)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def text_alignment(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Per-image CLIP-T: 2.5 * max(cos, 0). image_features, text_features: (N, D), row i with row i."""
    cos = (l2_normalize(image_features.double()) * l2_normalize(text_features.double())).sum(-1)  # (N,)
    return CLIP_T_WEIGHT * cos.clamp(min=0)


def image_alignment(generated: torch.Tensor, references: torch.Tensor) -> float:
    """Mean of the full (N_gen, N_ref) cosine matrix."""
    sims = l2_normalize(generated.double()) @ l2_normalize(references.double()).T  # (N_gen, N_ref)
    return float(sims.mean())


def _load(loader, name: str, what: str):
    local = Path(name)
    try:
        if local.is_dir():
            return loader(local, local_files_only=True)
        return loader(name)
    except Exception as e:
        raise ModelNotFound(
            f"{what} model {name!r} is not on disk and could not be fetched ({type(e).__name__}); "
            f"download it once with network access, or pass a local directory"
        ) from None


class Scorer:
    """CLIP and DINO feature extractors loaded from a local directory or a hub id."""

    def __init__(self, clip: str = CLIP_MODEL, dino: str = DINO_MODEL, device: str | torch.device = "cpu", batch_size: int = 32):
        from transformers import AutoTokenizer, CLIPModel, ViTModel

        self.device = torch.device(device)
        self.batch_size = batch_size
        self.clip = _load(CLIPModel.from_pretrained, clip, "CLIP").to(self.device).eval()
        self.tokenizer = _load(AutoTokenizer.from_pretrained, clip, "CLIP tokenizer")
        self.dino = _load(lambda p, **kw: ViTModel.from_pretrained(p, add_pooling_layer=False, **kw), dino, "DINO").to(self.device).eval()

    @torch.no_grad()
    def _images(self, images: list[Image.Image], preprocess: Preprocess, fn) -> torch.Tensor:
        feats = []
        for i in range(0, len(images), self.batch_size):
            batch = torch.stack([preprocess(im) for im in images[i : i + self.batch_size]]).to(self.device)
            feats.append(fn(batch).float().cpu())
        return torch.cat(feats)

    def clip_images(self, images: list[Image.Image]) -> torch.Tensor:
        return self._images(images, CLIP_PREPROCESS, lambda x: _features(self.clip.get_image_features(pixel_values=x)))

    def dino_images(self, images: list[Image.Image]) -> torch.Tensor:
        return self._images(images, DINO_PREPROCESS, lambda x: self.dino(pixel_values=x).last_hidden_state[:, 0])

    @torch.no_grad()
    def clip_texts(self, texts: list[str]) -> torch.Tensor:
        limit = min(self.tokenizer.model_max_length, self.clip.config.text_config.max_position_embeddings)
        tok = self.tokenizer(texts, padding="max_length", truncation=True, max_length=limit, return_tensors="pt").to(self.device)
        return _features(self.clip.get_text_features(**tok)).float().cpu()


def _features(out) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]


@dataclass(frozen=True)
class Scores:
    clip_t: float
    clip_i: list[float]  # one per reference set (multi-concept: one per target)
    dino_i: list[float]
    n_images: int

    def to_dict(self) -> dict:
        out = {"clip_t": self.clip_t, "n_images": self.n_images}
        for i, (c, d) in enumerate(zip(self.clip_i, self.dino_i)):
            suffix = "" if i == 0 else str(i)
            out[f"clip_i{suffix}"] = c
            out[f"dino_i{suffix}"] = d
        return out


def score(scorer: Scorer, images: list[Image.Image], prompts: list[str], reference_sets: list[list[Image.Image]]) -> Scores:
    clip_feats = scorer.clip_images(images)
    dino_feats = scorer.dino_images(images)
    clip_t = float(text_alignment(clip_feats, scorer.clip_texts(prompts)).mean())
    clip_i = [image_alignment(clip_feats, scorer.clip_images(refs)) for refs in reference_sets]
    dino_i = [image_alignment(dino_feats, scorer.dino_images(refs)) for refs in reference_sets]
    return Scores(clip_t, clip_i, dino_i, len(images))
