"""Which class word? The base model as a zero-shot classifier (Li et al., ICCV 2023).

For each candidate class c, the mean denoising error

    E || target - model(x_t, t, "a photo of a c") ||^2

over the reference images' latents, with the same (image, t, noise) draws for every
candidate, so that candidates are compared on paired draws. Successive halving keeps the
cost bounded whatever the list's length: each round spends an equal share of the budget on
the surviving candidates, adding fresh draws, and drops the worse half; the lowest mean
error wins. One text-encoder pass per candidate; candidates are batched through the UNet.

The budget is counted in sample-forwards (one image through the UNet once). Its default,
1,800, is what a default training run costs (150 steps x batch 4 x forward and backward,
a backward counted as two forwards).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from PIL import Image

from persres.errors import InputError, PromptError

DEFAULT_BUDGET = 150 * 4 * 3  # a default training run: 150 steps x batch 4 x (forward + backward)
PROMPT = "a photo of a {}"
UNET_BATCH = 32


@dataclass(frozen=True)
class SuggestConfig:
    budget: int = DEFAULT_BUDGET  # sample-forwards, at most
    seed: int = 0
    top: int = 5
    score: str = "rank"  # rank: mean per-draw rank (robust to a few draws a colour wins by far); error: mean error

    def __post_init__(self) -> None:
        from persres.config import SEED_LIMIT, _number

        _number("--budget", self.budget, int, 1, 10_000_000)
        _number("--seed", self.seed, int, 0, SEED_LIMIT - 1)
        _number("--top", self.top, int, 1, 1000)


@dataclass
class Suggestion:
    ranking: list[tuple[str, float, int]]  # (candidate, mean error, draws), best first; survivors of the last round lead
    evaluations: int  # sample-forwards spent
    seconds: float
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (entry, why)
    per_draw: dict[str, list[float]] = field(default_factory=dict)  # candidate -> its error on draws 0, 1, ... (shared)

    @property
    def best(self) -> str:
        return self.ranking[0][0]

    def top(self, n: int) -> list[dict]:
        return [{"class": c, "error": round(e, 6), "draws": d} for c, e, d in self.ranking[:n]]


def builtin_candidates() -> list[str]:
    text = resources.files("persres.data").joinpath("classes.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def parse_candidates(value: str | None) -> list[str]:
    """`--candidates`: None (the built-in list), a comma-separated list, or a file with one per line."""
    if value is None:
        return builtin_candidates()
    path = Path(value).expanduser()
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read candidates file {value!r}: {type(e).__name__}") from None
        return [line.split("#")[0].strip() for line in lines if not line.lstrip().startswith("#")]
    if "," not in value and ("/" in value or value.endswith(".txt")):
        raise InputError(f"candidates file {value!r} not found")
    words = [part.strip() for part in value.split(",")]
    if not any(words):
        raise InputError(f"--candidates holds no word, got {value!r}: give a,b,c or a file with one word per line")
    return words


def screen(tokenizer, entries: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(usable candidates, [(entry, why) for the rest]): empty entries, duplicates, bad words,
    unknown tokens and prompts longer than the tokenizer takes are reported, never dropped silently."""
    from persres.tokens import check_class_word

    kept, rejected, seen = [], [], set()
    limit = tokenizer.model_max_length
    for entry in entries:
        word = entry.strip()
        if not word:
            rejected.append((entry, "empty"))
            continue
        if word.lower() in seen:
            rejected.append((word, "duplicate"))
            continue
        seen.add(word.lower())
        try:
            check_class_word(word)
        except PromptError as e:
            rejected.append((word, str(e)))
            continue
        ids = tokenizer(PROMPT.format(word)).input_ids
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids[1:-1]:
            rejected.append((word, "unknown to the model's tokenizer"))
        elif len(ids) > limit:
            rejected.append((word, f"longer than the tokenizer's {limit} tokens"))
        else:
            kept.append(word)
    return kept, rejected


