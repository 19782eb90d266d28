"""The shortcut audit: is retrieval matching on the lesion, or on site, scanner or patient?

One module per job: ``attributes`` (selection and binning), ``concordance``
(neighbour attribute sharing vs a label-preserving permutation null),
``probe`` (within-label linear probe of the embeddings), ``verdict`` (the
flag rule), ``groups`` (precision@5 per group), ``counterfactual`` (similarity
inside the lesion; retrieval with lesion / background removed), ``leakage``
(duplicates and patient overlap), ``examples`` (worst cases, rendered),
``report`` (the self-contained HTML) and ``runner`` (all of it, in order).
"""

__all__ = ["AuditResult", "run_audit"]


def __getattr__(name):  # lazy: the statistics modules must not pay for torch
    if name in __all__:
        from retrieval.audit import runner

        return getattr(runner, name)
    raise AttributeError(name)
