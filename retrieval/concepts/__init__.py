"""Concept tests (TCAV) for the classifier and for retrieval, and concept-refined search."""

from retrieval.concepts.store import refine, stored_concepts
from retrieval.concepts.tcav import ConceptsResult, run_concepts

__all__ = ["ConceptsResult", "refine", "run_concepts", "stored_concepts"]
