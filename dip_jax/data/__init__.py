"""Samples, their metadata, packing and the grain input pipelines.

`metadata`, `packing`, `oversize`, `synthetic`, `digits` and `stream` (batch index -> packed
microbatches) are numpy-only, so the planner packs metadata exactly as the trainer packs
samples without importing an input pipeline; `files` reads conversation records, media and a
real tokenizer from disk (the files task); `pipeline` adds grain and collation.
"""
