"""Host-side stop-string detection between chunks of decode steps.

Stop strings are matched in decoded text, not in token ids: a BPE tokenizer
can spell ``"</answer>"`` with many different token sequences, and a stop
string may end in the middle of a token. The sampler therefore runs its
jitted decode loop for ``stop_check_every`` steps, copies the new tokens to
the host, decodes the tail of every live row with the tokenizer, and marks
rows whose text now contains a stop string as done. The completion ends at
the first token after which the decoded text contains the stop string (the
token that completes it); tokens a row generated later in the same chunk are
masked out by the sampler. Decoding is exact for any tokenizer with a
``decode(list[int]) -> str`` method, at the price of one device-to-host copy
per chunk of a ``[B, stop_check_every + lookback]`` window of tokens (the new
ones and the few before them a stop string can start in) and the ``[B]``
lengths, not of the whole ``[B, T]`` buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["StopStringMatcher"]

# Tokens decoded before the first unchecked one, beyond the longest stop
# string's length in characters: a stop string can start that far back, and a
# few tokens decode to no character on their own (partial UTF-8 bytes).
_EXTRA_LOOKBACK = 16


class StopStringMatcher:
    """Tracks, per row, how far stop strings have been checked, and where rows stop.

    Args:
      stop_strings: non-empty strings.
      tokenizer: anything with ``decode(ids: list[int]) -> str`` (a
        ``transformers`` tokenizer or a ``tokenizers.Tokenizer``).
      batch_size: B.
    """

    def __init__(self, stop_strings: Sequence[str], tokenizer: Any, batch_size: int):
        self.stop_strings = tuple(stop_strings)
        self.tokenizer = tokenizer
        self.lookback = max(len(s) for s in self.stop_strings) + _EXTRA_LOOKBACK
        self.checked = np.zeros(batch_size, np.int64)
        # The last completion index each row keeps; -1 while no stop string was seen.
        self.cut = np.full(batch_size, -1, np.int64)

    def _decode(self, ids: np.ndarray) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def update(self, tokens: np.ndarray, lengths: np.ndarray, offset: int = 0) -> np.ndarray:
        """Checks the newly generated tokens of every row that has not stopped.

        Args:
          tokens: ``[B, W]`` completion tokens ``offset .. offset + W - 1``
            (host array): the whole buffer (``offset=0``), or a window. A
            window must reach the longest length and start at least
            ``lookback`` tokens before the previous update's step (the
            point every row that has grown since was checked to).
          lengths: ``[B]`` number of valid tokens per row (up to the step
            reached, or to and including EOS).
          offset: the completion index of ``tokens[:, 0]``.

        Returns:
          ``[B]`` bool, rows that hit a stop string in this update.
        """
        hit = np.zeros(len(lengths), bool)
        rows = np.flatnonzero((self.cut < 0) & (lengths > self.checked))
        for b in rows:
            n, checked = int(lengths[b]), int(self.checked[b])
            start = max(0, checked - self.lookback)
            if start < offset or n > offset + tokens.shape[1]:
                raise ValueError(
                    f"StopStringMatcher.update: row {b} needs tokens {start}..{n - 1}, outside "
                    f"the window {offset}..{offset + tokens.shape[1] - 1}"
                )
            row = tokens[b, start - offset :]  # completion tokens from `start` on
            before = self._decode(row[: checked - start])
            # A match must end after the text already checked: it may start up
            # to len(s) - 1 characters before it.
            text = self._decode(row[: n - start])
            searches = [max(0, len(before) - len(s) + 1) for s in self.stop_strings]
            if all(text.find(s, i) == -1 for s, i in zip(self.stop_strings, searches, strict=True)):
                self.checked[b] = n
                continue
            # The first token after which the decoded text contains a stop string.
            for j in range(checked, n):
                prefix = self._decode(row[: j + 1 - start])
                if any(
                    prefix.find(s, i) != -1
                    for s, i in zip(self.stop_strings, searches, strict=True)
                ):
                    self.cut[b] = j
                    break
            else:  # decoding a prefix disagreed with decoding the whole; stop at the end
                self.cut[b] = n - 1
            self.checked[b] = n
            hit[b] = True
        return hit
