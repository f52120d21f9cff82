"""Incremental detokenization: the text of each new token without decoding the whole answer again.

The rule of vLLM's and `transformers`' streamers: keep two offsets into the generated ids, `prefix` (where the
text already sent starts to matter as context) and `read` (up to where the text was sent). A new token's text is
decode(ids[prefix:]) minus decode(ids[prefix:read]); once it is whole (not ending in an incomplete character,
U+FFFD), both offsets move on. Each step decodes a window of a few tokens, so an answer of n tokens costs O(n)
token decodes, not O(n^2). The window starts at the text sent last, so tokenizers that drop a word's leading
space at the start of a decode (SentencePiece's "▁") stay right; a token that adds no text (a skipped special
token) leaves the window's start where it is, up to MAX_WINDOW tokens.
"""

from __future__ import annotations

from collections.abc import Callable

Decode = Callable[[list[int]], str]
REPLACEMENT = "\ufffd"  # what a decoder gives for bytes of a character that has not ended yet
MAX_HELD = 6  # a UTF-8 character has at most 4 bytes: a longer undecodable run is sent as it decodes
MAX_WINDOW = 16  # tokens that add no text (skipped special ones) stay as context up to this many


class IncrementalDetokenizer:
    """Text pieces of a growing list of token ids whose concatenation is the decode of the whole list."""

    def __init__(self, decode: Decode) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # the window's start: context for the text after `read`
        self.read = 0  # the ids whose text was handed out

    @classmethod
    def of(cls, tokenizer) -> IncrementalDetokenizer:  # noqa: ANN001 - a transformers tokenizer
        return cls(lambda ids: tokenizer.decode(ids, skip_special_tokens=True))

    def add(self, token: int) -> str:
        """The text that `token` completes ('' while a multi-byte character is still incomplete)."""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """What is still held back at the end of the answer (an incomplete character is sent as it decodes)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        sent = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        waiting = len(self.ids) - self.read <= MAX_HELD
        if text.endswith(REPLACEMENT) and waiting and not final:
            return ""
        piece = text[len(sent):] if text.startswith(sent) else ""
        if piece or self.read - self.prefix >= MAX_WINDOW:
            self.prefix = self.read  # the text just sent is the next window's context
        self.read = len(self.ids)
        return piece
