"""Data loading and transforms (numpy + OpenCV; no JAX import)."""
