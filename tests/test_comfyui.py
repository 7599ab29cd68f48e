"""persres's ComfyUI nodes, run inside ComfyUI's own core (`../shared/comfyui` or COMFYUI_PATH).

A small SD1.5-layout checkpoint (full-size CLIP ViT-L and VAE, random weights) is loaded by both
sides: ComfyUI's CheckpointLoaderSimple, and persres from the same weights in diffusers form.
Concepts: "rex" (a proj_out LoRA imported into the registry: a persres pack), "toycat" (a kohya
LoRA of every attention and feed-forward layer, trigger words "zwx cat", in ComfyUI's loras folder;
imported into the registry too as "toycat-imported", persres's own reading of the same file).
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from persres.testing.comfyui import build_checkpoint, comfyui_path, run_prompt, start

COMFY = comfyui_path()
pytestmark = pytest.mark.skipif(COMFY is None, reason="ComfyUI's core is not here (../shared/comfyui, or set COMFYUI_PATH)")

PROMPT = "a photo of V1 dog and V2 cat"
CONCEPTS = "rex, toycat:0.8"


def attention_and_ff(key: str) -> bool:
    return key.startswith("unet.") and ".transformer_blocks." in key


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """ComfyUI with persres's nodes installed by `persres comfyui install` and loaded by ComfyUI's own loader,
    the checkpoint in its checkpoints folder, two concepts, and the persres workspace of the same weights."""
    from typer.testing import CliRunner

    from persres.cli import app
    from persres.testing.loras import random_lora
    from persres.workspace import Workspace

    base = tmp_path_factory.mktemp("comfyui")
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PERSRES_HOME", str(home))
        c = start(COMFY, base)
        install_root = tmp_path_factory.mktemp("ComfyUI")
        (install_root / "comfy").symlink_to(COMFY / "comfy")
        (install_root / "nodes.py").symlink_to(COMFY / "nodes.py")
        result = CliRunner().invoke(app, ["comfyui", "install", str(install_root)])
        assert result.exit_code == 0, result.output
        assert asyncio.run(c.nodes.load_custom_node(str(install_root / "custom_nodes" / "persres")))
        diffusers_dir, checkpoint = build_checkpoint(tmp_path_factory.mktemp("model"))
        for folder in ("checkpoints", "loras"):
            (c.base / "models" / folder).mkdir(parents=True, exist_ok=True)
        checkpoint.rename(c.base / "models" / "checkpoints" / checkpoint.name)
        c.ws = Workspace(str(diffusers_dir), precision="fp32")
        pipe = c.ws.pipeline()
        random_lora(pipe, base / "rex.safetensors", where=lambda k: k.startswith("unet.") and k.endswith("proj_out"), seed=1, scale=0.3)
        c.ws.import_concept(base / "rex.safetensors", name="rex", class_word="dog", identifier="sks")
        toycat = c.base / "models" / "loras" / "toycat.safetensors"
        random_lora(pipe, toycat, where=attention_and_ff, seed=2, scale=0.2, metadata={"modelspec.trigger_phrase": "zwx cat"})
        c.ws.import_concept(toycat, name="toycat-imported", identifier="zwx")  # persres's own reading of the same file
        c.install_root, c.checkpoint, c.home = install_root, checkpoint.name, home
        yield c


@pytest.fixture(autouse=True)
def module_home(request, monkeypatch):
    """The nodes read the registry PERSRES_HOME names: this module's, where its concepts are."""
    if "comfy" in request.fixturenames:
        monkeypatch.setenv("PERSRES_HOME", str(request.getfixturevalue("comfy").home))


def test_the_nodes_load_through_comfyuis_own_loader(comfy):
    from persres.comfyui.install import workflows

    assert {"PersresConcepts", "PersresRegions"} <= set(comfy.nodes.NODE_CLASS_MAPPINGS)
    assert comfy.nodes.NODE_CLASS_MAPPINGS["PersresConcepts"].RELATIVE_PYTHON_MODULE == "custom_nodes.persres"
    shipped = comfy.install_root / "custom_nodes" / "persres" / "example_workflows"
    assert sorted(p.name for p in shipped.iterdir()) == sorted(workflows())


def checkpoint_model(comfy):
    return comfy.nodes.CheckpointLoaderSimple().load_checkpoint(comfy.checkpoint)[:2]


