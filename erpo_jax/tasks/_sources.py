"""Math prompt sources: local JSONL / JSON / Parquet files, HF ``datasets``, TFDS.

Every source yields rows of the public MATH, MATH-500, GSM8K and AIME
releases, mapped to ``MathProblem`` by one function:

- the problem text is the first non-empty of ``problem``, ``question``,
  ``Problem``, ``Question``;
- the answer is the first non-empty of ``answer`` / ``Answer`` (MATH-500,
  AIME; a GSM8K ``answer`` is a worked solution ending in ``#### 42`` and
  gives ``42``), else the last ``\\boxed{}`` of ``solution`` / ``Solution``
  (MATH).

A row that cannot be mapped (bad JSON, not an object, missing problem,
empty or unextractable answer) is skipped, never fatal. Each load counts its
skipped rows and warns once with a ``MalformedRowWarning`` naming the file
and the row numbers.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from erpo_jax.tasks._answers import extract_boxed, extract_reference_answer

__all__ = [
    "QWEN_MATH_INSTRUCTION",
    "LoadedProblems",
    "MalformedRowWarning",
    "MathProblem",
    "SkippedRow",
    "format_math_prompt",
    "load_hf_dataset",
    "load_math_file",
    "load_tfds_dataset",
    "problems_from_rows",
]

_PROBLEM_KEYS = ("problem", "question", "Problem", "Question")
_ANSWER_KEYS = ("answer", "Answer", "final_answer")
_SOLUTION_KEYS = ("solution", "Solution")
_MAX_WARNED_ROWS = 5


class MalformedRowWarning(UserWarning):
    """Rows of a prompt source were skipped because they could not be used."""


@dataclasses.dataclass(frozen=True)
class MathProblem:
    """One math prompt with its reference answer.

    Attributes:
      problem: the question text, without any instruction or template.
      answer: the bare reference answer (``"\\frac{1}{2}"``, ``"42"``); pass
        it as ``reference`` to ``math_reward``.
      solution: the worked solution when the source has one, else ``""``.
      source: where the row came from, ``"<file or dataset>:<row>"``.
      metadata: the row's other scalar fields (``level``, ``type``, ``subject``, ``unique_id``...).
    """

    problem: str
    answer: str
    solution: str = ""
    source: str = ""
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SkippedRow:
    """A row that was not loaded: ``source`` names the file and row, ``reason`` says why."""

    source: str
    reason: str


@dataclasses.dataclass(frozen=True)
class LoadedProblems:
    """Problems of one source, and the rows that were skipped.

    Behaves as a read-only sequence of ``MathProblem`` (``len``, iteration,
    indexing).
    """

    problems: tuple[MathProblem, ...]
    skipped: tuple[SkippedRow, ...] = ()

    @property
    def num_skipped(self) -> int:
        """How many rows were skipped as malformed."""
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self) -> Iterator[MathProblem]:
        return iter(self.problems)

    def __getitem__(self, index):
        return self.problems[index]


def _first_text(row: Mapping[str, Any], keys: Iterable[str]) -> str | None:
    """The first of ``keys`` whose value is a non-empty string or a number, as text."""
    for key in keys:
        value = row.get(key)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float):
            # AIME answers are integers; a float that is an integer prints without ".0".
            return str(int(value)) if float(value).is_integer() else str(value)
        if isinstance(value, str) and value.strip():
            return value
    return None


def _row_to_problem(row: Any, source: str) -> MathProblem | str:
    """A ``MathProblem`` from one row, or the reason it cannot be made."""
    if not isinstance(row, Mapping):
        return f"expected an object with problem/answer fields, got {type(row).__name__}"
    problem = _first_text(row, _PROBLEM_KEYS)
    if problem is None:
        return f"missing or empty problem field (one of {', '.join(_PROBLEM_KEYS)})"
    solution = _first_text(row, _SOLUTION_KEYS) or ""
    answer_field = _first_text(row, _ANSWER_KEYS)
    if answer_field is not None:
        answer = extract_reference_answer(answer_field)
        if "####" in answer_field and solution == "":
            solution = answer_field  # GSM8K: the "answer" field is the worked solution
    else:
        answer = extract_boxed(solution) if solution else None
    if not answer:
        return (
            f"missing or empty answer (fields {', '.join(_ANSWER_KEYS)}, "
            f"or a \\boxed{{}} in {', '.join(_SOLUTION_KEYS)})"
        )
    used = set(_PROBLEM_KEYS) | set(_ANSWER_KEYS) | set(_SOLUTION_KEYS)
    metadata = {
        k: v
        for k, v in row.items()
        if k not in used and (v is None or isinstance(v, str | int | float | bool))
    }
    return MathProblem(
        problem=problem.strip(),
        answer=answer,
        solution=solution,
        source=source,
        metadata=metadata,
    )


def _warn_skipped(name: str, skipped: list[SkippedRow], total: int) -> None:
    if not skipped:
        return
    shown = "; ".join(f"{s.source}: {s.reason}" for s in skipped[:_MAX_WARNED_ROWS])
    more = (
        f"; and {len(skipped) - _MAX_WARNED_ROWS} more" if len(skipped) > _MAX_WARNED_ROWS else ""
    )
    warnings.warn(
        f"{name}: skipped {len(skipped)} of {total} malformed rows ({shown}{more})",
        MalformedRowWarning,
        stacklevel=3,
    )


def problems_from_rows(rows: Iterable[Any], *, name: str) -> LoadedProblems:
    """Map rows (dicts) of any source to problems, skipping and warning on bad ones.

    Args:
      rows: the rows in order; row numbers in messages count from 1.
      name: the source's name for ``MathProblem.source`` and warnings.
    """
    problems: list[MathProblem] = []
    skipped: list[SkippedRow] = []
    total = 0
    for number, row in enumerate(rows, start=1):
        total += 1
        where = f"{name}:{number}"
        result = _row_to_problem(row, where)
        if isinstance(result, str):
            skipped.append(SkippedRow(where, result))
        else:
            problems.append(result)
    _warn_skipped(name, skipped, total)
    return LoadedProblems(tuple(problems), tuple(skipped))


def _load_jsonl(path: Path) -> LoadedProblems:
    problems: list[MathProblem] = []
    skipped: list[SkippedRow] = []
    total = 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            total += 1
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                skipped.append(SkippedRow(where, f"bad JSON ({e.msg} at column {e.colno})"))
                continue
            result = _row_to_problem(row, where)
            if isinstance(result, str):
                skipped.append(SkippedRow(where, result))
            else:
                problems.append(result)
    _warn_skipped(str(path), skipped, total)
    return LoadedProblems(tuple(problems), tuple(skipped))


def _load_json(path: Path) -> LoadedProblems:
    """A ``.json`` file: a list of rows, or one row (the original MATH layout)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as e:
        skipped = [SkippedRow(f"{path}:1", f"bad JSON ({e.msg} at line {e.lineno})")]
        _warn_skipped(str(path), skipped, 1)
        return LoadedProblems((), tuple(skipped))
    if isinstance(data, Mapping) and isinstance(data.get("data"), list):
        data = data["data"]
    rows = data if isinstance(data, list) else [data]
    return problems_from_rows(rows, name=str(path))


