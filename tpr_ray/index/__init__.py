"""faiss indexes over embedding tables, and text search against them."""
