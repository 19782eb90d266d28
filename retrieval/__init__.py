"""casebase: case-based retrieval explanations for medical images.

`from retrieval import CaseRetriever` is the service the CLI and the app use.
"""

from __future__ import annotations

__all__ = ["CaseRetriever"]


def __getattr__(name: str):
    # Lazy so that `casebase validate` does not pay for importing torch.
    if name == "CaseRetriever":
        from retrieval.service.retriever import CaseRetriever

        return CaseRetriever
    raise AttributeError(name)
