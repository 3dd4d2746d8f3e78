"""End-to-end recipes built from the stages: the demo and the paper reproductions."""
