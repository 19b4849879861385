"""A completion's text as tokens arrive: incremental detokenisation plus stop strings.

Text that could be the start of a stop string is held back until it is known not to be one, so a
stop string never reaches the client, not even split across deltas.
"""

from __future__ import annotations

from core.tokenizer import IncrementalDetokenizer, Tokenizer


class TextStream:
    """Feed tokens, get the text that is safe to send."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop = tuple(s for s in stop if s)
        self.pending = ""  # decoded, not yet sent: may be the start of a stop string
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; returns the text to send now. Sets `stopped` when a stop string appears."""
        return self._advance(self.detok.push(token_id))

    def finish(self) -> str:
        """The remaining text once generation ends without a stop string."""
        text = self._advance(self.detok.flush())
        if self.stopped:
            return text
        text, self.pending = text + self.pending, ""
        return text

    def _advance(self, delta: str) -> str:
        if self.stopped:
            return ""
        text = self.pending + delta
        if not self.stop:
            self.pending = ""
            return text
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return text[: min(hits)]
        hold = max((_overlap(text, s) for s in self.stop), default=0)
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that begins `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0
