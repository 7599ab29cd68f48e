"""Inside ComfyUI: what two and four LoRAs in their own regions cost per KSampler step.

    python -m benchmarks.comfyui_cost --side 128 --steps 4 --repeats 2 --json benchmarks/results/cpu-comfyui_cost-128.json

ComfyUI's core (`../shared/comfyui` or COMFYUI_PATH) loads SD v1.4's UNet architecture with random
weights (the cost, not the picture) as an SD 1.5 model; KSampler, euler, `--steps` steps, CFG 6.
LoRAs as kohya's default LoRA trains them (rank 16 on every transformer block's attention, feed-forward,
proj_in and proj_out). Ways, each for two and for four LoRAs:
- `lag`: persres's nodes (`persres.comfyui.apply.lag_model`): every LoRA in its own automatic region,
  one UNet evaluation per step;
- `hooks`: ComfyUI's own masked LoRA hooks (`comfy.hooks.create_hook_lora` on a conditioning with a
  fixed mask per LoRA, as its CreateHookLora / SetMaskedConditioning nodes do): regions drawn by hand,
  one evaluation per hook group;
- `plain`: the same sampler on the untouched model.
Per-step time: KSampler's sampling over the steps (the text encoder is not run: the conditioning is
made directly). Each run follows a plain run of its own; its ratio to that run is its cost, the median
over --repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine

KOHYA_DEFAULT = (".attn1.", ".attn2.", ".ff.", ".proj_in", ".proj_out")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from persres.testing import sd14_random_pipeline
    from persres.testing.comfyui import comfyui_path, start
    from persres.testing.loras import random_lora

    root = comfyui_path()
    if root is None:
        raise SystemExit("ComfyUI's core is not here: set COMFYUI_PATH")
    tmp = Path(tempfile.mkdtemp())
    comfy = start(root, tmp)
    from comfy.sd import load_diffusion_model_state_dict
    from safetensors.torch import load_file

    pipe = sd14_random_pipeline()
    where = lambda key: key.startswith("unet.") and any(s in key for s in KOHYA_DEFAULT)  # noqa: E731
    loras = []
    for i in range(4):
        path = tmp / f"lora{i}.safetensors"
        random_lora(pipe, path, where=where, rank=args.rank, seed=i, scale=0.02)
        loras.append(load_file(str(path)))
    model = load_diffusion_model_state_dict({k: v.clone() for k, v in pipe.unet.state_dict().items()})
    del pipe
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(1, 77, 768, generator=gen) * 0.5
    positive, negative = [[context, {}]], [[torch.zeros_like(context), {}]]
    latent = comfy.nodes.EmptyLatentImage().generate(args.side, args.side, 1)[0]

    def run(m, pos) -> float:
        evaluations.clear()
        start_time = time.perf_counter()
        comfy.nodes.KSampler().sample(m, 1, args.steps, 6.0, "euler", "normal", pos, negative, latent)
        return (time.perf_counter() - start_time) / args.steps

    evaluations: list[int] = []
    ways = {f"{way}-{n}": build(way, n, model, loras, positive, latent) for n in (2, 4) for way in ("lag", "hooks")}
    run(model, positive)  # warm-up: the first sampling loads the model
    rows = {}
    for name, (m, pos) in ways.items():
        counted = count_evaluations(m, evaluations)
        run(counted, pos)  # warm-up of this way
        ratios, seconds = [], []
        for _ in range(args.repeats):
            base = run(model, positive)
            own = run(counted, pos)
            ratios.append(own / base)
            seconds.append((own, base))
        rows[name] = {"ratio": statistics.median(ratios), "ratios": ratios,
                      "seconds_per_step": statistics.median(s for s, _ in seconds),
                      "plain_seconds_per_step": statistics.median(b for _, b in seconds),
                      "evaluations_per_step": len(evaluations) / args.steps}
        print(f"{name:8s} {rows[name]['ratio']:.2f}x plain  ({rows[name]['seconds_per_step']:.3f} s/step vs "
              f"{rows[name]['plain_seconds_per_step']:.3f}; {rows[name]['evaluations_per_step']:.1f} UNet evaluations/step)", flush=True)
    result = {"machine": machine(), "side": args.side, "steps": args.steps, "rank": args.rank, "repeats": args.repeats,
              "layers_per_lora": len({k.split(".")[0] for k in loras[0]}), "ways": rows,
              "command": "python -m benchmarks.comfyui_cost " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def build(way: str, n: int, model, loras, positive, latent):
    """(model, positive conditioning) of one way with the first n LoRAs."""
    import comfy.hooks
    from comfy.lora import model_lora_keys_unet

    from persres.comfyui.apply import lag_model, lora_patches
    from persres.comfyui.concepts import Concept
    from persres.lag import ConceptTokens
    from persres.tokens import BoundConcept

    if way == "lag":
        concepts = [Concept(BoundConcept(f"lora{i}", f"w{i}", ""), loras[i], None, f"lora{i}") for i in range(n)]
        keys = model_lora_keys_unet(model.model, {})
        tokens = [ConceptTokens(f"lora{i}", (2 + 2 * i, 3 + 2 * i), (3 + 2 * i,)) for i in range(n)]
        return lag_model(model, concepts, [lora_patches(c, keys, {})[0] for c in concepts], tokens), positive
    h, w = latent["samples"].shape[-2:]
    conds = []
    for i in range(n):  # vertical stripes, one per LoRA: the regions a user would draw
        mask = torch.zeros(1, h, w)
        mask[:, :, i * w // n : (i + 1) * w // n] = 1
        hooks = comfy.hooks.create_hook_lora(loras[i], strength_model=1.0, strength_clip=1.0)
        conds += comfy.hooks.set_conds_props([positive], strength=1.0, set_cond_area="default", mask=mask, hooks=hooks)[0]
    return model, conds


def count_evaluations(model, evaluations: list):
    """A clone whose every UNet evaluation is counted."""
    from comfy.patcher_extension import WrappersMP

    def counted(executor, *args, **kwargs):
        evaluations.append(1)
        return executor(*args, **kwargs)

    clone = model.clone()
    clone.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "benchmark", counted)
    return clone


if __name__ == "__main__":
    main()
