"""A character-level tokenizer with a chat template, for tiny random models (tests, demos): ids 0/1/2 are
pad/bos/eos, a character with code point 3..127 is its own id, any other character becomes ``?``. Encoding and
decoding round-trip exactly for ASCII text, so a client that sends back the assistant's answers reproduces the tokens
the server generated (and the server's KV of the previous turn is a prefix of the next prompt)."""

from __future__ import annotations

from typing import Any, Sequence

PAD, BOS, EOS = 0, 1, 2


class CharTokenizer:
    """The subset of a Hugging Face tokenizer the server uses."""

    chat_template = "{role}: {content}\\n per message, then 'assistant: '"
    pad_token_id, bos_token_id, eos_token_id = PAD, BOS, EOS
    max_token_chars = 1  # one character per token

    def __init__(self, vocab_size: int = 128):
        if vocab_size < 128:
            raise ValueError(f"vocab_size={vocab_size} is too small for the character tokenizer: needs >= 128")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [ord(c) if 3 <= ord(c) < 128 else ord("?") for c in text]

    def __call__(self, text: str, **kwargs: Any) -> dict[str, list[int]]:
        return {"input_ids": [BOS] + self.encode(text)}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if 3 <= i < 128)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            tokenize: bool = True, **kwargs: Any) -> Any:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "assistant: "
        return [BOS] + self.encode(text) if tokenize else text


__all__ = ["CharTokenizer"]