def sample(comfy, model, positive, clip, steps=4, seed=1, cfg=5.0, sampler="euler"):
    (negative,) = comfy.nodes.CLIPTextEncode().encode(clip, "")
    (latent,) = comfy.nodes.EmptyLatentImage().generate(64, 64, 1)
    (out,) = comfy.nodes.KSampler().sample(model, seed, steps, cfg, sampler, "normal", positive, negative, latent)
    return out["samples"]


class Recorder:
    """A diffusion-model wrapper that keeps what each evaluation got and gave."""

    def __init__(self):
        self.calls = []

    def __call__(self, executor, x, timesteps, context, y, *args, **kwargs):
        out = executor(x, timesteps, context, y, *args, **kwargs)
        options = kwargs.get("transformer_options", args[1] if len(args) > 1 else {})
        self.calls.append((x.clone(), timesteps.clone(), context.clone(), list(options["cond_or_uncond"]), out.clone(),
                           None if y is None else y.clone()))
        return out


def test_each_evaluation_equals_persress_own_lag_evaluation(comfy):
    """The same checkpoint, latents, timesteps, conditioning and concepts: the node's UNet output and
    regions equal persres's LAG evaluation (fp32 tolerance), one evaluation per step."""
    from comfy.patcher_extension import WrappersMP

    from persres import layers, residuals
    from persres.comfyui.apply import ComfyTokens, apply_concepts, regions
    from persres.lag import lag_regions
    from persres.sample import concept_tokens

    model, clip = checkpoint_model(comfy)
    patched, positive = apply_concepts(model, clip, PROMPT, CONCEPTS, lag=True)
    recorder = Recorder()
    patched.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test", recorder)
    sample(comfy, patched, positive, clip, steps=4)
    assert len(recorder.calls) == 4 and all(c[3] == [1, 0] for c in recorder.calls)  # one evaluation per step, [uncond, cond]

    pipe = comfy.ws.pipeline()
    names = ["rex", "toycat-imported"]
    comfy.ws.apply_concepts(names)
    prompt = PROMPT.replace("V1", "sks").replace("V2", "zwx")
    bound = [comfy.ws.registry.get(n).bound() for n in names]
    tokens = concept_tokens(pipe.tokenizer, prompt, bound)
    assert [t.positions for t in tokens] == [t.positions for t in concept_tokens(ComfyTokens(clip, prompt), prompt, bound)]
    changed = torch.nn.ModuleList(layers.components(pipe).values())
    with torch.no_grad(), residuals.use_concepts(changed, names, merged=False, strengths={"toycat-imported": 0.8}), \
            lag_regions(pipe.unet, tokens, guided=True, latent_hw=(8, 8), keep_masks=True, steps=4) as session:
        for x, t, context, _, out, _ in recorder.calls:
            ours = pipe.unet(x, t, encoder_hidden_states=context).sample
            torch.testing.assert_close(out, ours, rtol=1e-4, atol=1e-4)
    theirs = list(regions(patched).values())
    mine = [session.average_masks()[n] for n in names]
    assert len(theirs) == 2 and all(torch.equal(a, b) for a, b in zip(theirs, mine))
    assert 0 < float(mine[0].mean()) < 1 and not torch.equal(mine[0], mine[1])  # two regions, not everywhere


def workflow(name: str, comfy, **inputs) -> dict:
    """A shipped example workflow with this test's checkpoint and concepts, and a small image."""
    from persres.comfyui.install import workflows

    prompt = json.loads(workflows()[name])
    for node in prompt.values():
        kind, given = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            given["ckpt_name"] = comfy.checkpoint
        elif kind == "EmptyLatentImage":
            given.update(width=64, height=64)
        elif kind == "KSampler":
            given["steps"] = 3
        elif kind == "PersresConcepts":
            given.update(inputs)
    return prompt


@pytest.mark.parametrize("name, concepts", [("persres-one-concept.json", "rex"), ("persres-two-concepts.json", CONCEPTS)])
def test_the_example_workflows_run_in_comfyuis_executor_and_write_images(comfy, name, concepts):
    before = set((comfy.base / "output").glob("*.png")) if (comfy.base / "output").is_dir() else set()
    ok, messages = run_prompt(comfy, workflow(name, comfy, concepts=concepts))
    assert ok, [m for m in messages if m[0] == "execution_error"]
    written = set((comfy.base / "output").glob("*.png")) - before
    assert len(written) == sum(node["class_type"] == "SaveImage" for node in workflow(name, comfy).values())


