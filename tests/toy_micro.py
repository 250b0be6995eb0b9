"""The toy-model recipe the tests build: small enough to train in seconds on CPU."""

from erpo_jax.train import ToyModelRecipe

MICRO = ToyModelRecipe(
    num_train_problems=64,
    num_eval_problems=8,
    num_layers=1,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    num_kv_heads=1,
    steps=30,
    batch_size=16,
    learning_rate=1e-2,
    warmup_steps=3,
)
