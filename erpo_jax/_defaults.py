"""Defaults shared by the CLI and the trainer's config, importable without JAX.

``erpo_jax.cli`` builds its argument parser from these; importing them from
``erpo_jax.train`` instead would load the whole trainer (orbax, optax, JAX,
about 3 s) for every ``erpo-jax`` invocation, ``--help`` included.
"""

# JAX's persistent compilation cache of `erpo-jax train` and `erpo-jax eval`.
DEFAULT_COMPILATION_CACHE_DIR = "~/.cache/erpo_jax/xla"
