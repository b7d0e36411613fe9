"""Sequence lifecycle and the state arena: where each live sequence's (h, c) lives."""
