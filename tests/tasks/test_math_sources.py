"""Math prompt sources on the shipped fixture files, and prompt templates."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from erpo_jax.tasks import (
    QWEN_MATH_INSTRUCTION,
    LoadedProblems,
    MalformedRowWarning,
    format_math_prompt,
    load_hf_dataset,
    load_math_file,
    load_tfds_dataset,
    problems_from_rows,
)

DATA = Path(__file__).resolve().parents[1] / "data"


def test_math_jsonl_skips_bad_json_and_names_file_and_line():
    path = DATA / "math_sample.jsonl"
    with pytest.warns(MalformedRowWarning, match=r"math_sample\.jsonl: skipped 1 of 6") as rec:
        loaded = load_math_file(path)
    assert f"{path}:5: bad JSON" in str(rec[0].message)
    assert isinstance(loaded, LoadedProblems)
    assert len(loaded) == 5 and loaded.num_skipped == 1
    assert [p.answer for p in loaded] == ["\\frac{5}{6}", "4", "9\\pi", "\\{2, 3\\}", "5\\sqrt{2}"]
    first = loaded[0]
    assert first.problem == "What is $\\frac{1}{2} + \\frac{1}{3}$?"
    assert "\\boxed{\\frac{5}{6}}" in first.solution
    assert first.source == f"{path}:1"
    assert first.metadata == {"level": "Level 1", "type": "Prealgebra"}
    assert loaded[4].source == f"{path}:6"  # line numbers count the skipped line


def test_math500_prefers_answer_field_and_skips_empty_answer():
    with pytest.warns(
        MalformedRowWarning, match=r"math500_sample\.jsonl:4: missing or empty answer"
    ):
        loaded = load_math_file(DATA / "math500_sample.jsonl")
    assert [p.answer for p in loaded] == ["15", "\\dfrac{1}{3}", "10"]
    assert loaded[0].metadata["unique_id"] == "test/counting_and_probability/1.json"


def test_gsm8k_extracts_after_hashes_and_skips_missing_question():
    with pytest.warns(
        MalformedRowWarning, match=r"gsm8k_sample\.jsonl:4: missing or empty problem"
    ):
        loaded = load_math_file(DATA / "gsm8k_sample.jsonl")
    assert [p.answer for p in loaded] == ["10", "20", "1,000"]
    assert loaded[0].problem.startswith("Tom has 3 boxes")
    assert loaded[0].solution.endswith("#### 10")


def test_aime_integer_answers_and_capitalized_fields():
    with pytest.warns(MalformedRowWarning, match=r"aime_sample\.jsonl:3"):
        loaded = load_math_file(DATA / "aime_sample.jsonl")
    assert [p.answer for p in loaded] == ["24", "24"]
    assert loaded[1].problem == "How many positive divisors does $360$ have?"
    assert loaded[0].metadata == {"id": "2024-I-1"}


def test_directory_of_json_files_original_math_layout():
    with pytest.warns(MalformedRowWarning, match=r"algebra/2\.json:1: missing or empty answer"):
        loaded = load_math_file(DATA / "math_json")
    assert [p.answer for p in loaded] == ["4"]
    assert loaded.num_skipped == 1


def test_clean_file_gives_no_warning(tmp_path):
    path = tmp_path / "clean.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_math_file(path)
    assert [p.answer for p in loaded] == ["2"] and loaded.num_skipped == 0


def test_json_list_and_bad_json_file(tmp_path):
    good = tmp_path / "list.json"
    good.write_text(json.dumps([{"problem": "p", "answer": 3}, "not a row"]))
    with pytest.warns(MalformedRowWarning, match=r"list\.json:2: expected an object"):
        assert [p.answer for p in load_math_file(good)] == ["3"]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.warns(MalformedRowWarning, match=r"bad\.json:1: bad JSON"):
        assert len(load_math_file(bad)) == 0


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_math_file(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("problem,answer\n")
    with pytest.raises(
        ValueError, match=r"unsupported file type '\.csv'.*\.jsonl, \.json, \.parquet"
    ):
        load_math_file(tmp_path / "data.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.jsonl, \.json, \.parquet files under"):
        load_math_file(tmp_path / "empty")


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [
        {"problem": "What is 2+2?", "solution": "It is $\\boxed{4}$.", "answer": "4"},
        {"problem": "Empty answer", "solution": "none", "answer": ""},
    ]
    path = tmp_path / "math.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.warns(MalformedRowWarning, match=r"math\.parquet:2"):
        loaded = load_math_file(path)
    assert [p.answer for p in loaded] == ["4"]


def test_parquet_without_pyarrow_names_the_package(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "math.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_math_file(path)


def test_optional_loaders_name_their_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"erpo_jax\[hf\]"):
        load_hf_dataset("HuggingFaceH4/MATH-500")
    with pytest.raises(ImportError, match=r"erpo_jax\[tfds\]"):
        load_tfds_dataset("huggingface:openai__gsm8k/main")


def test_problems_from_rows_counts_every_row():
    rows = [
        {"problem": "a", "answer": "1"},
        None,
        {"problem": "b"},
        {"problem": "c", "solution": "\\boxed{2}"},
    ]
    with pytest.warns(MalformedRowWarning, match=r"rows: skipped 2 of 4 .*rows:2.*rows:3"):
        loaded = problems_from_rows(rows, name="rows")
    assert [p.answer for p in loaded] == ["1", "2"]
    assert [s.source for s in loaded.skipped] == ["rows:2", "rows:3"]


# ------------------------------------------------------------------ templates


def test_plain_and_qwen_math_templates():
    assert format_math_prompt("What is 1+1?") == f"What is 1+1?\n{QWEN_MATH_INSTRUCTION}\n"
    qwen = format_math_prompt("What is 1+1?", template="qwen_math")
    assert qwen.startswith(f"<|im_start|>system\n{QWEN_MATH_INSTRUCTION}<|im_end|>\n")
    assert qwen.endswith("<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n")
    assert format_math_prompt("q", template="qwen_math", think=True).endswith(
        "assistant\n<think>\n"
    )
    with pytest.raises(ValueError, match="unknown template 'alpaca'"):
        format_math_prompt("q", template="alpaca")
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        format_math_prompt("q", template="chat")


class _ChatTokenizer:
    """Stands in for a transformers tokenizer: records the chat-template call."""

    chat_template = "{{ messages }}"

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, **kwargs):
        self.calls.append((messages, kwargs))
        return "<chat>" + messages[-1]["content"] + "</chat>"


def test_chat_template_is_used_when_the_tokenizer_has_one():
    tok = _ChatTokenizer()
    text = format_math_prompt("What is 1+1?", tokenizer=tok, system_prompt="Be brief.", think=True)
    assert text == f"<chat>What is 1+1?\n{QWEN_MATH_INSTRUCTION}</chat><think>\n"
    messages, kwargs = tok.calls[0]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert kwargs == {"tokenize": False, "add_generation_prompt": True, "enable_thinking": True}


def test_real_chat_template_with_transformers(tmp_path):
    from erpo_jax.tasks import build_countdown_tokenizer

    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(build_countdown_tokenizer(tmp_path))
    assert format_math_prompt("q", tokenizer=tok) == f"q\n{QWEN_MATH_INSTRUCTION}\n"  # no template
    tok.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert (
        format_math_prompt("q", tokenizer=tok)
        == f"<|user|>q\n{QWEN_MATH_INSTRUCTION}\n<|assistant|>"
    )
