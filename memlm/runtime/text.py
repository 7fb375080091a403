"""Text that arrives in pieces, tokenized exactly as the tokenizer tokenizes the whole text.

A tokenizer's output near the end of a text can change when more text follows: a word grows
("cand" + "le"), Llama-3's ``\\s*[\\r\\n]+`` merges a run of newlines that continues, digits group by
three, SentencePiece's ``Metaspace`` gives every piece its own "▁", a ``Prepend`` normalizer marks
the start of a text. ``TextStream`` therefore holds back the tail of what has arrived and emits
the tokens of the prefix that can no longer change, cut at a *safe cut*:

1. a single space between two non-space characters (``"word| next"``). Every pre-tokenizer family
   users meet splits there whatever follows: byte-level / Llama-3 regexes end a letter, digit or
   punctuation run at the space and start the next match with it, ``Metaspace`` and whitespace
   splitters start a piece at it, and SentencePiece vocabularies have no piece with "▁" after
   another character;
2. in text without spaces (CJK), a letter or digit followed by punctuation, when the tokenizer's
   pre-tokenizer splits such a pair (probed once: byte-level and Llama-3 do, ``Metaspace`` does not);
3. a long stretch with neither (``max_held`` characters): the last token boundary ``margin``
   characters before the end, with a warning, so memory stays bounded by the window.

The held text is re-tokenized together with a little *left context* (the last characters already
emitted, whose tokens are dropped), so that start-of-text rules (``Prepend``, ``prepend_scheme=
"first"``) apply once, at the document's start. Work per character is constant: each window is
tokenized once (plus the context and the held tail), never the whole document.

The document's first tokens are the special tokens the tokenizer puts before a text (BOS for Llama,
none for GPT-2): ``special_prefix``, the one place that rule lives. Special tokens it puts *after* a
text (an EOS) are not added: a stream continues.
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass
class Piece:
    """Text whose tokens are final: ``ids`` are the whole text's tokens for exactly these characters."""

    text: str
    ids: list[int]


