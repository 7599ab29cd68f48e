"""ComfyUI run headless in this process, for testing and benchmarking persres's nodes against it.

    comfy = start(comfyui_path(), base_dir)          # ComfyUI's modules, imported once per process
    diffusers_dir, checkpoint = build_checkpoint(folder)
    ok, messages = run_prompt(comfy, workflow)       # ComfyUI's own PromptExecutor

What running it here needs (see `../shared/comfyui/README-persres.md`): a stand-in for torchvision
(imported at module level by model files the SD paths never call; no CPU wheel matches torch here),
`args.cpu` before `comfy.model_management` is imported, and a base directory of our own for
`models/`, `input/`, `output/`.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
import types
import uuid
from pathlib import Path

import torch


def comfyui_path() -> Path | None:
    """ComfyUI's core: `COMFYUI_PATH`, else the trimmed copy beside this checkout (`../shared/comfyui`)."""
    env = os.environ.get("COMFYUI_PATH")
    candidates = [Path(env)] if env else [Path(__file__).resolve().parents[2].parent / "shared" / "comfyui"]
    return next((p for p in candidates if (p / "comfy").is_dir() and (p / "nodes.py").is_file()), None)


def _stand_in(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


def start(root: Path, base_dir: Path) -> types.SimpleNamespace:
    """Import ComfyUI from `root` with its models, input and output under `base_dir` (once per process)."""
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        import diffusers.utils.import_utils  # noqa: F401  (says at import that torchvision is absent: it stays so)
        import transformers.utils.import_utils as transformers_imports

        transformers_imports.is_torchvision_available()  # cached: absent
        vision = _stand_in("torchvision")
        vision.transforms = _stand_in("torchvision.transforms")
        sys.modules.update({"torchvision": vision, "torchvision.transforms": vision.transforms})
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    if "comfy.model_management" not in sys.modules:
        args.cpu = True
        args.base_directory = str(base_dir)
    import execution
    import folder_paths
    import nodes

    return types.SimpleNamespace(nodes=nodes, execution=execution, folder_paths=folder_paths, args=args,
                                 base=Path(folder_paths.base_path))


class Server:
    """What ComfyUI's executor reports to: kept, not sent."""

    def __init__(self):
        self.client_id, self.last_node_id, self.last_prompt_id = None, None, None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


def run_prompt(comfy, prompt: dict) -> tuple[bool, list[tuple[str, dict]]]:
    """Validate and execute an API-format workflow as ComfyUI's server does: (ran, the executor's messages).
    A prompt that fails validation does not run; its errors come back as one "validation" message."""
    import asyncio

    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(comfy.execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        return False, [("validation", {"error": valid[1], "node_errors": valid[3]})]
    executor = comfy.execution.PromptExecutor(Server())
    executor.execute(prompt, prompt_id, {}, valid[2])
    return executor.success, executor.status_messages


def rounded_to_fp16(*modules: torch.nn.Module) -> None:
    """Round every weight to what fp16 holds (kept in fp32): both sides of a comparison load the same numbers."""
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.copy_(p.half().float())


def build_checkpoint(folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """A small model ComfyUI detects as SD 1.5 (320 channels, context 768, 1x1 proj_out: two levels of
    one cross-attention block each), with SD's full-size CLIP ViT-L text encoder and VAE, random weights
    rounded to fp16: (a diffusers directory, the same weights as one original-layout .safetensors)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from persres.testing import SD14_TEXT_CONFIG, SD14_VAE_CONFIG, original_layout, sd_scheduler

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(320, 320), layers_per_block=1, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
    tokenizer = CLIPTokenizer.from_pretrained(comfyui_path() / "comfy" / "sd1_tokenizer", model_max_length=77)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **{**SD14_TEXT_CONFIG, **ids}))
    vae = AutoencoderKL(**SD14_VAE_CONFIG)
    rounded_to_fp16(unet, text_encoder, vae)  # what the fp16 file holds, on both sides
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=sd_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "diffusers")
    checkpoint = folder / "tiny-sd15.safetensors"
    save_file({k: v.half().contiguous() for k, v in original_layout(pipe).items()}, str(checkpoint))
    return folder / "diffusers", checkpoint


def build_sdxl_distilled(folder: str | Path, seed: int = 0) -> Path:
    """A diffusers SDXL directory whose UNet has KOALA-700M's shape (SDXL's channels, context and size
    conditioning; one res block per level, 2 and 5 transformer layers per block, no middle block), which
    ComfyUI detects as an SDXL-family model; one-layer text encoders of SDXL's widths, random weights
    rounded to fp16. ComfyUI loads its UNet alone (`comfy.sd.load_diffusion_model_state_dict`)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from persres.testing import SD14_TEXT_CONFIG, sd_scheduler, tiny_vae

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(320, 640, 1280), layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), mid_block_type=None,
        transformer_layers_per_block=(1, 2, 5), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        cross_attention_dim=2048)
    tokenizer = CLIPTokenizer.from_pretrained(comfyui_path() / "comfy" / "sd1_tokenizer", model_max_length=77)
    text = {**SD14_TEXT_CONFIG, "num_hidden_layers": 1, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer)}
    text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**text, "hidden_size": 1280, "intermediate_size": 5120,
                                                                   "num_attention_heads": 20, "projection_dim": 1280}))
    rounded_to_fp16(unet, text_encoder, text_encoder_2)
    pipe = StableDiffusionXLPipeline(unet=unet, vae=tiny_vae(seed), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=sd_scheduler(), add_watermarker=False)
    pipe.save_pretrained(Path(folder))
    return Path(folder)
