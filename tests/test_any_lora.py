"""Any LoRA under LAG: community LoRAs on every layer kind import whole, round-trip, and act only in
their concepts' regions in one denoiser evaluation per step (SD 1.x, SDXL, FLUX.1 tiny pipelines)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from persres import layers, residuals
from persres.config import SampleConfig
from persres.errors import PackError
from persres.residuals import EVERYWHERE, ResidualLayer, ResidualProjOut
from persres.testing.loras import random_lora
from persres.workspace import Workspace

NOT_TIME = lambda key: "time_emb" not in key and "time_embedding" not in key and "time_text_embed" not in key  # noqa: E731
ATTENTION_AND_FF = lambda key: key.split(".")[0] != "text_encoder" and any(  # noqa: E731
    k in key for k in (".attn1.", ".attn2.", ".ff.", ".attn."))


@pytest.fixture
def ws(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSRES_HOME", str(tmp_path / "home"))
    return Workspace(str(tiny_model))


def import_random(ws, tmp_path, name, fmt="kohya", seed=0, class_word="dog", **kw):
    path = tmp_path / f"{name}.safetensors"
    deltas = random_lora(ws.pipeline(), path, fmt, seed=seed, **kw)
    record = ws.import_concept(path, name, class_word=class_word,
                               identifier={0: "sks", 1: "zqv", 2: "ohwx", 3: "pkz"}[seed])
    return record, deltas


def pack_deltas(ws, name) -> dict[str, torch.Tensor]:
    tensors, meta = ws.registry.load(name)
    return {key: (tensors[f"{key}.up"] @ tensors[f"{key}.down"].flatten(1)).view(spec[1], *spec[2:])
            for key, spec in meta.layers.items()}


@pytest.mark.parametrize("fmt,layout", [("kohya", "diffusers"), ("kohya", "original"), ("diffusers", None)])
def test_a_lora_of_every_layer_kind_imports_with_every_layer_kept(ws, tmp_path, fmt, layout):
    record, deltas = import_random(ws, tmp_path, "every", fmt, where=NOT_TIME, layout=layout or "diffusers")
    kinds = {layers.kind(k) for k in deltas}
    assert {"self-attention", "cross-attention q/out", "cross-attention k/v", "feed-forward", "resnet", "proj_in",
            "proj_out", "text encoder"} <= kinds
    assert set(record.meta.layers) == set(deltas)  # nothing dropped, nothing added
    got = pack_deltas(ws, "every")
    for key, delta in deltas.items():
        torch.testing.assert_close(got[key], delta, rtol=1e-5, atol=1e-7)
    assert record.meta.ranks == {}  # not persres's form: the layers stay as they are


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_exports_of_a_full_lora_reimport_to_the_same_change_on_every_layer(ws, tmp_path, fmt):
    import_random(ws, tmp_path, "full", where=NOT_TIME)
    out = ws.export("full", tmp_path / f"out.{fmt}.safetensors", fmt)
    again = ws.import_concept(out, "again")
    assert (again.meta.identifier, again.meta.class_word) == ("sks", "dog")
    first, second = pack_deltas(ws, "full"), pack_deltas(ws, "again")
    assert set(first) == set(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_diffusers_loads_a_diffusers_export_onto_exactly_the_same_unet_layers(ws, tmp_path, tiny_model):
    from diffusers import StableDiffusionPipeline

    _, deltas = import_random(ws, tmp_path, "unetonly", where=lambda k: k.startswith("unet.") and "time_emb" not in k)
    out = ws.export("unetonly", tmp_path / "unetonly.out.safetensors", "diffusers")
    theirs = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None, requires_safety_checker=False)
    before = {k: v.clone() for k, v in theirs.unet.state_dict().items()}
    theirs.load_lora_weights(str(out), adapter_name="x")
    theirs.fuse_lora()
    theirs.unload_lora_weights()
    after = theirs.unet.state_dict()
    for key, delta in deltas.items():
        path = key.removeprefix("unet.")
        torch.testing.assert_close(after[f"{path}.weight"] - before[f"{path}.weight"], delta, rtol=1e-4, atol=1e-6)
    untouched = [k for k in before if k.endswith(".weight") and k.removesuffix(".weight") not in {d.removeprefix("unet.") for d in deltas}]
    assert untouched and all(torch.equal(before[k], after[k]) for k in untouched)


def test_locon_tucker_convolutions_fold_into_the_same_change(ws, tmp_path):
    pipe = ws.pipeline()
    key = next(k for k, s in layers.targets(pipe).items() if len(s) == 4 and s[2:] == (3, 3) and ".resnets." in k)
    m, n, kh, kw = layers.targets(pipe)[key]
    g = torch.Generator().manual_seed(3)
    down, mid, up = torch.randn(2, n, 1, 1, generator=g), torch.randn(2, 2, kh, kw, generator=g), torch.randn(m, 2, 1, 1, generator=g)
    name = "lora_unet_" + key.removeprefix("unet.").replace(".", "_")
    path = tmp_path / "tucker.safetensors"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid, f"{name}.lora_up.weight": up,
               f"{name}.alpha": torch.tensor(2.0)}, str(path))
    ws.import_concept(path, "tucker", class_word="dog", identifier="sks")
    # LoCon applies up(mid(down(x))): the composed kernel, computed with convolutions
    x = torch.randn(1, n, 6, 6, generator=g)
    expected = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    got = F.conv2d(x, pack_deltas(ws, "tucker")[key], padding=1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("marker,what", [("hada_w1_a", "LoHa"), ("lokr_w1", "LoKr"), ("dora_scale", "DoRA"),
                                         ("lora_embedding_A", "embedding")])
def test_what_cannot_be_applied_exactly_is_refused_by_name(ws, tmp_path, marker, what):
    path = tmp_path / "odd.safetensors"
    save_file({f"lora_unet_down_blocks_0_attentions_0_proj_in.{marker}": torch.zeros(2, 2)}, str(path))
    with pytest.raises(PackError, match=what):
        ws.import_concept(path, "odd", class_word="dog")
    assert ws.registry.list() == []


def test_a_layer_the_model_lacks_is_refused_by_its_name(ws, tmp_path):
    path = tmp_path / "other.safetensors"
    random_lora(ws.pipeline(), path, where=lambda k: ".attn1.to_q" in k)
    tensors = load_file(str(path))
    tensors["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.zeros(2, 4)
    tensors["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"] = torch.zeros(4, 2)
    save_file(tensors, str(path))
    with pytest.raises(PackError, match="lora_unet_down_blocks_7_attentions_0_proj_in"):
        ws.import_concept(path, "other", class_word="dog")


def test_integer_factors_and_tensor_alphas_are_refused(ws, tmp_path):
    path = tmp_path / "int.safetensors"
    random_lora(ws.pipeline(), path, where=lambda k: ".attn1.to_q" in k)
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.endswith(".lora_up.weight"))
    tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, str(path))
    with pytest.raises(PackError, match="not floating point"):
        ws.import_concept(path, "int", class_word="dog")
    random_lora(ws.pipeline(), path, where=lambda k: ".attn1.to_q" in k)
    tensors = load_file(str(path))
    alpha = next(k for k in tensors if k.endswith(".alpha"))
    tensors[alpha] = torch.ones(3)
    save_file(tensors, str(path))
    with pytest.raises(PackError, match="alpha must be one number"):
        ws.import_concept(path, "alpha", class_word="dog")


def test_the_trigger_word_becomes_identifier_and_class(ws, tmp_path):
    path = tmp_path / "trig.safetensors"
    random_lora(ws.pipeline(), path, where=ATTENTION_AND_FF,
                metadata={"ss_tag_frequency": json.dumps({"10_ohwx corgi": {"ohwx corgi": 12, "grass": 3}})})
    record = ws.import_concept(path, "trig")
    assert (record.meta.identifier, record.meta.class_word) == ("ohwx", "corgi")
    random_lora(ws.pipeline(), path, where=ATTENTION_AND_FF, metadata={"modelspec.trigger_phrase": "zkw robot"})
    assert ws.import_concept(path, "trig2").meta.identifier == "zkw"


# --- LAG on every layer: the per-layer recomputation ---------------------------------------------------


def lag_trace(ws, prompt, names, strengths=None, steps=3, monkeypatch=None):
    """Run a LAG generation recording, at every wrapped denoiser layer's every call, its input, output and
    the mask each concept got; and the denoiser evaluations."""
    pipe = ws.pipeline()
    calls, asked = [], {}
    originals = {cls: cls.region for cls in (ResidualLayer, ResidualProjOut)}

    def spy(cls):
        def region(self, name, out):
            mask = originals[cls](self, name, out)
            asked.setdefault(id(self), {})[name] = mask
            return mask
        return region

    for cls in originals:
        monkeypatch.setattr(cls, "region", spy(cls))
    model = layers.components(pipe)[ws.family.denoiser_folder]
    evaluations = []
    denoiser_layers = set()

    def pre(m, args):
        if m is model:
            evaluations.append(1)
            denoiser_layers.update(id(w) for w in model.modules() if isinstance(w, ResidualLayer))

    def hook(m, args, out):  # every wrapped denoiser layer, however often the generation reloads the concepts
        if isinstance(m, ResidualLayer) and id(m) in denoiser_layers:
            calls.append((m.path, m, args[0].detach().clone(), out.detach().clone(), asked.pop(id(m), {}), len(evaluations)))

    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    handles = [register_module_forward_pre_hook(pre), register_module_forward_hook(hook)]
    try:
        concepts = [f"{n}:{strengths[n]}" if strengths and n in strengths else n for n in names]
        ws.generate(prompt, concepts, SampleConfig(steps=steps, lag=True, num_images=1, save_masks=True))
    finally:
        for h in handles:
            h.remove()
    return calls, len(evaluations)


def check_every_layer(ws, calls, deltas_by_concept, strengths, positions):
    """out = W x + sum_k s_k M_k (dW_k x) at every call, with M_k binary, disjoint across concepts on image
    positions, the concept's own token rows on text layers; nothing where no mask."""
    denoiser = ws.family.denoiser_folder
    checked, acted = 0, 0
    for path, module, x, out, masks, evaluation in calls:
        key = f"{denoiser}.{path}"
        base = module.base_layer(x)
        expected = base.clone()
        image_masks = []
        for name, mask in masks.items():
            delta = deltas_by_concept[name].get(key)
            assert delta is not None, (name, key)
            if mask is None:
                continue
            if module.is_conv:
                change = F.conv2d(x, delta.to(x.dtype), stride=module.base_layer.stride, padding=module.base_layer.padding)
            else:
                change = F.linear(x, delta.to(x.dtype))
            if mask is EVERYWHERE:
                expected += strengths.get(name, 1.0) * change
                continue
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
            if module.text:
                rows = mask[-1, :, 0].nonzero().flatten().tolist()
                assert rows == [p for p in positions[name] if p < x.shape[1]], (key, rows)
            else:
                image_masks.append(mask)
            expected += strengths.get(name, 1.0) * change * mask
            acted += 1
        if len(image_masks) > 1:
            assert torch.stack(image_masks).sum(0).max() <= 1  # regions never overlap
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5, msg=f"{key} at evaluation {evaluation}")
        checked += 1
    return checked, acted