def _load_parquet(path: Path) -> LoadedProblems:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(
            f"load_math_file: reading {path} needs pyarrow; install it with `pip install pyarrow`"
        ) from e
    rows = pq.read_table(path).to_pylist()
    return problems_from_rows(rows, name=str(path))


_LOADERS = {".jsonl": _load_jsonl, ".json": _load_json, ".parquet": _load_parquet}


def load_math_file(path: str | Path) -> LoadedProblems:
    """Load math problems from a local file or directory.

    Formats by extension: ``.jsonl`` (one row per line; MATH-500, GSM8K and
    most AIME releases), ``.json`` (a list of rows, ``{"data": [...]}``, or
    one row per file as in the original MATH release), ``.parquet`` (needs
    ``pyarrow``; the hub's converted splits). A directory loads every such
    file below it, in sorted path order (e.g. ``MATH/test``).

    Malformed rows are skipped and reported with a ``MalformedRowWarning``
    per file naming the file and row numbers (JSONL: line numbers; other
    formats: row order, from 1).

    Args:
      path: a file or directory.

    Returns:
      ``LoadedProblems``: the problems in file order and the skipped rows.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _LOADERS and p.is_file())
        if not files:
            raise FileNotFoundError(
                f"load_math_file: no {', '.join(_LOADERS)} files under directory {path}"
            )
        problems: list[MathProblem] = []
        skipped: list[SkippedRow] = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MalformedRowWarning)
            for file in files:
                loaded = _LOADERS[file.suffix](file)
                problems.extend(loaded.problems)
                skipped.extend(loaded.skipped)
        if skipped:
            _warn_skipped(str(path), skipped, len(problems) + len(skipped))
        for w in caught:
            if not issubclass(w.category, MalformedRowWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return LoadedProblems(tuple(problems), tuple(skipped))
    if not path.exists():
        raise FileNotFoundError(f"load_math_file: no such file {path}")
    loader = _LOADERS.get(path.suffix)
    if loader is None:
        raise ValueError(
            f"load_math_file: unsupported file type {path.suffix!r} for {path}; "
            f"expected one of {', '.join(_LOADERS)} or a directory"
        )
    return loader(path)


def load_hf_dataset(
    name: str, *, split: str = "test", config: str | None = None, **kwargs: Any
) -> LoadedProblems:
    """Load math problems from a Hugging Face hub dataset (needs the ``hf`` extra).

    Examples: ``load_hf_dataset("HuggingFaceH4/MATH-500")``,
    ``load_hf_dataset("openai/gsm8k", config="main")``. Downloads on first
    use (network needed), then reads the local ``datasets`` cache.

    Args:
      name: hub dataset id or a local dataset script / directory.
      split: split to load.
      config: the dataset's configuration name, if it has several.
      **kwargs: passed on to ``datasets.load_dataset``.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "load_hf_dataset needs the Hugging Face `datasets` package; install the extra "
            "with `pip install 'erpo_jax[hf]'` (or `pip install datasets`)"
        ) from e
    dataset = datasets.load_dataset(name, config, split=split, **kwargs)
    return problems_from_rows(iter(dataset), name=f"{name}[{split}]")


