"""The query service: ``CaseRetriever`` (``retriever``), its typed results
(``results``), the per-image forward pass it shares with the explainers
(``context``), the "I don't know" flag (``ood``) and offline retrieval
quality (``evaluate``). ``from retrieval import CaseRetriever`` is the public import.
"""