def positions_of(ws, prompt, names):
    from persres.tokens import concept_span

    pipe = ws.pipeline()
    tokenizer = ws.family.region_tokenizer(pipe)
    out = {}
    for n in names:
        meta = ws.registry.get(n).meta
        out[n] = concept_span(tokenizer, prompt, meta.identifier, meta.class_word).positions
    return out


def test_two_full_loras_act_only_in_their_own_regions_on_every_layer_sd(ws, tmp_path, monkeypatch):
    _, a = import_random(ws, tmp_path, "a", where=NOT_TIME, seed=0)
    _, b = import_random(ws, tmp_path, "b", "diffusers", where=NOT_TIME, seed=1, class_word="cat")
    prompt = "a sks dog and a zqv cat"
    calls, evaluations = lag_trace(ws, prompt, ["a", "b"], {"b": 0.7}, steps=3, monkeypatch=monkeypatch)
    assert evaluations == 3  # one UNet evaluation per step (the guidance halves are one batch)
    kinds = {layers.kind(f"unet.{path}") for path, *_ in calls}
    assert {"self-attention", "cross-attention q/out", "cross-attention k/v", "feed-forward", "resnet", "proj_in", "proj_out"} <= kinds
    checked, acted = check_every_layer(ws, calls, {"a": a, "b": b}, {"b": 0.7}, positions_of(ws, prompt, ["a", "b"]))
    assert checked == len(calls) > 0 and acted > 0


