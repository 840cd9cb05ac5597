"""Hugging Face integration (transformers 5.x): cache, attention hook, model patches."""