def special_prefix(tokenizer) -> list[int]:
    """The special token ids the tokenizer adds in front of a text (``[bos]`` for Llama, ``[]`` for GPT-2)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a")["input_ids"]
    for start in range(len(special) - len(plain) + 1):
        if special[start : start + len(plain)] == plain:
            return list(special[:start])
    return []


def check_fast(tokenizer) -> None:
    """Streaming needs the offsets of a fast (Rust) tokenizer."""
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(f"streaming text needs a fast tokenizer (with offsets), got {type(tokenizer).__name__}; "
                         "load it with use_fast=True or pass token ids")


class TextStream:
    """Tokenizes one text that arrives in pieces; ``push`` then ``flush`` equals ``tokenizer(text)``.

    Args:
        tokenizer: a fast tokenizer.
        document_start: the text starts a document (its special prefix comes first, and start-of-text
            rules apply to it); False: it continues text that ended with ``context``.
        context: the characters before the text, when it continues one (a resume after a crash).
        prefix: the ids that start a document (default: ``special_prefix``; ``[]`` for text that writes its own,
            such as a chat template's).
        piece_length: characters per emitted piece (a resume re-sends at most about this much).
        max_held: characters held without a safe cut before the text is cut anyway (rule 3).
    """

    CONTEXT = 64  # characters of left context kept from the emitted text
    MARGIN = 256  # characters held back after a forced cut (rule 3)

    def __init__(self, tokenizer, *, document_start: bool = True, context: str = "", prefix: list[int] | None = None,
                 piece_length: int = 4096, max_held: int = 1 << 16) -> None:
        check_fast(tokenizer)
        if piece_length < 1 or max_held < piece_length:
            raise ValueError(f"need 1 <= piece_length <= max_held, got piece_length={piece_length}, "
                             f"max_held={max_held}")
        self.tokenizer = tokenizer
        self.piece_length, self.max_held = piece_length, max_held
        self.context = context[-self.CONTEXT :]
        self.held = ""  # text not yet emitted
        if prefix is None:
            prefix = special_prefix(tokenizer) if document_start else []
        self.prefix = list(prefix)  # ids emitted before the first piece's
        self.next_try = piece_length  # held length at which to look for cuts again
        self.splits_punctuation = _splits(tokenizer, ("a,", "1.", "中，"))
        self.warned = False

    def push(self, text: str, eager: bool = False) -> list[Piece]:
        """Take the next characters; returns the pieces that became final (often none). Text is tokenized once a
        window of it has arrived, or at once when ``eager``."""
        if not isinstance(text, str):
            raise TypeError(f"expected text (str), got {type(text).__name__}")
        self.held += text
        if len(self.held) < self.next_try and not eager:
            return []
        pieces = self._cut(final=False)
        self.next_try = len(self.held) + self.piece_length  # retry only once a window more has arrived
        return pieces

    def flush(self) -> list[Piece]:
        """The text ends here: the tokens of everything held. Text pushed later is tokenized as a text of its own
        (no merge across this point, no special prefix)."""
        pieces = self._cut(final=True) if self.held or self.prefix else []
        self.next_try, self.context = self.piece_length, ""
        return pieces

    # ------------------------------------------------------------------------------------ internals

    def _cut(self, final: bool) -> list[Piece]:
        window = self.context + self.held
        start = len(self.context)
        batch = self.tokenizer(window, add_special_tokens=False, return_attention_mask=False)
        encoding, ids = batch.encodings[0], batch["input_ids"]
        first = _boundary(encoding, start, len(ids)) if start else 0
        if first is None:  # cannot happen after a safe cut; say so rather than emit wrong tokens silently
            raise RuntimeError("internal error: a token straddles the stream's last cut "
                               f"({window[start - 8 : start + 8]!r})")
        cuts, forced = [], False  # cuts: (character, token) where pieces end
        if final:
            cuts.append((len(window), len(ids)))
        else:
            rule = self._space_cuts if _any_space_cut(window, start + 1, len(window) - 2) else self._punctuation_cuts
            cut = start
            while (found := self._next_cut(rule, window, encoding, len(ids), cut)) is not None:
                cuts.append(found)
                cut = found[0]
            if not cuts and len(window) - start > self.max_held:
                cuts, forced = [self._forced_cut(window, encoding, len(ids), start)], True
        pieces = []
        for cut, token in cuts:
            pieces.append(Piece(window[start:cut], self.prefix + ids[first:token]))
            self.prefix, start, first = [], cut, token
        self.held = window[start:]
        self.context = "" if forced else window[max(0, start - self.CONTEXT) : start]
        return pieces

    def _next_cut(self, rule, window: str, encoding, n_tokens: int, start: int) -> tuple[int, int] | None:
        """The next piece's end after ``start``: the safe cut (character, token index) closest before
        ``start + piece_length``, or the first after it; the character after a cut must have arrived."""
        last, target = len(window) - 2, min(start + self.piece_length, len(window) - 2)
        for lo, hi, backward in ((start + 1, target, True), (target + 1, last, False)):
            for cut in rule(window, lo, hi, backward):
                token = _boundary(encoding, cut, n_tokens)
                if token is not None:
                    return cut, token
        return None

    @staticmethod
    def _space_cuts(window: str, lo: int, hi: int, backward: bool):
        """Rule 1: positions c in [lo, hi] of a space between two non-space characters."""
        find = window.rfind if backward else window.find
        while lo <= hi:
            c = find(" ", lo, hi + 1)
            if c < 0:
                return
            if not window[c - 1].isspace() and not window[c + 1].isspace():
                yield c
            if backward:
                hi = c - 1
            else:
                lo = c + 1

    def _punctuation_cuts(self, window: str, lo: int, hi: int, backward: bool):
        """Rule 2: positions c of a letter or digit followed by punctuation or a symbol."""
        if not self.splits_punctuation:
            return
        for c in range(hi, lo - 1, -1) if backward else range(lo, hi + 1):
            if unicodedata.category(window[c])[0] in "PS" and unicodedata.category(window[c - 1])[0] in "LN":
                yield c

    def _forced_cut(self, window: str, encoding, n_tokens: int, start: int) -> tuple[int, int]:
        """Rule 3: the last token boundary ``MARGIN`` characters before the end (the next window starts
        without context: this cut is not structural)."""
        if not self.warned:
            logger.warning("%d characters without a safe cut (no single space, no letter before punctuation): "
                           "cut at a token boundary; the tokens there may differ from the whole text's",
                           len(window) - start)
            self.warned = True
        for cut in range(len(window) - self.MARGIN, start, -1):
            token = _boundary(encoding, cut, n_tokens)
            if token is not None:
                return cut, token
        return len(window), n_tokens


def _any_space_cut(window: str, lo: int, hi: int) -> bool:
    return next(TextStream._space_cuts(window, lo, hi, True), None) is not None


def _boundary(encoding, cut: int, n_tokens: int) -> int | None:
    """Index of the first token at or after character ``cut`` if no token straddles it, else None."""
    before = encoding.char_to_token(cut - 1)
    if before is not None and encoding.token_to_chars(before)[1] > cut:
        return None
    after = encoding.char_to_token(cut)
    if after is not None:
        return after if encoding.token_to_chars(after)[0] == cut else None
    # the character at the cut is in no token (a splitter dropped it): the token after ``before``
    token = 0 if before is None else before + 1
    while token < n_tokens and encoding.token_to_chars(token)[0] < cut:
        token += 1
    return token


def _splits(tokenizer, pairs: tuple[str, ...]) -> bool:
    """Whether the tokenizer's pre-tokenizer splits each two-character pair into two pieces."""
    pre_tokenizer = tokenizer.backend_tokenizer.pre_tokenizer
    if pre_tokenizer is None:
        return False
    return all(len(pre_tokenizer.pre_tokenize_str(pair)) == 2 for pair in pairs)