def test_text_encoder_layers_change_only_their_own_tokens_under_lag(ws, tmp_path):
    from persres.sample import concept_tokens

    import_random(ws, tmp_path, "a", where=lambda k: k.startswith("text_encoder."), seed=0)
    import_random(ws, tmp_path, "b", where=lambda k: k.startswith("text_encoder."), seed=1, class_word="cat")
    pipe = ws.pipeline()
    bound = ws.apply_concepts(["a", "b"])
    prompt = "a sks dog and a zqv cat"
    tokens = concept_tokens(pipe.tokenizer, prompt, bound)
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    te = torch.nn.ModuleList([pipe.text_encoder])

    def encode(names):
        with residuals.use_concepts(te, names, merged=False):
            return pipe.text_encoder(ids)[0]

    base, own_a, own_b = encode([]), encode(["a"]), encode(["b"])
    with residuals.use_concepts(te, ["a", "b"], merged=False), layers.OwnTokenEncodings(pipe, tokens, prompt):
        spliced = pipe.text_encoder(ids)[0]
        negative = pipe.text_encoder(pipe.tokenizer("", padding="max_length", max_length=ids.shape[1], return_tensors="pt").input_ids)[0]
    a_rows, b_rows = list(tokens[0].positions), list(tokens[1].positions)
    torch.testing.assert_close(spliced[0, a_rows], own_a[0, a_rows])
    torch.testing.assert_close(spliced[0, b_rows], own_b[0, b_rows])
    rest = [i for i in range(ids.shape[1]) if i not in a_rows + b_rows]
    torch.testing.assert_close(spliced[0, rest], base[0, rest])
    assert not torch.allclose(own_a[0, a_rows], base[0, a_rows])  # the LoRA does change its tokens
    with residuals.use_concepts(te, [], merged=False):
        torch.testing.assert_close(negative, pipe.text_encoder(pipe.tokenizer("", padding="max_length", max_length=ids.shape[1],
                                                                                  return_tensors="pt").input_ids)[0])


