"""Triton kernels and their launchers (tensors in, tensors out; no autograd)."""