def test_the_patch_is_gone_after_sampling(comfy):
    """The checkpoint's own model samples exactly as before once the concepts' clone has sampled."""
    from persres.comfyui.apply import apply_concepts
    from persres.comfyui.patch import LagForward

    model, clip = checkpoint_model(comfy)
    (positive,) = comfy.nodes.CLIPTextEncode().encode(clip, "a photo of sks dog and zwx cat")
    before = sample(comfy, model, positive, clip)
    patched, positive_bound = apply_concepts(model, clip, PROMPT, CONCEPTS, lag=True)
    with_concepts = sample(comfy, patched, positive_bound, clip)
    assert not torch.allclose(with_concepts, before, atol=1e-3)
    after = sample(comfy, model, positive, clip)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    modules = dict(model.model.named_modules())
    assert not any(isinstance(getattr(m, "forward", None), LagForward) for m in modules.values())
    assert "patches_replace" not in model.model_options["transformer_options"]


def test_another_node_packs_attn2_replacement_is_chained(comfy):
    from comfy.ldm.modules.attention import optimized_attention

    from persres.comfyui.apply import apply_concepts, transformers

    model, clip = checkpoint_model(comfy)
    calls = []

    def theirs(q, k, v, extra_options):
        calls.append(extra_options["block"])
        return optimized_attention(q, k, v, extra_options["n_heads"]) * 0.5

    other = model.clone()
    (kind, number), _ = next(iter(transformers(model).items()))
    other.set_model_attn2_replace(theirs, kind, number)
    patched, positive = apply_concepts(other, clip, PROMPT, CONCEPTS, lag=True)
    alone, _ = apply_concepts(model, clip, PROMPT, CONCEPTS, lag=True)
    assert not torch.allclose(sample(comfy, patched, positive, clip), sample(comfy, alone, positive, clip), atol=1e-3)
    assert len(calls) == 4  # their replacement ran in every evaluation, under ours


def test_lag_off_is_comfyuis_own_lora_loading(comfy):
    """Without LAG a concept file acts everywhere, exactly as ComfyUI's LoraLoader applies it."""
    from persres.comfyui.apply import apply_concepts

    model, clip = checkpoint_model(comfy)
    patched, positive = apply_concepts(model, clip, "a photo of zwx cat", "toycat:0.8", lag=False)
    loaded, loaded_clip = comfy.nodes.LoraLoader().load_lora(model, clip, "toycat.safetensors", 0.8, 0.8)
    (plain,) = comfy.nodes.CLIPTextEncode().encode(loaded_clip, "a photo of zwx cat")
    torch.testing.assert_close(positive[0][0], plain[0][0])
    torch.testing.assert_close(sample(comfy, patched, positive, clip), sample(comfy, loaded, plain, clip), rtol=0, atol=0)


@pytest.mark.parametrize("text, concepts, said", [
    (PROMPT, "rex,,toycat", "has an empty entry"),
    (PROMPT, "rex, nosuch", "unknown concept 'nosuch'"),
    (PROMPT, "rex:9, toycat", "strength of 'rex' must be a number from 0 to 2"),
    ("a photo of V3 dog", CONCEPTS, "V3 is not bound"),
    ("a photo of a dog", "rex", "concept 'rex' is not in the prompt"),
])
def test_bad_input_is_refused_in_one_line_before_anything_runs(comfy, text, concepts, said):
    ok, messages = run_prompt(comfy, workflow("persres-two-concepts.json", comfy, text=text, concepts=concepts))
    assert not ok and [m[0] for m in messages] == ["validation"]
    errors = [e for node in messages[0][1]["node_errors"].values() for e in node["errors"]]
    assert errors and all(e["type"] == "custom_validation_failed" for e in errors)
    assert all(said in e["details"] and "\n" not in e["details"] for e in errors)


def test_a_concept_of_another_family_fails_in_one_line_and_the_registry_is_kept(comfy, tmp_path):
    from persres.testing import build_tiny_xl_pipeline
    from persres.testing.loras import random_lora
    from persres.workspace import Workspace

    xl = Workspace(str(build_tiny_xl_pipeline(tmp_path / "xl")), home=comfy.home, precision="fp32")
    random_lora(xl.pipeline(), tmp_path / "xl.safetensors", where=lambda k: k.startswith("unet.") and k.endswith("proj_out"))
    xl.import_concept(tmp_path / "xl.safetensors", name="xlthing", class_word="robot", identifier="pmj")
    names = comfy.ws.registry.names()
    ok, messages = run_prompt(comfy, workflow("persres-one-concept.json", comfy, text="a pmj robot", concepts="xlthing"))
    assert not ok
    error = next(data for kind, data in messages if kind == "execution_error")
    assert error["exception_type"] == "persres.errors.IncompatiblePack"
    assert error["exception_message"].strip() == "persres concept 'xlthing' was made for SDXL; this model is SD 1.x"
    assert comfy.ws.registry.names() == names and xl.registry.get("xlthing").meta.family == "sdxl"


