"""The patched LoRA training runtime: per-instance patches for Hugging Face causal LMs."""
