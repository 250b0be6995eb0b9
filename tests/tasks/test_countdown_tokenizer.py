"""The toy tokenizer: HF files, AutoTokenizer loading, exact round trips."""

from __future__ import annotations

import json

import pytest

from erpo_jax.tasks import (
    COUNTDOWN_SPECIAL_TOKENS,
    build_countdown_tokenizer,
    countdown_prompt,
    generate_countdown,
    solve_countdown,
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return build_countdown_tokenizer(tmp_path_factory.mktemp("toy_tokenizer"))


def test_files_and_special_tokens(tokenizer_dir):
    assert (tokenizer_dir / "tokenizer.json").exists()
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    for key, token in COUNTDOWN_SPECIAL_TOKENS.items():
        assert config[key] == token
    assert config["padding_side"] == "left"


def test_tokenizers_library_round_trip(tokenizer_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == 100
    encoding = tok.encode("Target: 24\n")
    assert encoding.tokens[0] == "<bos>"
    assert encoding.tokens[1:] == list("Target: 24\n")
    assert tok.decode(encoding.ids) == "Target: 24\n"


def test_auto_tokenizer_round_trips_countdown_text(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    for problem in generate_countdown(20, seed=0, level="hard"):
        prompt = countdown_prompt(problem)
        answer = f"Answer: {solve_countdown(problem.numbers, problem.target)}"
        for text in (prompt, answer, prompt + answer):
            ids = tok(text)["input_ids"]
            assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
            assert len(ids) == len(text) + 1  # one token per character
            assert tok.decode(ids, skip_special_tokens=True) == text
            assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # Every printable ASCII character round-trips; anything else becomes <unk>.
    ascii_text = "".join(chr(c) for c in range(32, 127)) + "\n"
    assert tok.decode(tok(ascii_text)["input_ids"], skip_special_tokens=True) == ascii_text
    assert tok("é", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_left_padding(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    batch = tok(["12", "1234"], padding=True)
    assert batch["input_ids"][0][:2] == [0, 0]
    assert batch["attention_mask"][0] == [0, 0, 1, 1, 1]
