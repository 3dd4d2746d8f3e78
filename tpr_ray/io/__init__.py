"""Storage, the output lease, image fetch/decode and the Ray session: what talks to the outside."""
