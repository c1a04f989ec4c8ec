"""Samples, their metadata, packing and the grain input pipelines.

`metadata`, `packing`, `synthetic` and `digits` are numpy-only, so the planner can pack
metadata exactly as the trainer packs samples; `pipeline` adds grain.
"""
