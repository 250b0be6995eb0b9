"""Dimension letters and array aliases used across erpo_jax.

Every signature in the library names its array dimensions with these letters
(jaxtyping strings such as ``Float[Array, "B T"]``); the test suite turns on
runtime checking with the jaxtyping import hook, so annotations cannot drift
from what the code does.

====  ===========================================================
P     prompts in a batch
G     completions sampled per prompt (group size)
B     rows, ``B = P * G``, stored prompt-major (row ``b = p * G + g``)
S     prompt length (left-padded)
T     completion length (right-padded; ``mask`` marks sampled tokens)
V     vocabulary size
D     model width (hidden size)
L     number of decoder layers
====  ===========================================================
"""

from __future__ import annotations

from jaxtyping import Array, ArrayLike, Bool, Float, Int, Num

__all__ = ["DIMENSIONS", "Array", "ArrayLike", "Bool", "Float", "Int", "Num"]

DIMENSIONS: dict[str, str] = {
    "P": "prompts in a batch",
    "G": "completions sampled per prompt (group size)",
    "B": "rows, B = P * G, prompt-major (row b = p * G + g)",
    "S": "prompt length (left-padded)",
    "T": "completion length (right-padded)",
    "V": "vocabulary size",
    "D": "model width (hidden size)",
    "L": "number of decoder layers",
}