def load_tfds_dataset(name: str, *, split: str = "test", **kwargs: Any) -> LoadedProblems:
    """Load math problems from TensorFlow Datasets (needs the ``tfds`` extra).

    Works with TFDS's own datasets and its ``huggingface:`` namespace, e.g.
    ``load_tfds_dataset("huggingface:openai__gsm8k/main")``. Byte strings
    are decoded as UTF-8.

    Args:
      name: TFDS dataset name, with config and version if needed.
      split: split to load.
      **kwargs: passed on to ``tfds.load``.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "load_tfds_dataset needs TensorFlow Datasets; install the extra with "
            "`pip install 'erpo_jax[tfds]'` (or `pip install tensorflow-datasets`)"
        ) from e
    dataset = tfds.load(name, split=split, **kwargs)

    def decode(row: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in row.items():
            if isinstance(value, bytes):
                value = value.decode("utf-8", errors="replace")
            elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
                value = value.item()
                if isinstance(value, bytes):
                    value = value.decode("utf-8", errors="replace")
            out[key] = value
        return out

    return problems_from_rows((decode(r) for r in tfds.as_numpy(dataset)), name=f"{name}[{split}]")


QWEN_MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""The instruction of the Qwen2.5-Math evaluation prompts."""

_TEMPLATES = ("auto", "chat", "qwen_math", "plain")


def format_math_prompt(
    problem: str,
    *,
    template: str = "auto",
    tokenizer: Any = None,
    think: bool = False,
    instruction: str = QWEN_MATH_INSTRUCTION,
    system_prompt: str | None = None,
) -> str:
    """The prompt text for a math problem.

    Templates:

    - ``"chat"``: the tokenizer's own chat template
      (``apply_chat_template(..., add_generation_prompt=True)``) on a user
      turn ``problem + "\\n" + instruction``, with an optional system turn.
      ``think`` is passed as ``enable_thinking`` (Qwen3 templates use it).
    - ``"qwen_math"``: the Qwen2.5-Math ChatML prompt written out, for base
      models without a chat template (instruction as the system turn).
    - ``"plain"``: ``problem``, a newline, ``instruction``, a newline.
    - ``"auto"`` (default): ``"chat"`` if ``tokenizer`` has a chat
      template, else ``"plain"``.

    With ``think=True`` the prompt ends with ``"<think>\\n"`` (added unless
    the chat template already opened the block), for reasoning models that
    answer after a thinking section.

    Args:
      problem: the question text.
      template: one of ``"auto"``, ``"chat"``, ``"qwen_math"``, ``"plain"``.
      tokenizer: a ``transformers`` tokenizer; needed for ``"chat"``.
      think: open a ``<think>`` block for the model.
      instruction: the answer-format instruction.
      system_prompt: optional system turn for ``"chat"``.
    """
    if template not in _TEMPLATES:
        raise ValueError(
            f"format_math_prompt: unknown template {template!r}; choose one of {_TEMPLATES}"
        )
    has_chat = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        template = "chat" if has_chat else "plain"
    if template == "chat":
        if not has_chat:
            raise ValueError(
                "format_math_prompt: template='chat' needs a tokenizer with a chat_template; "
                "use template='qwen_math' or 'plain' for a base model"
            )
        messages = []
        if system_prompt is not None:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": f"{problem}\n{instruction}"})
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=think
        )
    elif template == "qwen_math":
        text = (
            f"<|im_start|>system\n{instruction}<|im_end|>\n"
            f"<|im_start|>user\n{problem}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
    else:
        text = f"{problem}\n{instruction}\n"
    if think and not text.rstrip().endswith("<think>"):
        text += "<think>\n"
    return text
