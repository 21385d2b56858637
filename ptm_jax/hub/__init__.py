"""Checkpoint conversion in and out of transformers' format, safetensors I/O, tokenizers."""
