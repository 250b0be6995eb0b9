"""Model configuration: one frozen dataclass for every supported decoder family.

Llama 3 / 3.1 / 3.2, Qwen2 / Qwen2.5 and Qwen3 are the same pre-norm decoder
(RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU MLP).
They differ only in a handful of fields, so a family is a set of values of
:class:`ModelConfig`, never a separate model file:

=========  ==============  =========  =======  ===================
family     q/k/v bias      q/k norm   o bias   rope scaling
=========  ==============  =========  =======  ===================
llama      attention_bias  no         same     ``llama3``/``linear``
qwen2      always          no         no       none
qwen3      attention_bias  yes        same     none
=========  ==============  =========  =======  ===================

:meth:`ModelConfig.from_hf` reads a Hugging Face ``config.json`` (a path, a
dict, or a ``transformers`` config object) in either the ``transformers`` 4
layout (``rope_theta``/``rope_scaling``) or the 5 layout
(``rope_parameters``). :data:`PRESETS` holds the sizes people run, usable
without any file (``ModelConfig.preset("qwen3-0.6b")``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["PRESETS", "SUPPORTED_MODEL_TYPES", "ModelConfig", "RopeScaling"]

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-frequency scaling (``rope_scaling`` / ``rope_parameters`` in HF).

    Attributes:
      rope_type: ``"linear"`` (all frequencies divided by ``factor``) or
        ``"llama3"`` (Llama 3.1 long-context scaling: low frequencies divided
        by ``factor``, high ones kept, a smooth ramp in between).
      factor: frequency divisor.
      low_freq_factor, high_freq_factor, original_max_position_embeddings:
        the ``llama3`` ramp parameters (ignored for ``linear``).
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3"):
            raise ValueError(
                f"RopeScaling.rope_type={self.rope_type!r} is not supported; "
                f"expected one of {SUPPORTED_ROPE_TYPES}"
            )
        if not self.factor > 0:
            raise ValueError(f"RopeScaling.factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                "RopeScaling: llama3 needs high_freq_factor > low_freq_factor, got "
                f"high_freq_factor={self.high_freq_factor}, low_freq_factor={self.low_freq_factor}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only language model.

    Attributes:
      model_type: ``"llama"``, ``"qwen2"`` or ``"qwen3"``.
      vocab_size: V, rows of the embedding table.
      hidden_size: D, model width.
      intermediate_size: width of the SwiGLU MLP.
      num_layers: L, decoder blocks.
      num_heads: query heads.
      num_kv_heads: key/value heads (grouped-query attention); divides ``num_heads``.
      head_dim: width of one head (Qwen3 sets it explicitly; otherwise ``D // num_heads``).
      rope_theta: RoPE base wavelength.
      rope_scaling: optional :class:`RopeScaling`.
      rms_norm_eps: epsilon of every RMSNorm.
      tie_word_embeddings: whether the unembedding is the transposed embedding.
      qkv_bias: biases on the q, k and v projections (Qwen2).
      o_bias: bias on the attention output projection.
      mlp_bias: biases on the MLP projections (Llama ``mlp_bias``).
      qk_norm: per-head RMSNorm on queries and keys before RoPE (Qwen3).
      max_position_embeddings: context length the model was trained for.
      bos_token_id, eos_token_ids, pad_token_id: special ids from config.json
        (``eos_token_ids`` is a tuple; HF allows an int or a list).
      sliding_window: keys a sliding-window layer attends to (each query its
        own and the ``sliding_window - 1`` before it), or None.
      sliding_layers: indices of the layers that use it (Qwen2/Qwen3
        ``use_sliding_window``: HF's ``layer_types`` "sliding_attention",
        by default the layers from ``max_window_layers`` on); the others
        attend fully.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"ModelConfig.model_type={self.model_type!r} is not supported; "
                f"expected one of {SUPPORTED_MODEL_TYPES}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"ModelConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not isinstance(self.sliding_layers, tuple) or any(
            not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.num_layers
            for i in self.sliding_layers
        ):
            raise ValueError(
                "ModelConfig.sliding_layers must be a tuple of layer indices in "
                f"[0, num_layers={self.num_layers}), got {self.sliding_layers!r}"
            )
        if self.sliding_layers and (
            not isinstance(self.sliding_window, int)
            or isinstance(self.sliding_window, bool)
            or self.sliding_window < 1
        ):
            raise ValueError(
                "ModelConfig.sliding_window must be a positive int when sliding_layers is set, "
                f"got {self.sliding_window!r}"
            )
        if self.sliding_layers and self.model_type == "llama":
            raise ValueError("ModelConfig: llama has no sliding-window layers (sliding_layers)")
        if not isinstance(self.eos_token_ids, tuple):
            raise ValueError(
                f"ModelConfig.eos_token_ids must be a tuple of ints, got {self.eos_token_ids!r}"
            )

    @property
    def num_params(self) -> int:
        """Number of parameters (embeddings counted once when tied)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        attn = d * (q + 2 * kv) + q * d
        attn += (q + 2 * kv) * self.qkv_bias + d * self.o_bias + 2 * hd * self.qk_norm
        mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
        per_layer = attn + mlp + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + d

    # ------------------------------------------------------------------ HF I/O

    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Any] | Any) -> ModelConfig:
        """Builds a config from a Hugging Face config.

        Args:
          source: a checkpoint directory or a ``config.json`` path, a dict
            parsed from one, or a ``transformers.PretrainedConfig``.

        Raises:
          FileNotFoundError: the directory has no ``config.json``.
          ValueError: invalid JSON, or a required key missing (the file and
            the key named); unsupported ``model_type``, rope scaling type, activation
            or sliding-window attention, each named in the message.
        """
        hf = _read_hf_dict(source)
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json model_type={model_type!r} is not supported; "
                f"expected one of {SUPPORTED_MODEL_TYPES}"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json hidden_act={act!r} is not supported; expected 'silu'")
        window, sliding_layers = _parse_sliding(hf, model_type)
        if hf.get("pretraining_tp", 1) != 1:
            raise ValueError(
                f"config.json pretraining_tp={hf['pretraining_tp']} is not supported; expected 1"
            )

        num_heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        rope_theta, rope_scaling = _parse_rope(hf)
        attention_bias = bool(hf.get("attention_bias", False))
        eos = hf.get("eos_token_id")
        eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        # Qwen2's q/k/v projections always carry a bias and its o_proj never does;
        # Llama and Qwen3 put `attention_bias` on all four.
        qkv_bias = True if model_type == "qwen2" else attention_bias
        o_bias = False if model_type == "qwen2" else attention_bias
        return cls(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            max_position_embeddings=int(hf.get("max_position_embeddings") or 32768),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            pad_token_id=hf.get("pad_token_id"),
            sliding_window=window,
            sliding_layers=sliding_layers,
        )

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict that ``transformers`` reads back to this config."""
        if self.model_type == "qwen2" and (not self.qkv_bias or self.o_bias):
            raise ValueError(
                "ModelConfig: a qwen2 checkpoint has qkv_bias=True and o_bias=False, got "
                f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias}"
            )
        if self.model_type != "qwen2" and self.qkv_bias != self.o_bias:
            raise ValueError(
                f"ModelConfig: {self.model_type} has one attention_bias for q/k/v/o, got "
                f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias}"
            )
        if self.qk_norm != (self.model_type == "qwen3"):
            raise ValueError(
                f"ModelConfig: qk_norm={self.qk_norm} cannot be saved as model_type="
                f"{self.model_type!r} (only qwen3 has q/k norms)"
            )
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_theta": self.rope_theta, **dataclasses.asdict(self.rope_scaling)}
        eos_list = list(self.eos_token_ids)
        eos: int | list[int] | None = None
        if len(eos_list) == 1:
            eos = eos_list[0]
        elif eos_list:
            eos = eos_list
        hf: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type != "qwen2":
            hf["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            hf["mlp_bias"] = self.mlp_bias
        elif self.mlp_bias:
            raise ValueError(f"ModelConfig: mlp_bias=True cannot be saved as {self.model_type!r}")
        if self.sliding_layers:
            sliding = set(self.sliding_layers)
            hf["use_sliding_window"] = True
            hf["sliding_window"] = self.sliding_window
            hf["max_window_layers"] = min(sliding)
            hf["layer_types"] = [
                "sliding_attention" if i in sliding else "full_attention"
                for i in range(self.num_layers)
            ]
        elif self.model_type != "llama":
            hf["use_sliding_window"] = False
        return hf

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A config from :data:`PRESETS` by name, with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


class _HFDict(dict):
    """A parsed ``config.json`` whose missing required keys are named errors, not ``KeyError``."""

    where: str = "config.json"

    def __missing__(self, key: str) -> Any:
        raise ValueError(
            f"{self.where} is missing the key {key!r}, which a "
            f"{self.get('model_type', 'decoder')} config needs"
        )


def _read_hf_dict(source: Any) -> _HFDict:
    if isinstance(source, Mapping):
        out = _HFDict(source)
    elif hasattr(source, "to_dict") and not isinstance(source, (str, os.PathLike)):
        out = _HFDict(source.to_dict())
    else:
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json at {path!r}")
        with open(path) as f:
            try:
                parsed = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(parsed).__name__}")
        out = _HFDict(parsed)
        out.where = path
    return out


_LAYER_TYPES = ("full_attention", "sliding_attention")


def _parse_sliding(hf: Mapping[str, Any], model_type: str) -> tuple[int | None, tuple[int, ...]]:
    """``(sliding_window, sliding_layers)`` as ``transformers`` reads them.

    Qwen2/Qwen3: ``use_sliding_window`` turns the window on (``sliding_window``
    keys, 4096 when absent; None or off: every layer attends fully);
    ``layer_types`` names each layer's attention, and without it the layers
    from ``max_window_layers`` (28 when absent) on slide. Llama has no
    window (its config ignores these keys).
    """
    num_layers = int(hf["num_hidden_layers"])
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        bad = sorted({str(t) for t in layer_types} - set(_LAYER_TYPES))
        if bad or len(layer_types) != num_layers:
            raise ValueError(
                f"config.json layer_types must list one of {_LAYER_TYPES} for each of the "
                f"{num_layers} layers (num_hidden_layers), got {list(layer_types)!r}"
            )
    window = hf.get("sliding_window", 4096)
    if model_type == "llama" or not hf.get("use_sliding_window", False) or window is None:
        return None, ()
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(
            f"config.json sliding_window={window!r} with use_sliding_window=true; expected a "
            "positive sliding_window"
        )
    if layer_types is not None:
        sliding = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    else:
        first = hf.get("max_window_layers", 28)
        sliding = tuple(range(int(28 if first is None else first), num_layers))
    return (window, sliding) if sliding else (None, ())


def _parse_rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either HF layout."""
    params = _HFDict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling")
    if legacy:
        params = _HFDict({**dict(legacy), **params})
    params.where = f"{getattr(hf, 'where', 'config.json')} (rope scaling)"
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"config.json rope scaling type {rope_type!r} is not supported; "
            f"expected one of {SUPPORTED_ROPE_TYPES}"
        )
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, RopeScaling("linear", float(params["factor"]))
    missing = [
        k
        for k in (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        )
        if k not in params
    ]
    if missing:
        raise ValueError(f"config.json llama3 rope scaling is missing {missing}")
    return theta, RopeScaling(
        "llama3",
        float(params["factor"]),
        float(params["low_freq_factor"]),
        float(params["high_freq_factor"]),
        int(params["original_max_position_embeddings"]),
    )


