"""Triton kernels used by ktinject's optimized operators."""
