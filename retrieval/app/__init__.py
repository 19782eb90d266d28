"""The Streamlit app's page pieces, composed by the repository's ``app.py``.

state (configuration, cached resources, reading an upload), sidebar (query
settings and filters), query (the query input and the answer page),
prediction (the model's answer and the "I don't know" gate), maps (the
explanation maps), neighbor_card (one retrieved case), audit (the audit tab).
Every number comes from :class:`retrieval.service.retriever.CaseRetriever`;
these modules only lay it out.
"""
