"""`TemplatedTokens`: token positions of a prompt the pipeline wraps in a template before encoding.

Pipelines with a language model as text encoder frame the prompt (a chat template, a system
message) and may drop the frame's first tokens from the states they hand the denoiser
(Qwen-Image drops 34). `persres.tokens.concept_span` reads positions through this object, so
they are positions in the sequence the denoiser's attention sees: the templated prompt's tokens
with the dropped prefix removed.
"""

from __future__ import annotations

from collections.abc import Callable


class TemplatedTokens:
    """What `persres.tokens.concept_span` reads of a tokenizer (`__call__`, `model_max_length`), over a
    template: `frame(prompt)` is the text the pipeline tokenizes, `drop` the leading tokens it removes.
    A word alone is tokenized as it stands inside a sentence (after a space)."""

    def __init__(self, tokenizer, max_length: int, frame: Callable[[str], str], drop: int = 0):
        self.tokenizer = tokenizer
        self.model_max_length = max_length  # of the sequence after the drop
        self.frame = frame
        self.drop = drop

    def __call__(self, text: str, add_special_tokens: bool = True):
        from transformers import BatchEncoding

        if add_special_tokens:
            ids = self.tokenizer(self.frame(text), add_special_tokens=False).input_ids
            return BatchEncoding({"input_ids": ids[self.drop:]})
        return self.tokenizer(" " + text, add_special_tokens=False)


def chat_frame(tokenizer, thinking: bool = True) -> Callable[[str], str]:
    """A prompt as one user message in the tokenizer's chat template, the assistant's turn opened, with
    the template's `enable_thinking` as the pipeline passes it (Z-Image: True; FLUX.2 klein: False)."""
    def frame(prompt: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=thinking)

    return frame
