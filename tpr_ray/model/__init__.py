"""A trained model as files and as encoders: checkpoints, encoding, pixel transforms."""
