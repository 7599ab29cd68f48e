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
# Qwen3's frame for one user message and the assistant's turn (no system message); with enable_thinking
# false, Qwen3's template closes an empty thinking block after the assistant's opening, as here
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
WORDS = ("a", "an", "the", "photo", "of", "on", "in", "and", "with", "at", "dog", "cat", "toy", "beach", "left", "right",
         "picture", "style", "user", "assistant", "system", "you", "are", "describe", "image", "by", "detail")


def chat_tokenizer(words: Iterable[str] = (), max_length: int = 128):
    """A `Qwen2Tokenizer` whose vocabulary holds `words` (plus persres's identifiers and common words)."""
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer(tokenizer_object=byte_level_bpe(words, SPECIAL), eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          unk_token=None, bos_token=None, model_max_length=max_length, chat_template=CHAT_TEMPLATE)


def mistral_tokenizer(words: Iterable[str] = (), max_length: int = 128):
    """A byte-level BPE tokenizer with Mistral Small 3's special tokens and chat frame (a system message in
    [SYSTEM_PROMPT], the user's in [INST], after <s>; message content a string or a list of text parts)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(words, MISTRAL_SPECIAL), bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", model_max_length=max_length,
                                   chat_template=MISTRAL_TEMPLATE)


MISTRAL_SPECIAL = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set text = message['content'] if message['content'] is string else message['content'] | map(attribute='text') | join('') %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]{% endif %}{% endfor %}"
)


def byte_level_bpe(words: Iterable[str], special: Iterable[str]):
    """A `tokenizers.Tokenizer` (byte-level BPE) in which `words` after a space or a newline, persres's
    identifiers and common words are single tokens, `special` kept whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from persres.tokens import RARE_IDENTIFIERS

    special = list(special)
    vocabulary = list(dict.fromkeys([*WORDS, *RARE_IDENTIFIERS, *words]))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + len(special) + 40 * len(vocabulary), special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [" " + " ".join(vocabulary)] * 50 + ["\n".join(vocabulary)] * 50 + [f"{role}\n" for role in ("user", "assistant")] * 50
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer
