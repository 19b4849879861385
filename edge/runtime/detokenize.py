"""Incremental text for a stream of tokens: safe to send, never half a character, never a stop string.

Text is decoded from all tokens so far (byte-level BPE may split one character over several tokens)
and only the part that can no longer change is released: a trailing incomplete character and any
tail that could still grow into a stop string are held back until the next token settles them.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

INCOMPLETE = "\ufffd"  # what the byte-level decoder yields for a character cut in the middle


class TextStream:
    """Turns tokens into text deltas, stopping at the first stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already released
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; the text that became safe to send (maybe empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hit = self._first_stop(text)
        if hit is not None:
            self.stopped = True
            return self._release(text, max(hit, self.sent))
        end = len(text.rstrip(INCOMPLETE))
        end -= self._stop_prefix_len(text[:end])
        return self._release(text, max(end, self.sent))

    def finish(self) -> str:
        """Everything held back, once the stream ends for another reason than a stop string."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._release(text, len(text))

    def _release(self, text: str, end: int) -> str:
        """Text from what was sent up to `end`, now counted as sent."""
        piece = text[self.sent : end]
        self.sent = end
        return piece

    def _first_stop(self, text: str) -> int | None:
        """Where the earliest stop string starts in `text`, if any does."""
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is the start of some stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest
