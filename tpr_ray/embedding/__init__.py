"""Ray Data embedding: inputs (manifest split, folder, listing), the shard plan, the exactly-once committer, the pipeline."""
