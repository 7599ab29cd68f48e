"""How well a toy model draws what its caption says, by the analytic checker.

    python -m persres.toy.quality --model persres/toy/model --samples 64

Samples single-object scenes from the training distribution ("seen") and from the
held-out (color, shape, background) triples, with DDIM (50 steps) and guidance 6, and
reports the fraction of pictures whose background, object color and shape are right.
`--fillers first|rest` puts an identifier in front of every caption ("a sks red circle ..."),
drawn from the first 24 identifiers (trained with the model) or from the rest (added by
`persres.toy.identifiers`): a filler identifier should leave these fractions as they are.
"""

from __future__ import annotations

import argparse
import json
import random

from persres.toy import checker, world


FIRST_IDENTIFIERS = 24  # the identifiers the toy model's build trained as fillers


def measure(pipe, samples: int = 64, held_out: bool = False, steps: int = 50, guidance: float = 6.0, seed: int = 0,
            fillers: tuple[str, ...] = ()) -> dict:
    import torch

    rng = random.Random(seed + (1 if held_out else 0))
    filler_rng = random.Random(seed + 99)  # its own stream: the scenes are the same with and without fillers
    totals = {"background": 0, "color": 0, "shape": 0}
    batch = 16
    for start in range(0, samples, batch):
        scenes = [world.random_scene(rng, two_prob=0.0, held_out=held_out) for _ in range(min(batch, samples - start))]
        generators = [torch.Generator(pipe.unet.device).manual_seed(seed * 10_000 + start + k) for k in range(len(scenes))]
        captions = [s.caption() for s in scenes]
        if fillers:
            captions = ["a " + filler_rng.choice(fillers) + c[1:] for c in captions]
        images = pipe(captions, num_inference_steps=steps, guidance_scale=guidance, eta=0.0, generator=generators).images
        for image, scene in zip(images, scenes):
            for key, ok in checker.check(image, scene).items():
                totals[key] += ok
    return {key: value / samples for key, value in totals.items()}


def main(argv: list[str] | None = None) -> None:
    from persres.models import TOY_DIR, load_pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(TOY_DIR))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=6.0)
    ap.add_argument("--fillers", choices=["first", "rest"], help="an identifier in front of every caption")
    args = ap.parse_args(argv)
    from persres.toy.vocabulary import IDENTIFIERS

    fillers = {None: (), "first": IDENTIFIERS[:FIRST_IDENTIFIERS], "rest": IDENTIFIERS[FIRST_IDENTIFIERS:]}[args.fillers]
    pipe = load_pipeline(args.model)
    report = {
        "seen": measure(pipe, args.samples, False, args.steps, args.guidance, fillers=fillers),
        "held_out": measure(pipe, args.samples, True, args.steps, args.guidance, fillers=fillers),
        "samples": args.samples, "steps": args.steps, "guidance": args.guidance, "fillers": args.fillers,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
