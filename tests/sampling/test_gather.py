"""The sampler's parameter gather over fsdp: which mesh axes a gathered leaf keeps.

(On 8 simulated devices, tests/distributed/multidevice_hlo.py checks that the
gathered decode loop has no array collectives and gives the sharded outputs.)
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from erpo_jax.sampling import GATHER_FRACTION, gathered_layout
from erpo_jax.sampling._sampler import _without_fsdp


def test_without_fsdp_drops_only_the_fsdp_axis():
    P = PartitionSpec
    assert _without_fsdp(P(None, "fsdp", "tensor")) == P(None, None, "tensor")
    assert _without_fsdp(P("tensor", "fsdp")) == P("tensor", None)
    assert _without_fsdp(P(("data", "fsdp"), None)) == P("data", None)
    assert _without_fsdp(P(("fsdp",), "tensor")) == P(None, "tensor")
    assert _without_fsdp(
        P(
            ("data", "fsdp", "tensor"),
        )
    ) == P(("data", "tensor"))
    assert _without_fsdp(P()) == P()


def test_no_gather_without_an_fsdp_axis_or_placed_params():
    one = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    params = {"w": jax.numpy.ones((4, 4))}
    assert gathered_layout(params, one, True) is None  # fsdp is 1: nothing to gather
    assert gathered_layout(params, None, True) is None
    assert 0 < GATHER_FRACTION < 1
