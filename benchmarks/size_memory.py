"""Peak memory of one UNet pass by image size, beside `persres.sizes`'s estimate.

    OMP_NUM_THREADS=1 python -m benchmarks.size_memory --json benchmarks/results/cpu-size_memory.json

For each size, the toy model's UNet (fp32) runs one training pass (batch 4, gradients through
every block to the proj_out parameters, as residual training does) and one sampling pass (one
image with its CFG half: 2 latents), in a fresh process each, and the rise of peak memory
over the loaded model is set beside `sizes.needed_bytes`. The fit of `TRAIN_BYTES` and
`GEN_BYTES` is the measured rise divided by latent pixels x latents x the UNet's width.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks.common import machine


def one(kind: str, side: int) -> dict:
    import torch

    from benchmarks.common import peak_memory_mb, reset_peak_memory
    from persres import sizes
    from persres.models import load_pipeline

    torch.set_num_threads(1)
    pipe = load_pipeline("toy", "cpu", torch.float32)
    unet, latents = pipe.unet, 4 if kind == "train" else 2
    lat = side // pipe.vae_scale_factor
    x = torch.randn(latents, 4, lat, lat)
    emb = torch.randn(latents, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)
    t = torch.full((latents,), 500)
    unet.requires_grad_(False)
    reset_peak_memory("cpu")
    before = peak_memory_mb("cpu")
    if kind == "train":
        for name, p in unet.named_parameters():
            p.requires_grad_("proj_out" in name)
        unet(x, t, encoder_hidden_states=emb).sample.square().mean().backward()
    else:
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=emb)
    rise = (peak_memory_mb("cpu") - before) * 2**20
    estimate = sizes.needed_bytes(pipe, side, side, latents, training=kind == "train")
    fitted = rise / (lat * lat * latents * sizes.unet_width(pipe.unet.config))
    return {"kind": kind, "side": side, "latents": latents, "measured_mb": round(rise / 2**20, 1),
            "estimate_mb": round(estimate / 2**20, 1), "bytes_per_unit": round(fitted, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", default="64,128,256")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--one", nargs=2, metavar=("KIND", "SIDE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return
    rows = []
    for kind in ("train", "gen"):
        for side in map(int, args.sides.split(",")):
            out = subprocess.run([sys.executable, "-m", "benchmarks.size_memory", "--one", kind, str(side)],
                                 capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    report = {"machine": machine(), "model": "toy", "precision": "fp32", "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
