"""Fused kernels for the runtime, each with a PyTorch reference beside it."""
