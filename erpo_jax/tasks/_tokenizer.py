"""A character-level tokenizer for the toy task, in the Hugging Face file format.

One token per printable ASCII character plus newline, and four special
tokens. It is saved as ``tokenizer.json`` (the ``tokenizers`` library's
format) with a ``tokenizer_config.json`` naming the special tokens, so the
toy model's directory loads through ``transformers.AutoTokenizer`` exactly
like a Qwen checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["COUNTDOWN_SPECIAL_TOKENS", "build_countdown_tokenizer"]

COUNTDOWN_SPECIAL_TOKENS: dict[str, str] = {
    "pad_token": "<pad>",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "unk_token": "<unk>",
}
"""Special tokens of the toy tokenizer; their ids are 0, 1, 2, 3 in this order."""

_CHARACTERS = ["\n"] + [chr(c) for c in range(32, 127)]


def build_countdown_tokenizer(out_dir: str | Path, *, model_max_length: int = 512) -> Path:
    """Build the character-level toy tokenizer and save it in ``out_dir``.

    Vocabulary: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then
    newline and the 95 printable ASCII characters (100 tokens). Encoding
    prepends ``<bos>`` (``add_special_tokens=True``, the default) and never
    appends ``<eos>``: prompts are continued, and training targets append
    ``eos_token_id`` themselves. Any other character encodes as ``<unk>``.
    Padding is on the left, as the sampler expects. Decoding concatenates
    characters, so ASCII text round-trips exactly.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` and
    ``special_tokens_map.json``; load them with
    ``transformers.AutoTokenizer.from_pretrained(out_dir)`` or
    ``tokenizers.Tokenizer.from_file(out_dir / "tokenizer.json")``.

    Args:
      out_dir: directory to write (created if missing; files are overwritten).
      model_max_length: the longest sequence the toy model handles.

    Returns:
      ``out_dir`` as a Path.
    """
    from tokenizers import Tokenizer, decoders, models, processors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special = list(COUNTDOWN_SPECIAL_TOKENS.values())
    vocab = {token: i for i, token in enumerate(special + _CHARACTERS)}
    # BPE without merges is a character-level model: every character is its own word piece.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.add_special_tokens(special)
    tokenizer.decoder = decoders.Fuse()
    bos = COUNTDOWN_SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **COUNTDOWN_SPECIAL_TOKENS,
        "add_bos_token": True,
        "add_eos_token": False,
        "padding_side": "left",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps(COUNTDOWN_SPECIAL_TOKENS, indent=2) + "\n"
    )
    return out