def test_a_style_marked_everywhere_acts_at_every_position_and_needs_no_place_in_the_prompt(ws, tmp_path, monkeypatch):
    _, a = import_random(ws, tmp_path, "a", where=ATTENTION_AND_FF, seed=0)
    path = tmp_path / "style.safetensors"
    style = random_lora(ws.pipeline(), path, where=ATTENTION_AND_FF, seed=2)
    record = ws.import_concept(path, "style", class_word="painting", identifier="ohwx", everywhere=True)
    assert record.meta.everywhere and ws.registry.get("style").meta.everywhere
    calls, _ = lag_trace(ws, "a sks dog on grass", ["a", "style"], steps=2, monkeypatch=monkeypatch)
    style_masks = [masks["style"] for *_, masks, _ in calls if "style" in masks]
    assert style_masks and all(m is EVERYWHERE for m in style_masks)
    check_every_layer(ws, calls, {"a": a, "style": style}, {}, positions_of(ws, "a sks dog on grass", ["a"]))


def test_show_names_the_layer_kinds_a_lora_holds(ws, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from persres.cli import app

    import_random(ws, tmp_path, "full", where=NOT_TIME)
    result = CliRunner().invoke(app, ["show", "full"])
    assert result.exit_code == 0, result.output
    for kind in ("self-attention", "feed-forward", "resnet", "text encoder"):
        assert kind in result.output


# --- SDXL and FLUX.1 ---------------------------------------------------------------------------------


def test_sdxl_full_loras_in_the_original_layout_under_lag(tiny_xl_model, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSRES_HOME", str(tmp_path / "home"))
    ws = Workspace(str(tiny_xl_model))
    _, a = import_random(ws, tmp_path, "a", where=NOT_TIME, seed=0, layout="original")
    _, b = import_random(ws, tmp_path, "b", "diffusers", where=NOT_TIME, seed=1, class_word="cat")
    assert any(k.startswith("text_encoder_2.") for k in ws.registry.get("a").meta.layers)
    for fmt in ("kohya", "diffusers"):
        out = ws.export("a", tmp_path / f"a.{fmt}.safetensors", fmt)
        ws.import_concept(out, f"a_{fmt}")
        assert all(torch.equal(x, pack_deltas(ws, f"a_{fmt}")[k]) for k, x in pack_deltas(ws, "a").items())
        ws.registry.remove(f"a_{fmt}")
    prompt = "a sks dog and a zqv cat"
    calls, evaluations = lag_trace(ws, prompt, ["a", "b"], steps=2, monkeypatch=monkeypatch)
    assert evaluations == 2
    checked, acted = check_every_layer(ws, calls, {"a": a, "b": b}, {}, positions_of(ws, prompt, ["a", "b"]))
    assert checked == len(calls) and acted > 0


def test_flux_full_loras_kohya_fused_and_peft_under_lag(tiny_flux, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSRES_HOME", str(tmp_path / "home"))
    ws = Workspace(str(tiny_flux))
    ws.pipeline(precision="fp32")  # the recomputation compares at fp32 tolerance
    transformer_only = lambda k: k.startswith("transformer.") and "time_text_embed" not in k and "norm" not in k  # noqa: E731
    _, a = import_random(ws, tmp_path, "a", where=transformer_only, seed=0, layout="original")
    _, b = import_random(ws, tmp_path, "b", "diffusers", where=transformer_only, seed=1, class_word="cat")
    assert set(ws.registry.get("a").meta.layers) == set(a)  # the fused q/k/v and MLP-input layers split back
    for fmt in ("kohya", "diffusers"):
        out = ws.export("a", tmp_path / f"a.{fmt}.safetensors", fmt)
        ws.import_concept(out, f"a_{fmt}")
        got = pack_deltas(ws, f"a_{fmt}")
        for k, x in pack_deltas(ws, "a").items():
            torch.testing.assert_close(got[k], x, rtol=1e-6, atol=1e-8)
        ws.registry.remove(f"a_{fmt}")
    prompt = "a sks dog and a zqv cat"
    calls, evaluations = lag_trace(ws, prompt, ["a", "b"], steps=2, monkeypatch=monkeypatch)
    assert evaluations == 2
    kinds = {layers.kind(f"transformer.{path}") for path, *_ in calls}
    assert {"joint attention", "joint attention (text)", "feed-forward", "feed-forward (text)", "proj_out"} <= kinds
    checked, acted = check_every_layer(ws, calls, {"a": a, "b": b}, {}, positions_of(ws, prompt, ["a", "b"]))
    assert checked == len(calls) and acted > 0


def test_a_pack_with_layers_is_format_3_and_a_forged_format_2_claim_is_refused(ws, tmp_path):
    from safetensors import safe_open

    from persres.packs import VERSION_KEY, read_pack

    record, _ = import_random(ws, tmp_path, "a", where=ATTENTION_AND_FF)
    with safe_open(str(record.path), framework="pt") as f:
        metadata = dict(f.metadata())
    assert metadata[VERSION_KEY] == "3"
    tensors = load_file(str(record.path))
    forged = tmp_path / "forged.safetensors"
    save_file(tensors, str(forged), metadata={**metadata, VERSION_KEY: "2"})
    with pytest.raises(PackError, match="claims pack format 2"):
        read_pack(forged)
