"""Training: state, reference step, checkpoints, metrics and the `python -m dip_jax.train` CLI."""
