"""Flax NNX modules. They know nothing of meshes or schedules."""
