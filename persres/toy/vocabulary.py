"""The toy model's tokenizer: a CLIP BPE vocabulary in which every caption word and identifier is one token.

Used by the toy model's build and by `persres.testing`'s tiny models alike, so neither
depends on the other's code.
"""

from __future__ import annotations

import json
import string
from itertools import islice

from persres.tokens import identifier_candidates
from persres.toy import world

MAX_TOKENS = 32
# Identifiers the toy tokenizer knows as whole tokens, so the toy model holds this many concepts;
# each appears in training captions only as a filler that does not change the picture.
IDENTIFIER_COUNT = 256
IDENTIFIERS = tuple(islice(identifier_candidates(), IDENTIFIER_COUNT))

def build_tokenizer(base=None):
    """A CLIP BPE tokenizer in which every caption word and identifier is one token.

    `base` (a tokenizer to extend) keeps its ids and merges; new merges go after them, so
    its existing words split as before and each new word gets merges joining its pieces.
    """
    from transformers import CLIPTokenizer

    if base is None:
        vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
        for c in string.ascii_lowercase + string.digits:
            vocab.setdefault(c, len(vocab))
            vocab.setdefault(c + "</w>", len(vocab))
        merges: list[tuple[str, str]] = []
    else:
        model = json.loads(base.backend_tokenizer.to_str())["model"]
        vocab, merges = dict(model["vocab"]), [tuple(m) for m in model["merges"]]

    def make():
        return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)

    tokenizer = make()
    for word in [*world.vocabulary(), *IDENTIFIERS]:
        pieces = tokenizer.tokenize(word)
        if len(pieces) == 1:
            continue
        cur = pieces[0]
        for piece in pieces[1:]:
            merges.append((cur, piece))
            cur += piece
            vocab.setdefault(cur, len(vocab))
        tokenizer = make()
    bad = [w for w in [*world.vocabulary(), *IDENTIFIERS] if len(tokenizer.tokenize(w)) != 1]
    if bad:
        raise RuntimeError(f"toy tokenizer splits {bad}")
    return tokenizer
