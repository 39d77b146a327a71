"""Streaming detokenisation: turn generated token ids into text pieces that are safe to send.

Two things must not be sent early:

* an incomplete character: with byte-level tokenizers one character (an emoji, a CJK character) spans several tokens,
  and decoding a prefix of them gives U+FFFD. The text is decoded incrementally with a prefix window, as transformers'
  ``TextStreamer`` and text-generation-inference do: ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])`` is
  the new text, held back while it ends in U+FFFD (the next token may complete the character);
* text that could still become a stop string: a tail of the text that is a proper prefix of a stop string is held
  back until the next tokens decide it (``stop=["How can"]`` never leaks ``"How"``).
"""

from __future__ import annotations

from typing import Any, Sequence

_REPLACEMENT = "\ufffd"


class StreamText:
    """Feed it token ids with :meth:`push`; it returns the text that may be sent now. :meth:`finish` flushes the
    rest (an incomplete character at the very end is then sent as the tokenizer decodes it)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        if any(not s for s in stop):
            raise ValueError(f"stop={list(stop)!r}: stop strings must be non-empty")
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] were decoded already; decoding from _prefix gives the context
        self._read = 0
        self.text = ""  # complete text decoded so far (before any stop cut)
        self.sent = 0  # characters of ``text`` handed out
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _new_text(self, final: bool) -> None:
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith(_REPLACEMENT)):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    def _release(self, final: bool) -> str:
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self.sent - longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            end = max(min(hits), self.sent)
            self.stopped = True
        elif final:
            end = len(self.text)
        else:
            hold = 0  # longest tail of the text that is a proper prefix of a stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                    if self.text.endswith(s[:k]):
                        hold = k
                        break
            end = max(self.sent, len(self.text) - hold)
        out = self.text[self.sent:end]
        self.sent = end
        return out

    def push(self, token: int) -> str:
        """Add one generated token; the text that can be sent now ("" while held back). After a stop string
        appeared, :attr:`stopped` is True and the text up to (not including) it has been returned."""
        if self.stopped:
            raise ValueError("a stop string was already found: nothing more can be pushed")
        self.ids.append(int(token))
        self._new_text(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The held-back rest, once generation ended for another reason than a stop string."""
        if self.stopped:
            return ""
        self._new_text(final=True)
        return self._release(final=True)


__all__ = ["StreamText"]
