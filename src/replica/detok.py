"""Incremental detokenization and stop-string matching: streamed text never breaks a character or a stop."""
from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"
# Tokens decoded before read_offset as context, so a token's leading space or merge shows correctly.
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas (the prefix_offset/read_offset scheme).

    Each step decodes the window ids[prefix_offset:] and the window ids[prefix_offset:read_offset]
    it extends; the new suffix is emitted unless it ends in U+FFFD (a character still being built
    from byte tokens), in which case it is held back until the next token completes it. Decoding a
    window (not single tokens) keeps SentencePiece/BPE leading spaces. The prompt ids seed the
    window so the first generated token is decoded in context.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self.read_offset = len(self.ids)
        self.prefix_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Add one generated token; returns the text it completes ("" while a character is unfinished)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            delta = new_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self._trim()
            return delta
        return ""

    def flush(self) -> str:
        """At the end of generation: whatever is still held back (may end in U+FFFD if the model
        stopped inside a character)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""

    def _trim(self) -> None:
        """Forget ids before the window so memory stays flat however long the output."""
        if self.prefix_offset > 64:
            del self.ids[:self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0


class StopMatcher:
    """Finds stop strings in streamed text, even when split across tokens, and never emits them.

    Text that could still be the start of a stop string is held back; everything before it is
    released at once. After a match, `feed` returns the text before the stop and stopped=True.
    """

    def __init__(self, stops: list[str] | tuple[str, ...]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was found)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return buf[:min(hits)], True
        hold = self._partial_suffix(buf)
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        """The held-back text, when generation ends without a stop string."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best