def test_sdxl_blocks_of_several_layers_equal_persress_own_lag_evaluation(comfy, tmp_path):
    """An SDXL-family UNet (2 and 5 transformer layers per block, Linear proj_out, size conditioning):
    ComfyUI's evaluation with LAG equals persres's, at every step; masks equal."""
    from comfy.patcher_extension import WrappersMP
    from comfy.sd import load_diffusion_model_state_dict

    from persres import residuals
    from persres.comfyui.apply import check_family, family_of, lag_model, lora_patches, sources
    from persres.lag import ConceptTokens, lag_regions
    from persres.testing.comfyui import build_sdxl_distilled
    from persres.testing.loras import random_lora
    from persres.workspace import Workspace

    xl = Workspace(str(build_sdxl_distilled(tmp_path / "xl")), precision="fp32")
    pipe = xl.pipeline()
    files = {"xlrex": ("proj_out", "sks dog"), "xlcat": ("transformer_blocks", "zwx cat")}
    for seed, (name, (part, trigger)) in enumerate(files.items()):
        path = comfy.base / "models" / "loras" / f"{name}.safetensors"
        random_lora(pipe, path, where=lambda k: k.startswith("unet.") and part in k, seed=seed, scale=0.2, layout="original",
                    metadata={"modelspec.trigger_phrase": trigger})
        xl.import_concept(path, name=f"{name}-imported", identifier=trigger.split()[0])
    model = load_diffusion_model_state_dict({k: v.clone() for k, v in pipe.unet.state_dict().items()})
    tokens = [ConceptTokens("xlrex", (4, 5), (5,)), ConceptTokens("xlcat", (7, 8), (8,))]
    found = sources()
    loaded = [found.concept(found.bound(name)) for name in files]
    check_family(loaded, family_of(model))
    patched = lag_model(model, loaded, [lora_patches(c, comfy_keys(model), {})[0] for c in loaded], tokens)
    recorder = Recorder()
    patched.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test", recorder)
    gen = torch.Generator().manual_seed(0)
    conds = [[[torch.randn(1, 77, 2048, generator=gen), {"pooled_output": torch.randn(1, 1280, generator=gen)}]] for _ in range(2)]
    (latent,) = comfy.nodes.EmptyLatentImage().generate(64, 64, 1)
    comfy.nodes.KSampler().sample(patched, 1, 3, 5.0, "euler", "normal", conds[0], conds[1], latent)
    assert len(recorder.calls) == 3

    names = [f"{n}-imported" for n in files]
    xl.apply_concepts(names)
    pipe.unet.add_time_proj = torch.nn.Identity()  # ComfyUI hands over the size embedding already made: y = [pooled, sizes]
    renamed = [ConceptTokens(n, t.positions, t.class_positions) for n, t in zip(names, tokens)]
    with torch.no_grad(), residuals.use_concepts(pipe.unet, names, merged=False), \
            lag_regions(pipe.unet, renamed, guided=True, latent_hw=(8, 8), keep_masks=True, steps=3) as session:
        for x, t, context, _, out, y in recorder.calls:
            added = {"text_embeds": y[:, :1280], "time_ids": y[:, 1280:]}
            ours = pipe.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
            torch.testing.assert_close(out, ours, rtol=1e-4, atol=1e-4)
    theirs = list(patched.get_attachment("persres").masks.values())
    assert all(torch.equal(a, session.average_masks()[n]) for a, n in zip(theirs, names))


def comfy_keys(model):
    from comfy.lora import model_lora_keys_unet

    return model_lora_keys_unet(model.model, {})


