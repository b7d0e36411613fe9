"""The sequence batcher: concurrent steps of many sequences as one model call."""
