"""The planner: pure Python + numpy. Never imports jax."""
