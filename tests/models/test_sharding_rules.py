"""The parameter sharding rule (``param_partition_spec``) on abstract meshes: tensor-parallel
splits of the attention projections keep whole heads."""

from __future__ import annotations

import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from erpo_jax.models import param_partition_spec

L, D, HD = 2, 2048, 128  # Qwen3-1.7B-like: 16 query heads, 8 KV heads, head_dim 128


def _mesh(fsdp: int, tensor: int) -> AbstractMesh:
    return AbstractMesh((1, fsdp, tensor), ("data", "fsdp", "tensor"))


@pytest.mark.parametrize(
    ("name", "shape", "tensor", "expected"),
    [
        # 16 query heads over 4: whole heads per shard
        ("q_proj", (L, D, 16 * HD), 4, PartitionSpec(None, "fsdp", "tensor")),
        ("o_proj", (L, 16 * HD, D), 4, PartitionSpec(None, "tensor", "fsdp")),
        # 8 KV heads over 4: 2 heads per shard
        ("k_proj", (L, D, 8 * HD), 4, PartitionSpec(None, "fsdp", "tensor")),
        # 2 KV heads over 4: 256 columns divide by 4, but a split would cut each
        # head in half; the projection is replicated over tensor instead
        ("k_proj", (L, D, 2 * HD), 4, PartitionSpec(None, "fsdp", None)),
        ("v_proj", (L, D, 2 * HD), 4, PartitionSpec(None, "fsdp", None)),
        # 6 query heads over 4 (768 columns divide by 4): replicated, not cut
        ("q_proj", (L, D, 6 * HD), 4, PartitionSpec(None, "fsdp", None)),
        ("o_proj", (L, 6 * HD, D), 4, PartitionSpec(None, None, "fsdp")),
        # MLP width is not made of heads: any even split
        ("gate_proj", (L, D, 6144), 4, PartitionSpec(None, "fsdp", "tensor")),
        ("down_proj", (L, 6144, D), 4, PartitionSpec(None, "tensor", "fsdp")),
    ],
)
def test_tensor_splits_keep_whole_heads(name, shape, tensor, expected):
    mesh = _mesh(2, tensor)
    assert param_partition_spec(("layers", name), shape, mesh, head_dim=HD) == expected


def test_without_head_dim_the_rule_only_checks_divisibility():
    # The old behaviour, kept for callers that know no head_dim: it would cut heads.
    spec = param_partition_spec(("layers", "k_proj"), (L, D, 2 * HD), _mesh(1, 4))
    assert spec == PartitionSpec(None, "fsdp", "tensor")
