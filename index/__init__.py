"""Vector index (FAISS behind factory strings), case store, and bundle I/O."""
