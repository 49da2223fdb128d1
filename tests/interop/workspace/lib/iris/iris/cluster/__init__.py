"""Cluster types."""
