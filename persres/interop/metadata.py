"""What an exported LoRA says about itself, for the tools people load it in.

- kohya `ss_*` keys: AUTOMATIC1111's metadata panel and its tag list (`ss_tag_frequency`,
  which offers the trigger words), sd-scripts conventions for module, dims and training.
- SAI model spec `modelspec.*` (the keys sd-scripts writes): architecture, implementation,
  title, date, resolution, trigger phrase, prediction type; model hubs and ComfyUI read them.
- `persres.*`: name, identifier, class word and per-block ranks, read back by `persres import`.
"""

from __future__ import annotations

import collections
import datetime as dt
import json

from persres import families
from persres.packs import PackMeta

PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "flow_matching": "flow"}  # the pack's -> modelspec's


def for_export(meta: PackMeta, fmt: str) -> dict[str, str]:
    family = families.of_meta(meta)
    config = meta.train_config
    prediction = config.get("prediction_type", "epsilon")
    modelspec = family.export_modelspec(prediction)
    resolution = int(config.get("resolution") or family.resolution)
    trigger = f"{meta.identifier} {meta.class_word}"
    ranks = collections.Counter([*meta.ranks.values(), *(spec[0] for spec in meta.layers.values())])
    dim = ranks.most_common(1)[0][0] if fmt == "kohya" else max(ranks)
    what = "proj_out of every transformer block" if not meta.layers else f"{len(meta.ranks) + len(meta.layers)} layers"
    date = meta.created_at or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return {
        # kohya / sd-scripts
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(dim),  # alpha = rank in every module: scale 1
        "ss_network_args": json.dumps({"module_dims": "per block, alpha = dim", "ranks": sorted(ranks)}),
        "ss_base_model_version": family.kohya_version,
        "ss_v2": str(family.kohya_v2),
        "ss_training_comment": f"persres personalized residuals ({what}, ranks "
                               f"{'/'.join(map(str, sorted(ranks)))}); trigger: {trigger}",
        "ss_tag_frequency": json.dumps({meta.name: {trigger: max(len(meta.image_hashes), 1)}}),
        "ss_num_train_images": str(len(meta.image_hashes)),
        "ss_steps": str(config.get("steps", "")),
        "ss_max_train_steps": str(config.get("steps", "")),
        "ss_learning_rate": str(config.get("lr", "")),
        "ss_unet_lr": str(config.get("lr", "")),
        "ss_text_encoder_lr": "0",
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_output_name": meta.name,
        "ss_training_started_at": date,
        # SAI model spec
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{modelspec}/lora",
        "modelspec.implementation": family.implementation,
        "modelspec.title": meta.name,
        "modelspec.description": f"persres concept '{meta.name}' ({meta.class_word}); write '{trigger}' in the prompt",
        "modelspec.date": date,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.trigger_phrase": trigger,
        "modelspec.usage_hint": f"Use '{trigger}' in the prompt",
        "modelspec.prediction_type": PREDICTIONS.get(prediction, "epsilon"),
        # persres
        "persres.name": meta.name,
        "persres.identifier": meta.identifier,
        "persres.class_word": meta.class_word,
        "persres.ranks": json.dumps(meta.ranks, sort_keys=True),
        "persres.family": family.key,
        **({"persres.everywhere": "true"} if meta.everywhere else {}),
        **({"lora_adapter_metadata": _peft_metadata(meta)} if fmt == "diffusers" else {}),
    }


def _peft_metadata(meta: PackMeta) -> str:
    from persres.interop.peft import adapter_metadata

    return adapter_metadata(meta)


def lora_trigger(metadata: dict[str, str]) -> tuple[str | None, str | None]:
    """(identifier, class word) from a LoRA's trigger phrase: `modelspec.trigger_phrase`, else the most
    frequent tag of `ss_tag_frequency` (sd-scripts). The first word is the identifier where it is
    one (1-32 lowercase letters), the rest the class word; (None, None) where neither is there."""
    from persres.names import IDENTIFIER_RE

    phrase = (metadata.get("modelspec.trigger_phrase") or "").strip()
    if not phrase:
        try:
            datasets = json.loads(metadata.get("ss_tag_frequency") or "{}")
            counts = collections.Counter()
            for tags in (datasets.values() if isinstance(datasets, dict) else ()):
                for tag, n in (tags.items() if isinstance(tags, dict) else ()):
                    if isinstance(n, (int, float)):
                        counts[str(tag).strip()] += n
            phrase = counts.most_common(1)[0][0] if counts else ""
        except (ValueError, TypeError):
            phrase = ""
    words = phrase.replace(",", " ").split()
    if not words or not IDENTIFIER_RE.fullmatch(words[0].lower()):
        return None, None
    return words[0].lower(), " ".join(words[1:])[:64] or None


def naming_of(metadata: dict[str, str], name: str | None, class_word: str | None, identifier: str | None):
    """A foreign LoRA's (name, class word, identifier): what was given, else its persres.* keys, else its trigger phrase."""
    trigger, trigger_class = lora_trigger(metadata)
    return (name or metadata.get("persres.name"), class_word or metadata.get("persres.class_word") or trigger_class,
            identifier or metadata.get("persres.identifier") or trigger)
