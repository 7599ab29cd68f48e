"""Which tokens a concept owns in a prompt, and the prompt placeholder syntax.

One function, `concept_span`, decides a concept's tokens for training, LAG and the CLI
alike: every token of the identifier, plus the class word's tokens when the class word
follows the identifier (kept apart by role, for multi-concept LAG's region tokens). Identifiers and class words may span several tokens.

Placeholders: `V1`, `V2`, ... bind to the concepts given in order (-c); `V*` to the only
one; `<name>` to a registered concept by name, `<name:0.8>` with a strength (as `-c name:0.8`
does: the residual scaled by 0.8). With no concept given, `V1`, `V8`, ... are
ordinary words ("a V8 engine"); with concepts given, a `V<n>` beyond their count is an
error (a typo far more often than a word). Each expands to the concept's identifier, so
the class word stays the user's ("a V* dog" -> "a sks dog").
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from persres.errors import PromptError

# Rare identifier tokens, handed out in order by the registry (DreamBooth's "sks" first).
RARE_IDENTIFIERS = ("sks", "zwx", "qrv", "vyk", "pmj", "tqz", "hwx", "jxn")

PLACEHOLDER_RE = re.compile(r"<([A-Za-z0-9][A-Za-z0-9_-]*)(?::([^<>]*))?>|\bV(\d+)\b|\bV\*")
UNCLOSED_RE = re.compile(r"<[A-Za-z0-9][A-Za-z0-9_-]*(?::[^<>\s]*)?(?![A-Za-z0-9_:>-])(?![^<]*>)")  # "<name" with no ">"
MAX_STRENGTH = 2.0  # a residual scaled past twice what it learned is extrapolation, not a setting


@dataclass(frozen=True)
class BoundConcept:
    name: str
    identifier: str
    class_word: str
    strength: float = 1.0  # the residual's scale in this prompt: f = W x + strength * M * dW x
    everywhere: bool = False  # acts at every position (a style): it needs no place in the prompt


def check_strength(value: float, name: str, written: str | None = None) -> float:
    """`value` if it is a strength in [0, MAX_STRENGTH]; otherwise PromptError naming `name` and
    what was written (`written`, or the value itself)."""
    if not 0 <= value <= MAX_STRENGTH:  # also refuses nan and inf
        got = written if written is not None else repr(value)
        raise PromptError(f"strength of {name!r} must be a number from 0 to {MAX_STRENGTH:g}, got {got}")
    return value


def parse_strength(text: str, name: str) -> float:
    """The strength of `name` written as text ("0.8"); PromptError unless a number in [0, MAX_STRENGTH]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    return check_strength(value, name, repr(text))


def split_concept_option(option: str) -> tuple[str, float]:
    """A -c value: "NAME" (strength 1) or "NAME:STRENGTH"."""
    name, sep, strength = option.partition(":")
    return name, parse_strength(strength, name) if sep else 1.0


CONSONANTS = "bcdfghjklmnpqrstvwxz"


def identifier_candidates():
    """RARE_IDENTIFIERS, then every other consonant triple in a fixed shuffled order.

    Letters only: CLIP's pre-tokenizer cuts digits off letters, so "sks2" would be "sks" + "2"
    and share its first token with "sks". Whether a candidate is one token of a given model's
    tokenizer is decided where one is allocated (the registry), not here.
    """
    import itertools
    import random

    yield from RARE_IDENTIFIERS
    triples = ["".join(t) for t in itertools.product(CONSONANTS, repeat=3)]
    random.Random(0).shuffle(triples)
    yield from (t for t in triples if t not in RARE_IDENTIFIERS)


def is_single_token(tokenizer, identifier: str) -> bool:
    """Whether `identifier` is one token of `tokenizer` when it stands alone in a prompt."""
    return len(_word_ids(tokenizer, identifier)) == 1


def check_class_word(class_word: str) -> str:
    """A class word: 1-64 printable characters with something besides spaces."""
    from persres.names import MAX_CLASS_WORD, clean_class_word

    cleaned = clean_class_word(str(class_word))
    if cleaned is None:
        raise PromptError(f"the class word must be 1-{MAX_CLASS_WORD} printable characters, got {class_word!r}")
    return cleaned


def training_prompt(identifier: str, class_word: str, template: str) -> str:
    """`template` is `TrainConfig.prompt` (paper: "a photo of a {identifier} {class_word}")."""
    return template.replace("{identifier}", identifier).replace("{class_word}", class_word)


