"""A tiny byte-level BPE tokenizer with a chat template, built offline (tests, demos).

`chat_tokenizer(words)` makes a Qwen-style tokenizer (`Qwen2Tokenizer`: byte-level BPE, the
`<|im_start|>` / `<|im_end|>` chat frame) whose vocabulary holds `words`, persres's rare
identifiers and the toy world's words as single tokens after a space (" sks"), as a large
model's tokenizer holds common words; any other text falls back to bytes. Its chat template
frames a user message the way Qwen's own templates do, so a pipeline that templates its
prompt (Z-Image, Qwen-Image) sees the same frame it sees with the real tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen's frame for one user message and the assistant's turn (no system message, no thinking block)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ("a", "an", "the", "photo", "of", "on", "in", "and", "with", "at", "dog", "cat", "toy", "beach", "left", "right",
         "picture", "style", "user", "assistant", "system", "you", "are", "describe", "image", "by", "detail")


def chat_tokenizer(words: Iterable[str] = (), max_length: int = 128):
    """A `Qwen2Tokenizer` whose vocabulary holds `words` (plus persres's identifiers and common words)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    from persres.tokens import RARE_IDENTIFIERS

    vocabulary = list(dict.fromkeys([*WORDS, *RARE_IDENTIFIERS, *words]))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + len(SPECIAL) + 40 * len(vocabulary), special_tokens=list(SPECIAL),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [" " + " ".join(vocabulary)] * 50 + ["\n".join(vocabulary)] * 50 + [f"{role}\n" for role in ("user", "assistant")] * 50
    tokenizer.train_from_iterator(corpus, trainer)
    return Qwen2Tokenizer(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                          bos_token=None, model_max_length=max_length, chat_template=CHAT_TEMPLATE)
