"""Explanation methods behind one protocol (see retrieval.explain.registry).

    from retrieval.explain import registry, explain_query
    registry.check_names(["gradcam", "lime"])       # CasebaseError for unknown names
    registry.get("occlusion").attribute(model, inputs, target)

``explain_query`` (retrieval.explain.pipeline) fills a query result's maps;
``retrieval.explain.trust`` measures how far each method can be trusted;
``retrieval.explain.similarity`` is the exact similarity decomposition.
Captum is imported only when a method runs.
"""

from retrieval.explain import registry
from retrieval.explain.pipeline import explain_query

__all__ = ["registry", "explain_query"]
