"""Iris-compatible client pieces for iris-worker's interop tier (not Iris's code)."""
