"""Loaded models and the path of one inference request through them.

Sits between the API (which only translates the protocol) and the parts it composes: the
repository, the runtime, the sequence manager and the batcher.
"""
