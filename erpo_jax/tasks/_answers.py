"""Final-answer extraction and strict normalization for math answers.

Everything here is plain string scanning, linear in the input length, so it
is safe to run on untrusted model output in the trainer process. The costly
and potentially unbounded part, symbolic equivalence with ``math-verify``,
lives in ``_math_verifier.py`` and runs in worker processes with a deadline.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = [
    "extract_boxed",
    "extract_completion_answer",
    "extract_gsm8k",
    "extract_reference_answer",
    "normalize_answer",
]

_BOXED_COMMANDS = ("\\boxed", "\\fbox")


def _match_braces(text: str, open_index: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_index``; None if unbalanced.

    Escaped braces (``\\{``, ``\\}``, as in the set ``\\{1, 2\\}``) are literal
    characters and do not change the depth.
    """
    depth = 0
    i = open_index
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character, whatever it is
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Nested braces are matched (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``);
    the brace-less form ``\\boxed 5`` gives ``5``. A last box that is never
    closed (a truncated completion) gives None rather than a partial answer,
    and so does a text without a box.

    Args:
      text: a completion or a worked solution.

    Returns:
      The stripped content of the last box, or None.
    """
    start = -1
    command = ""
    for cmd in _BOXED_COMMANDS:
        pos = text.rfind(cmd)
        if pos > start:
            start, command = pos, cmd
    if start < 0:
        return None
    i = start + len(command)
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    if i >= n:
        return None
    if text[i] == "{":
        close = _match_braces(text, i)
        if close is None:
            return None
        return text[i + 1 : close].strip()
    if text[i].isalpha() and i == start + len(command):
        # ``\boxeds`` is another command, not a box.
        return None
    match = re.match(r"[^\s$]+", text[i:])
    return match.group(0).strip() if match else None


def extract_gsm8k(text: str) -> str | None:
    """The answer after the last ``####`` marker (GSM8K format), or None.

    The answer runs to the end of that line; a trailing period is dropped.
    """
    pos = text.rfind("####")
    if pos < 0:
        return None
    answer = text[pos + 4 :].split("\n", 1)[0].strip().rstrip(".").strip()
    return answer or None


def extract_completion_answer(completion: str) -> str | None:
    """Final answer of a model completion: last ``\\boxed{}``, else GSM8K ``####``.

    A completion with neither marker has no answer (None) and scores 0: the
    prompt templates ask for ``\\boxed{}``, and guessing "the last number"
    would reward answers the model never committed to.
    """
    boxed = extract_boxed(completion)
    if boxed:
        return boxed
    return extract_gsm8k(completion)


def extract_reference_answer(reference: str) -> str | None:
    """Final answer of a reference: a full solution or a bare answer.

    A MATH solution gives its last ``\\boxed{}``, a GSM8K answer the text
    after ``####``, and anything else (MATH-500 ``answer``, AIME integers) is
    taken whole. Returns None for an empty reference.
    """
    boxed = extract_boxed(reference)
    if boxed:
        return boxed
    gsm = extract_gsm8k(reference)
    if gsm:
        return gsm
    bare = reference.strip()
    return bare or None


_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_SPACING = re.compile(r"\\left|\\right|\\[!,;: ]|\\displaystyle|\\quad|\\qquad")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox)\{([^{}]*)\}")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")
_FRAC = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}")
_SLASH = re.compile(r"(-?\d+)/(-?\d+)")


def normalize_answer(answer: str) -> str:
    """Strict, formatting-only normalization used as the string fallback.

    Removes what never changes a value: math delimiters (``$``, ``\\(``),
    ``\\left``/``\\right`` and LaTeX spacing, whitespace, a trailing period,
    ``\\text{...}``-style wrappers (``\\text{(A)}`` is ``(A)``), and
    ``\\dfrac``/``\\tfrac`` spelling. A plain number is put in canonical
    rational form, so ``0.5``, ``\\frac{1}{2}``, ``1/2`` and ``.50`` agree and
    ``1,000`` equals ``1000``. Units, percent and degree signs are kept: the
    fallback must never call two different answers equal.
    """
    s = answer.strip()
    changed = True
    while changed:
        changed = False
        for left, right in _DELIMITERS:
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : len(s) - len(right)].strip()
                changed = True
                break
    s = _SPACING.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _TEXT_WRAPPER.sub(r"\1", s)
    s = "".join(s.split())
    s = s.rstrip(".")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    value: Fraction | None = None
    try:
        if _DECIMAL.fullmatch(s):
            value = Fraction(s)
        elif m := _FRAC.fullmatch(s):
            value = Fraction(int(m.group(2)), int(m.group(3)))
            value = -value if m.group(1) else value
        elif m := _SLASH.fullmatch(s):
            value = Fraction(int(m.group(1)), int(m.group(2)))
    except (ValueError, ZeroDivisionError):
        value = None
    if value is not None:
        return str(value)
    return s
