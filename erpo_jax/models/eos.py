"""One rule for the ids that end a completion.

A checkpoint names its end-of-sequence ids in three places that disagree
for chat models: ``config.json`` (``eos_token_id``, often the base model's
``<|endoftext|>``), ``generation_config.json`` (chat models list their
end-of-turn id here too) and the tokenizer (``eos_token_id``, and the chat
template's end-of-turn token such as ChatML's ``<|im_end|>``). A completion
ends at any of them, so :func:`resolve_eos_ids` takes their union.
"""

from __future__ import annotations

import json
import os
from typing import Any

from erpo_jax.models.config import ModelConfig

__all__ = ["END_OF_TURN_TOKENS", "resolve_eos_ids"]

END_OF_TURN_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>")
"""End-of-turn tokens of common chat templates (ChatML, Llama 3); used when the
tokenizer's chat template contains them."""


def _ids(value: Any) -> list[int]:
    values = value if isinstance(value, list | tuple) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def resolve_eos_ids(
    config: ModelConfig,
    tokenizer: Any = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> tuple[int, ...]:
    """The sorted ids that end a completion: the union of every source the checkpoint has.

    Sources: ``config.eos_token_ids``; ``generation_config.json``'s
    ``eos_token_id`` in ``checkpoint_dir``; the tokenizer's ``eos_token_id``;
    and each of :data:`END_OF_TURN_TOKENS` that appears in the tokenizer's
    chat template. Ids outside the vocabulary are dropped.
    """
    ids = set(config.eos_token_ids)
    if checkpoint_dir is not None:
        path = os.path.join(os.fspath(checkpoint_dir), "generation_config.json")
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    ids.update(_ids(json.load(f).get("eos_token_id")))
            except (OSError, ValueError, AttributeError):
                pass  # an unreadable generation config adds nothing
    if tokenizer is not None:
        ids.update(_ids(getattr(tokenizer, "eos_token_id", None)))
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, str):
            for token in END_OF_TURN_TOKENS:
                if token in template:
                    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
                    tid = convert(token) if convert is not None else None
                    unk = getattr(tokenizer, "unk_token_id", None)
                    if isinstance(tid, int) and tid != unk:
                        ids.add(tid)
    return tuple(sorted(i for i in ids if 0 <= i < config.vocab_size))
