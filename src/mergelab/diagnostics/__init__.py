"""Diagnostics of a merge against its parents: weight space (streamed) and function space (probes)."""
