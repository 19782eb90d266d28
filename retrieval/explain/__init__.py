"""Explanation methods behind one protocol (see retrieval.explain.registry)."""
