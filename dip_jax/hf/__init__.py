"""Hugging Face checkpoints: import (config.json + safetensors -> a module's config and
parameters), export (parameters -> a directory transformers loads) and the forward checker.
One name table per family (families.py); imports models/ and config/, never runtime/ or train/."""
