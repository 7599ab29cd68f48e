"""The naming and counting rules of concepts, in one torch-free place.

The registry, packs, the CLI's registry commands and training all ask the same questions
(is this a concept name, an identifier, a class word; how many parameters do these ranks
make), so each rule is written once here. Nothing in this module imports torch: `persres
list` reads rows with these rules and starts without loading a model library.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from persres.errors import InputError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # fullmatch: "$" would let a trailing newline in
IDENTIFIER_RE = re.compile(r"[a-z]{1,32}")  # lowercase letters: CLIP cuts digits and symbols off into tokens of their own
MAX_CLASS_WORD = 64


def check_concept_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InputError(f"invalid concept name {name!r}: use letters, digits, '_' or '-' (at most 64, starting with a letter or digit)")
    return name


def check_identifier(identifier: str) -> str:
    if not isinstance(identifier, str) or not IDENTIFIER_RE.fullmatch(identifier):
        raise InputError(f"the identifier must be 1-32 lowercase letters, got {identifier!r}")
    return identifier


def clean_class_word(class_word) -> str | None:
    """The class word without surrounding spaces, or None where it breaks the rule: 1-64
    printable characters with something besides spaces."""
    if not isinstance(class_word, str):
        return None
    cleaned = class_word.strip(" ")
    if not cleaned or len(cleaned) > MAX_CLASS_WORD or not cleaned.isprintable():
        return None
    return cleaned


def parameter_count(ranks: Mapping[str, int], channels: Mapping[str, int],
                    in_channels: Mapping[str, int] | None = None) -> int:
    """Parameters of the residuals: A_i (m_i x r_i) and B_i (r_i x n_i) for every block; n_i = m_i
    unless `in_channels` names the block (a single-stream block's)."""
    ins = in_channels or {}
    return sum((channels[b] + ins.get(b, channels[b])) * r for b, r in ranks.items())


def layer_parameter_count(layers: Mapping[str, Sequence[int]]) -> int:
    """Parameters of a LoRA's other layers (`PackMeta.layers`: [r, m, n(, kh, kw)]): r (m + n kh kw) each."""
    return sum(r * (m + math.prod(rest)) for r, m, *rest in layers.values())


def layer_kind(key: str) -> str:
    """What a layer is, in the words `persres show` uses."""
    component, _, path = key.partition(".")
    if component in ("text_encoder", "text_encoder_2"):
        return "text encoder"
    leaf = path.rsplit(".", 1)[-1]
    rules = (("attn2.to_k", "cross-attention k/v"), ("attn2.to_v", "cross-attention k/v"), ("attn2.", "cross-attention q/out"),
             ("attn1.", "self-attention"), ("add_", "joint attention (text)"), ("to_add_out", "joint attention (text)"),
             ("ff_context.", "feed-forward (text)"), ("context_embedder", "text embedding"), ("attn.", "joint attention"),
             ("ff.", "feed-forward"), ("proj_mlp", "feed-forward"), ("proj_in", "proj_in"), ("resnets.", "resnet"),
             ("norm", "modulation"), ("proj_out", "proj_out"))
    for marker, name in rules:
        if marker in path or leaf == marker:
            return name
    return "other (embeddings, samplers)"


def layer_kinds(layers) -> dict[str, int]:
    """How many layers of each kind a pack's `layers` holds (what `persres show` prints)."""
    counts: dict[str, int] = {}
    for key in layers:
        counts[layer_kind(key)] = counts.get(layer_kind(key), 0) + 1
    return dict(sorted(counts.items()))
