"""The retrieval protocol: metrics, in-memory and streaming evaluation, the rank kernels and their executors."""
