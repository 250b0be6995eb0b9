"""Load and save Hugging Face checkpoint directories (config.json + safetensors).

``load_hf_checkpoint`` reads ``config.json`` and either ``model.safetensors``
or the shards listed in ``model.safetensors.index.json``. Tensors are memory
mapped and every parameter is built with ``jax.make_array_from_callback``:
with a ``mesh``, each device reads only the bytes of its own shard, so no
full host copy of the model is ever made. Every expected tensor is checked
(present, right shape) before any is read, and a problem is an error that
names the tensor, the file and both shapes.

``save_hf_checkpoint`` writes a directory that ``transformers``
``AutoModelForCausalLM.from_pretrained`` loads, with LoRA adapters merged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from erpo_jax.models._safetensors import SafetensorsFile, write_safetensors
from erpo_jax.models.config import ModelConfig
from erpo_jax.models.decoder import Decoder, check_dtype, layer_param_shapes
from erpo_jax.models.lora import merged_layer_arrays

__all__ = ["load_hf_checkpoint", "load_tokenizer", "param_partition_spec", "save_hf_checkpoint"]

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"

# Our stacked per-layer name -> (HF name inside ``model.layers.{i}.``, is a transposed linear).
_HF_LAYER: dict[str, tuple[str, bool]] = {
    "attn_norm": ("input_layernorm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    **{f"{p}_proj": (f"self_attn.{p}_proj.weight", True) for p in "qkvo"},
    **{f"{p}_proj_bias": (f"self_attn.{p}_proj.bias", False) for p in "qkvo"},
    **{f"{p}_proj": (f"mlp.{p}_proj.weight", True) for p in ("gate", "up", "down")},
    **{f"{p}_proj_bias": (f"mlp.{p}_proj.bias", False) for p in ("gate", "up", "down")},
}


@dataclass(frozen=True)
class _Tensor:
    """Where one model parameter lives in a HF checkpoint."""

    path: tuple[str, ...]  # attribute path in the Decoder
    hf_names: tuple[str, ...]  # one per layer for stacked params, else one
    transpose: bool  # HF stores Linear weights as [out, in]
    shape: tuple[int, ...]  # our full shape ([L, ...] when stacked)
    stacked: bool

    def hf_shape(self) -> tuple[int, ...]:
        shape = self.shape[1:] if self.stacked else self.shape
        return tuple(reversed(shape)) if self.transpose else shape


def _tensors(config: ModelConfig) -> list[_Tensor]:
    v, d, n = config.vocab_size, config.hidden_size, config.num_layers
    out = [_Tensor(("embed",), ("model.embed_tokens.weight",), False, (v, d), False)]
    for name, shape in layer_param_shapes(config).items():
        hf, transpose = _HF_LAYER[name]
        names = tuple(f"model.layers.{i}.{hf}" for i in range(n))
        out.append(_Tensor(("layers", name), names, transpose, (n, *shape), True))
    out.append(_Tensor(("final_norm",), ("model.norm.weight",), False, (d,), False))
    if not config.tie_word_embeddings:
        out.append(_Tensor(("lm_head",), ("lm_head.weight",), True, (d, v), False))
    return out


_HEAD_SIDE = {"q_proj": -1, "k_proj": -1, "v_proj": -1, "o_proj": -2}
"""The axis of each attention projection that holds ``heads * head_dim``."""


def param_partition_spec(
    path: tuple[str, ...], shape: tuple[int, ...], mesh: Any, *, head_dim: int | None = None
) -> PartitionSpec:
    """Sharding of one parameter on a mesh with (some of) the axes ``fsdp`` and ``tensor``.

    Matmul weights shard their input side over ``fsdp`` and their output side
    (heads, MLP width, vocab) over ``tensor``; the layer axis, norms and
    biases are replicated. An axis the mesh lacks, or that does not divide
    the dimension, is dropped.

    With ``head_dim``, the heads axis of ``q/k/v_proj`` (output side) and
    ``o_proj`` (input side) is split over ``tensor`` only in whole heads: when
    the number of heads (e.g. ``num_kv_heads`` for ``k/v_proj``) does not
    divide by the tensor axis, that projection is replicated over ``tensor``
    rather than cut through ``head_dim``.

    ``mesh`` is a ``Mesh`` or an ``AbstractMesh`` (only axis names and sizes are read).
    """
    name = path[-1]
    if name == "embed":
        axes: tuple[str | None, ...] = ("tensor", "fsdp")
    elif name == "lm_head":
        axes = ("fsdp", "tensor")
    elif name in ("o_proj", "down_proj"):
        axes = (None, "tensor", "fsdp")
    elif name.endswith("_proj"):
        axes = (None, "fsdp", "tensor")
    else:
        axes = (None,) * len(shape)
    sizes = dict(mesh.shape)
    units = list(shape)  # what a split must divide: the dimension, or its heads
    if head_dim and name in _HEAD_SIDE and len(shape) >= 2:
        side = _HEAD_SIDE[name] % len(shape)
        units[side] = shape[side] // head_dim if shape[side] % head_dim == 0 else 1
    axes = tuple(
        a if a in sizes and unit % sizes[a] == 0 else None
        for a, unit in zip(axes, units, strict=True)
    )
    return PartitionSpec(*axes)


def _open_weights(directory: str) -> dict[str, SafetensorsFile]:
    """Tensor name -> the file holding it, for a single-file or sharded checkpoint."""
    index_path = os.path.join(directory, _INDEX)
    single_path = os.path.join(directory, _SINGLE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files: dict[str, SafetensorsFile] = {}
        for tensor_name, file_name in weight_map.items():
            if file_name not in files:
                file_path = os.path.join(directory, file_name)
                if not os.path.isfile(file_path):
                    raise FileNotFoundError(
                        f"{_INDEX} maps tensor {tensor_name!r} to {file_name!r}, "
                        f"which does not exist in {directory!r}"
                    )
                files[file_name] = SafetensorsFile(file_path)
        return {t: files[fn] for t, fn in weight_map.items()}
    if os.path.isfile(single_path):
        st = SafetensorsFile(single_path)
        return dict.fromkeys(st.keys(), st)
    raise FileNotFoundError(f"no {_SINGLE} or {_INDEX} in checkpoint directory {directory!r}")


_FLOAT_CODES = ("F32", "BF16", "F16", "F64")


def _check(spec: _Tensor, weights: dict[str, SafetensorsFile], directory: str) -> None:
    expected = spec.hf_shape()
    for hf_name in spec.hf_names:
        if hf_name not in weights:
            raise KeyError(
                f"tensor {hf_name!r} (expected shape {expected}) is missing from the "
                f"checkpoint in {directory!r}"
            )
        if hf_name not in weights[hf_name]:
            raise KeyError(
                f"tensor {hf_name!r} is listed in {_INDEX} but missing from "
                f"{os.path.basename(weights[hf_name].path)!r}"
            )
        code = weights[hf_name].dtype_name(hf_name)
        if code not in _FLOAT_CODES:
            raise ValueError(
                f"tensor {hf_name!r} in {os.path.basename(weights[hf_name].path)!r} has dtype "
                f"{code}; only unquantized float weights load ({', '.join(_FLOAT_CODES)}): "
                "dequantize int8/float8 checkpoints first"
            )
        got = weights[hf_name].shape(hf_name)
        if got != expected:
            raise ValueError(
                f"tensor {hf_name!r} in {os.path.basename(weights[hf_name].path)!r} has shape "
                f"{got}, but config.json implies {expected}"
            )


def _reader(spec: _Tensor, weights: dict[str, SafetensorsFile], dtype: np.dtype):
    """The ``make_array_from_callback`` callback: the numpy block of one shard."""

    def read(hf_name: str) -> np.ndarray:
        t = weights[hf_name].tensor(hf_name)
        return t.T if spec.transpose else t

    def callback(index: tuple[slice, ...] | None) -> np.ndarray:
        index = index if index is not None else (slice(None),) * len(spec.shape)
        if spec.stacked:
            layers = range(spec.shape[0])[index[0]]
            block = np.stack([np.asarray(read(spec.hf_names[i])[index[1:]], dtype) for i in layers])
        else:
            block = np.asarray(read(spec.hf_names[0])[index], dtype)
        return block

    return callback


def load_hf_checkpoint(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    mesh: Mesh | None = None,
    scan_layers: bool = False,
    remat: bool = False,
    attention_impl: str = "auto",
    attention_block: int = 512,
    residual_sharding: jax.sharding.Sharding | None = None,
    attention_mesh: jax.sharding.Mesh | None = None,
) -> tuple[Decoder, ModelConfig]:
    """Loads a Hugging Face Llama 3 / Qwen2 / Qwen3 checkpoint directory.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` or
        ``model.safetensors.index.json`` plus its shards.
      dtype: compute dtype of the model.
      param_dtype: storage dtype of the parameters (default: ``dtype``); the
        checkpoint's dtype is converted shard by shard.
      mesh: optional ``jax.sharding.Mesh``; parameters are placed with
        :func:`param_partition_spec` and each device reads only its shard.
        Without it, parameters go to the default device.
      scan_layers, remat, attention_impl, attention_block, residual_sharding,
      attention_mesh:
        passed to :class:`Decoder`.

    Returns:
      ``(model, config)``.

    Raises:
      FileNotFoundError: missing directory, ``config.json``, weights file or shard.
      KeyError: a tensor the config needs is absent (named, with its expected shape).
      ValueError: unsupported config or dtype (only float32, bfloat16 and
        float16 compute; quantized tensors are refused), or a tensor whose
        shape disagrees with the config (both shapes named).
    """
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    dtype = check_dtype(dtype, "dtype")
    param_dtype = check_dtype(dtype if param_dtype is None else param_dtype, "param_dtype")
    config = ModelConfig.from_hf(directory)
    weights = _open_weights(directory)
    specs = _tensors(config)
    for spec in specs:
        _check(spec, weights, directory)

    model = nnx.eval_shape(
        lambda: Decoder(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            scan_layers=scan_layers,
            remat=remat,
            attention_impl=attention_impl,
            attention_block=attention_block,
            residual_sharding=residual_sharding,
            attention_mesh=attention_mesh,
            rngs=nnx.Rngs(0),
        )
    )
    # This process's first device (multi-host: jax.devices()[0] may be another host's).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    for spec in specs:
        sharding: jax.sharding.Sharding
        if mesh is None:
            sharding = device
        else:
            sharding = NamedSharding(
                mesh,
                param_partition_spec(spec.path, spec.shape, mesh, head_dim=config.head_dim),
            )
        array = jax.make_array_from_callback(
            spec.shape, sharding, _reader(spec, weights, param_dtype)
        )
        _variable(model, spec.path).set_value(array)
    return model, config


def _variable(model: Decoder, path: tuple[str, ...]) -> nnx.Variable:
    obj: Any = model
    for name in path:
        obj = getattr(obj, name)
    return obj


def _hf_arrays(model: Decoder, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy array in HF layout) for every tensor, LoRA merged."""
    layers = merged_layer_arrays(model.layers)
    for spec in _tensors(config):
        if spec.path[0] == "layers":
            value = layers.get(spec.path[1])
        else:
            variable = getattr(model, spec.path[0], None)
            value = None if variable is None else variable[...]
        if value is None:
            raise ValueError(
                f"save_hf_checkpoint: the model has no parameter {'.'.join(spec.path)}"
            )
        if tuple(value.shape) != spec.shape:
            raise ValueError(
                f"save_hf_checkpoint: parameter {'.'.join(spec.path)} has shape "
                f"{tuple(value.shape)}, but the config implies {spec.shape}"
            )
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            # Sharded over several processes: every process gathers the whole
            # tensor (a collective, so every process calls save_hf_checkpoint).
            from jax.experimental import multihost_utils

            value = multihost_utils.process_allgather(value, tiled=True)
        host = np.asarray(jax.device_get(value))
        parts = host if spec.stacked else host[None]
        for hf_name, part in zip(spec.hf_names, parts, strict=True):
            yield hf_name, np.ascontiguousarray(part.T if spec.transpose else part)


def save_hf_checkpoint(
    model: Decoder,
    config: ModelConfig,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Writes ``model`` as a Hugging Face checkpoint directory.

    LoRA adapters, if any, are merged into the written weights (the model is
    not modified). Weights keep the model's ``param_dtype``.

    With parameters sharded over several processes (multi-host), call it on
    every process: each gathers the weights, process 0 writes, and every
    process returns once the files are complete.

    Args:
      model: the decoder.
      config: its config (written as ``config.json``).
      path: output directory (created if needed).
      max_shard_bytes: above this total size, weights are split into
        ``model-0000k-of-0000n.safetensors`` files plus
        ``model.safetensors.index.json``.
    """
    directory = os.fspath(path)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(directory, exist_ok=True)
    try:
        _write_hf_checkpoint(model, config, directory, max_shard_bytes, writer)
    finally:
        if jax.process_count() > 1:  # no process returns before the files are complete
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"save_hf_checkpoint {directory}")


def _write_hf_checkpoint(
    model: Decoder, config: ModelConfig, directory: str, max_shard_bytes: int, writer: bool
) -> None:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    total = 0
    for name, array in _hf_arrays(model, config):
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
        total += array.nbytes
    if not writer:
        return
    if len(shards) == 1:
        write_safetensors(os.path.join(directory, _SINGLE), shards[0])
    else:
        weight_map = {}
        for k, shard in enumerate(shards, start=1):
            file_name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(directory, file_name), shard)
            weight_map.update(dict.fromkeys(shard, file_name))
        with open(os.path.join(directory, _INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf = config.to_hf()
    hf["dtype"] = jnp.dtype(model.param_dtype).name
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


def checkpoint_dir(path: str | os.PathLike, *, label: str) -> Path:
    """``path`` as a Hugging Face checkpoint directory, checked before anything loads.

    Raises:
      FileNotFoundError: ``path`` is not a directory or has no ``config.json``;
        the message starts with ``label`` (the flag or config key that gave it).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{label} {os.fspath(path)!r} is not a directory")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{label} {os.fspath(path)!r} has no config.json (a Hugging Face checkpoint "
            "directory holds config.json, model.safetensors and tokenizer files)"
        )
    return directory


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | os.PathLike):
    """``transformers.AutoTokenizer`` from a local checkpoint directory (no download).

    Raises:
      FileNotFoundError: the directory is missing, or holds no tokenizer
        files (``tokenizer.json`` or a slow tokenizer's vocabulary); the
        message names the directory.
    """
    from transformers import AutoTokenizer

    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"load_tokenizer: {directory!r} is not a directory")
    # Without a vocabulary file AutoTokenizer can still build a tokenizer from
    # tokenizer_config.json alone: an empty one that encodes nothing.
    if not any(os.path.isfile(os.path.join(directory, f)) for f in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"load_tokenizer: {directory!r} has no tokenizer files (one of "
            f"{', '.join(_TOKENIZER_FILES)}); copy them from the model's Hugging Face repository"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"load_tokenizer: no usable tokenizer in {directory!r} (expected tokenizer.json "
            f"and tokenizer_config.json, as Hugging Face checkpoints ship them): {err}"
        ) from err
    if len(tokenizer) == 0:
        raise FileNotFoundError(f"load_tokenizer: the tokenizer in {directory!r} is empty")
    return tokenizer