def _word_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _find(seq: list[int], sub: list[int], start: int = 0) -> int:
    for i in range(start, len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    return -1


@dataclass(frozen=True)
class ConceptSpan:
    """A concept's token positions in a prompt, by role: its identifier's and its class word's."""

    identifier: tuple[int, ...]
    class_word: tuple[int, ...]

    @property
    def positions(self) -> tuple[int, ...]:
        return tuple(sorted(self.identifier + self.class_word))


def concept_span(tokenizer, prompt: str, identifier: str, class_word: str | None = None) -> ConceptSpan:
    """Positions (in the padded, special-token-framed prompt) of the concept's tokens, by role.

    Every occurrence of the identifier counts, and the class word's tokens where they follow it.
    Raises PromptError when the identifier is absent or falls past the text encoder's limit.
    """
    full = tokenizer(prompt, add_special_tokens=True).input_ids  # untruncated
    limit = tokenizer.model_max_length
    ident = _word_ids(tokenizer, identifier)
    if not ident:  # an empty identifier would match everywhere, forever
        raise PromptError(f"the identifier {identifier!r} has no tokens")
    cls = _word_ids(tokenizer, class_word) if class_word else []
    ident_at: list[int] = []
    class_at: list[int] = []
    at = _find(full, ident) if ident else -1
    while at >= 0:
        end = at + len(ident)
        ident_at.extend(range(at, end))
        if cls and full[end : end + len(cls)] == cls:
            class_at.extend(range(end, end + len(cls)))
            end += len(cls)
        at = _find(full, ident, end)
    if not ident_at:
        raise PromptError(f"the prompt does not contain the concept's identifier {identifier!r}")
    if max(ident_at + class_at) >= limit - 1:  # the last kept position holds the end-of-text token
        raise PromptError(
            f"the prompt is {len(full)} tokens; the text encoder keeps {limit}, which would cut off the concept "
            f"{identifier!r}: shorten the prompt or move the concept earlier"
        )
    return ConceptSpan(tuple(ident_at), tuple(class_at))


def concept_positions(tokenizer, prompt: str, identifier: str, class_word: str | None = None) -> tuple[int, ...]:
    """Every token the concept owns in the prompt: identifier, and class word where it follows."""
    return concept_span(tokenizer, prompt, identifier, class_word).positions


def expand_prompt(
    prompt: str,
    concepts: Sequence[BoundConcept],
    lookup: Callable[[str], BoundConcept],
) -> tuple[str, list[BoundConcept]]:
    """Replace placeholders by identifiers; return the prompt and every concept it uses, in order.

    `concepts` are the -c options in order; `lookup(name)` resolves `<name>` (and raises
    ConceptNotFound). A concept given with -c but never referenced is an error too, and so is
    one concept at two strengths.
    """
    used: list[BoundConcept] = []

    def use(c: BoundConcept) -> str:
        same = [u for u in used if u.name == c.name]
        if not same:
            used.append(c)
        elif same[0].strength != c.strength:
            raise PromptError(f"concept {c.name!r} appears at strengths {same[0].strength:g} and {c.strength:g}; give it one")
        return c.identifier

    def replace_placeholder(m: re.Match) -> str:
        name, strength, index = m.group(1), m.group(2), m.group(3)
        if name is not None:
            found = lookup(name)
            if strength is not None:
                found = replace(found, strength=parse_strength(strength, name))
            else:  # a -c concept keeps its -c strength where <name> names it
                found = next((c for c in concepts if c.name == found.name), found)
            return use(found)
        if index is not None:
            if not concepts:  # no -c: V-numbers are ordinary words ("a V8 engine")
                return m.group(0)
            i = int(index)
            if i < 1:
                raise PromptError(f"V{index} is not a placeholder: concepts given with -c are V1, V2, ...")
            if i > len(concepts):
                raise PromptError(f"V{i} is not bound: give at least {i} concept(s) with -c (got {len(concepts)})")
            return use(concepts[i - 1])
        if len(concepts) != 1:
            raise PromptError(f"V* needs exactly one concept given with -c (got {len(concepts)}); use V1, V2, ... for several")
        return use(concepts[0])

    expanded = PLACEHOLDER_RE.sub(replace_placeholder, prompt)
    for c in concepts:
        if c.name in [u.name for u in used]:
            use(c)  # the same strength as where the prompt names it, or PromptError
        else:
            if c.everywhere or re.search(rf"(?<!\w){re.escape(c.identifier)}(?!\w)", expanded):
                used.append(c)  # a style, or the user wrote the identifier itself
            else:
                raise PromptError(f"concept {c.name!r} is not in the prompt: write V{concepts.index(c) + 1}, V* or <{c.name}> where it belongs")
    return expanded, used


class PromptWarning(UserWarning):
    """Something in the prompt looks like a concept placeholder, but binds to no concept."""


def unbound_placeholders(prompt: str, bound: Sequence[BoundConcept]) -> list[str]:
    """What in a prompt looks like a concept placeholder and binds to nothing: an unclosed `<name`,
    a `<...>` that no concept can be named (`<../checker>`, `<my dog>`: the text goes to the model
    as it is), or `V1`, `V*` when no concept is given at all."""
    found = [m.group(0) for m in UNCLOSED_RE.finditer(prompt)]
    found += [m.group(0) for m in re.finditer(r"<[^<>]+>", prompt) if not PLACEHOLDER_RE.fullmatch(m.group(0))]
    if not bound:
        found += re.findall(r"\bV\d+\b", prompt)
    return found