_LLAMA31_ROPE = RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)

PRESETS: dict[str, ModelConfig] = {
    "qwen3-0.6b": ModelConfig(
        "qwen3", 151936, 1024, 3072, 28, 16, 8, 128, rope_theta=1e6,
        tie_word_embeddings=True, qk_norm=True, max_position_embeddings=40960,
        bos_token_id=151643, eos_token_ids=(151645,),
    ),
    "qwen3-1.7b": ModelConfig(
        "qwen3", 151936, 2048, 6144, 28, 16, 8, 128, rope_theta=1e6,
        tie_word_embeddings=True, qk_norm=True, max_position_embeddings=40960,
        bos_token_id=151643, eos_token_ids=(151645,),
    ),
    "qwen3-4b": ModelConfig(
        "qwen3", 151936, 2560, 9728, 36, 32, 8, 128, rope_theta=1e6,
        tie_word_embeddings=True, qk_norm=True, max_position_embeddings=40960,
        bos_token_id=151643, eos_token_ids=(151645,),
    ),
    "qwen3-8b": ModelConfig(
        "qwen3", 151936, 4096, 12288, 36, 32, 8, 128, rope_theta=1e6,
        tie_word_embeddings=False, qk_norm=True, max_position_embeddings=40960,
        bos_token_id=151643, eos_token_ids=(151645,),
    ),
    "qwen2.5-math-1.5b": ModelConfig(
        "qwen2", 151936, 1536, 8960, 28, 12, 2, 128, rope_theta=10000.0,
        tie_word_embeddings=True, qkv_bias=True, max_position_embeddings=4096,
        bos_token_id=151643, eos_token_ids=(151643,),
    ),
    "qwen2.5-math-7b": ModelConfig(
        "qwen2", 152064, 3584, 18944, 28, 28, 4, 128, rope_theta=10000.0,
        tie_word_embeddings=False, qkv_bias=True, max_position_embeddings=4096,
        bos_token_id=151643, eos_token_ids=(151643,),
    ),
    "llama3.2-1b": ModelConfig(
        "llama", 128256, 2048, 8192, 16, 32, 8, 64, rope_theta=500000.0,
        rope_scaling=_LLAMA31_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=131072, bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
    ),
    "llama3.2-3b": ModelConfig(
        "llama", 128256, 3072, 8192, 28, 24, 8, 128, rope_theta=500000.0,
        rope_scaling=_LLAMA31_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=131072, bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
    ),
}  # fmt: skip
"""Published sizes (from each model's config.json), for ``plan`` and random-weight benchmarks."""