def test_a_text_encoder_lora_changes_only_its_own_tokens_as_in_persres(comfy):
    """A LoRA with text-encoder layers: under LAG the prompt's encoding is the base one except at the
    concept's own tokens, which are the LoRA's encoding there, as persres's own sampling encodes it."""
    from persres import families, layers, residuals
    from persres.comfyui.apply import ComfyTokens, apply_concepts
    from persres.sample import concept_tokens
    from persres.testing.loras import random_lora
    from persres.tokens import BoundConcept

    path = comfy.base / "models" / "loras" / "tebird.safetensors"
    if not path.exists():
        random_lora(comfy.ws.pipeline(), path, where=lambda k: k.startswith("text_encoder.") or k.endswith("attn2.to_k"),
                    seed=3, scale=0.3, metadata={"modelspec.trigger_phrase": "qrv bird"})
        comfy.ws.import_concept(path, name="tebird-imported", identifier="qrv")
    model, clip = checkpoint_model(comfy)
    prompt = "a photo of qrv bird and zwx cat"
    _, positive = apply_concepts(model, clip, "a photo of V1 bird and V2 cat", "tebird, toycat", lag=True)
    cond = positive[0][0]
    (base,) = comfy.nodes.CLIPTextEncode().encode(clip, prompt)
    _, lora_clip = comfy.nodes.LoraLoader().load_lora(model, clip, "tebird.safetensors", 0.0, 1.0)
    (own,) = comfy.nodes.CLIPTextEncode().encode(lora_clip, prompt)
    mine = list(concept_tokens(ComfyTokens(clip, prompt), prompt, [BoundConcept("tebird", "qrv", "bird")])[0].positions)
    assert mine[0] == 4 and len(mine) >= 2  # "qrv bird" after [start, a, photo, of]
    others = [i for i in range(77) if i not in mine]
    torch.testing.assert_close(cond[0, mine], own[0][0][0, mine])
    torch.testing.assert_close(cond[0, others], base[0][0][0, others])
    assert not torch.allclose(own[0][0][0, mine], base[0][0][0, mine], atol=1e-3)

    pipe = comfy.ws.pipeline()
    names = ["tebird-imported", "toycat-imported"]
    comfy.ws.apply_concepts(names)
    tokens = concept_tokens(pipe.tokenizer, prompt, [comfy.ws.registry.get(n).bound() for n in names])
    assert list(tokens[0].positions) == mine
    changed = torch.nn.ModuleList(layers.components(pipe).values())
    with torch.no_grad(), residuals.use_concepts(changed, names, merged=False), layers.OwnTokenEncodings(pipe, tokens, prompt):
        ours = families.of(pipe).encode(pipe, prompt, (64, 64)).embedding
    torch.testing.assert_close(cond[0, others], ours[0, others], rtol=1e-4, atol=1e-4)
    # ComfyUI's LoRA-patched text-encoder weights differ from W + A B by fp16-sized rounding (2.4e-4 on these
    # weights, whose change is large: |A B| up to 0.8), which the twelve layers carry to the own rows
    torch.testing.assert_close(cond[0, mine], ours[0, mine], rtol=0, atol=2e-2)


def test_the_comfy_registry_reads_persress_project_entry(comfy):
    from pathlib import Path

    from comfy_config.config_parser import extract_node_configuration

    config = extract_node_configuration(str(Path(__file__).resolve().parents[1]))
    assert config.project.name == "persres" and config.tool_comfy.publisher_id == "persres"
    assert "LAG" in config.tool_comfy.display_name


def test_a_second_order_sampler_tells_each_evaluation_its_step(comfy):
    """heun evaluates twice a step (not on the last): LAG's step is the sampling step, under any schedule."""
    from comfy.patcher_extension import WrappersMP

    from persres.comfyui.apply import apply_concepts
    from persres.comfyui.patch import step_of

    model, clip = checkpoint_model(comfy)
    patched, positive = apply_concepts(model, clip, PROMPT, CONCEPTS, lag=True)
    told = []

    def steps(executor, *args, **kwargs):
        told.append((step_of(kwargs["transformer_options"] if "transformer_options" in kwargs else args[5]),
                     patched.get_attachment("persres").session.step))
        return executor(*args, **kwargs)

    patched.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test", steps)
    (negative,) = comfy.nodes.CLIPTextEncode().encode(clip, "")
    (latent,) = comfy.nodes.EmptyLatentImage().generate(64, 64, 1)
    comfy.nodes.KSampler().sample(patched, 1, 3, 5.0, "heun", "karras", positive, negative, latent)
    assert [t for t, _ in told] == [0, 1, 1, 2, 2]
    assert [s for _, s in told] == [0, 1, 1, 2, 2]  # the session was told each evaluation's step