def plan_rounds(candidates: int, budget: int) -> list[tuple[int, int]]:
    """[(survivors, new draws each)] per round of successive halving within `budget` sample-forwards.

    Each round keeps the best 1/eta; eta is 2 (halving) unless even one draw per survivor and
    round would overspend, then the smallest eta that fits."""
    def survivors(eta: int) -> list[int]:
        out, alive = [], candidates
        while True:
            out.append(alive)
            if alive == 1:
                return out
            alive = max(1, math.ceil(alive / eta))

    eta = 2
    while sum(survivors(eta)) > budget and eta < candidates:
        eta += 1
    alive = survivors(eta)[:-1] or [1]  # the last survivor needs no round of its own
    rounds = len(alive)
    out = [(a, max(1, budget // (rounds * a))) for a in alive]
    while sum(a * d for a, d in out) > budget and any(d > 1 for _, d in out):  # the max(1, ...) floors can overshoot
        k = max(range(len(out)), key=lambda i: out[i][1])
        out[k] = (out[k][0], out[k][1] - 1)
    return out


def suggest(pipe, images: Sequence[Image.Image], entries: Sequence[str], config: SuggestConfig = SuggestConfig()) -> Suggestion:
    """Screen `entries` with the model's tokenizer, then rank what is left; the left-out ones ride along."""
    from persres import families

    families.of(pipe).check_suggestion()
    kept, rejected = screen(pipe.tokenizer, entries)
    suggestion = suggest_class(pipe, images, kept, config)
    suggestion.rejected = rejected
    return suggestion


@torch.no_grad()
def suggest_class(pipe, images: Sequence[Image.Image], candidates: Sequence[str], config: SuggestConfig = SuggestConfig(),
                  resolution: int | None = None) -> Suggestion:
    """Rank `candidates` (already screened) by the base model's denoising error on `images`."""
    from persres.conditioning import encode
    from persres.train import default_resolution, encode_references, noised, prediction_of

    if len(candidates) == 0:
        raise InputError("no usable candidate class words")
    if len(candidates) > config.budget:
        raise InputError(f"{len(candidates)} candidates need a budget of at least {len(candidates)} evaluations")
    t0 = time.perf_counter()
    unet, sched = pipe.unet, pipe.scheduler
    device = unet.device
    resolution = resolution or default_resolution(pipe)
    mean, std = encode_references(pipe, images, resolution)  # (N, 4, h, w) each
    conds = {c: encode(pipe, PROMPT.format(c), (resolution, resolution)) for c in candidates}
    prediction = prediction_of(sched)
    timesteps = sched.config.num_train_timesteps
    alphas = sched.alphas_cumprod.to(device)
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    draws: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []  # (image, t, latent noise, eps), shared by all
    errors = {c: [] for c in candidates}
    alive = list(candidates)
    place: dict[str, int] = {}  # rank score: a candidate's place in the last round it took part in
    spent = 0
    for survivors, new in plan_rounds(len(candidates), config.budget):
        alive = alive[:survivors]
        start = len(draws)
        for _ in range(new):
            i = int(torch.randint(0, mean.shape[0], (1,), generator=gen))
            t = int(torch.randint(0, timesteps, (1,), generator=gen))
            draws.append((i, t, torch.randn(mean.shape[1:], generator=gen), torch.randn(mean.shape[1:], generator=gen)))
        units = [(c, k) for c in alive for k in range(start, len(draws))]
        for part in range(0, len(units), UNET_BATCH):
            chunk = units[part : part + UNET_BATCH]
            latents = torch.stack([(mean[draws[k][0]] + std[draws[k][0]] * draws[k][2].to(device)) for _, k in chunk])
            latents = latents * pipe.vae.config.scaling_factor  # (B, 4, h, w)
            eps = torch.stack([draws[k][3] for _, k in chunk]).to(device)
            t = torch.tensor([draws[k][1] for _, k in chunk], device=device)
            noisy, target = noised(alphas, latents, eps, t, prediction)
            emb = torch.cat([conds[c].embedding for c, _ in chunk])
            added = None
            if conds[chunk[0][0]].added is not None:
                added = {key: torch.cat([conds[c].added[key] for c, _ in chunk]) for key in conds[chunk[0][0]].added}
            pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=emb, added_cond_kwargs=added).sample.float()
            per = ((pred - target) ** 2).flatten(1).mean(1)  # (B,)
            for (c, _), e in zip(chunk, per.tolist()):
                errors[c].append(e)
            spent += len(chunk)
        if config.score == "rank":  # each draw votes: the candidates' mean rank over the draws they share
            table = torch.tensor([errors[c] for c in alive])  # (survivors, draws so far)
            ranks = table.argsort(dim=0).argsort(dim=0).float().mean(dim=1)
            alive = [alive[i] for i in ranks.argsort().tolist()]
            place.update((c, i) for i, c in enumerate(alive))
        else:
            alive.sort(key=lambda c: sum(errors[c]) / len(errors[c]))
    if config.score == "rank":
        dropped = sorted((c for c in candidates if c not in alive), key=lambda c: (-len(errors[c]), place[c]))
    else:
        dropped = sorted((c for c in candidates if c not in alive), key=lambda c: sum(errors[c]) / len(errors[c]))
    ranked = alive + dropped  # survivors (ranked on more draws) first, then the dropped, latest round first
    ranking = [(c, sum(errors[c]) / len(errors[c]), len(errors[c])) for c in ranked]
    return Suggestion(ranking, spent, time.perf_counter() - t0, per_draw=errors)


def describe(suggestion: Suggestion) -> str:
    """'dog (runner-up cat; mean error 0.1023 vs 0.1051)': the pick, in one line."""
    (best, e0, _), *rest = suggestion.ranking
    if not rest:
        return best
    second, e1, _ = rest[0]
    return f"{best} (runner-up {second}; mean error {e0:.4f} vs {e1:.4f})"
