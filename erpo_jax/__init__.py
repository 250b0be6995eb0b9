"""erpo_jax: pure-JAX RL from verifiable rewards, centred on ERPO and the GRPO family.

Subpackages (dependencies point down): ``losses`` (pure loss and credit
functions of arrays), ``ops`` (shared numerics), and, as they land,
``models``, ``sampling``, ``tasks`` and ``train``.
"""

__version__ = "0.1.0"
