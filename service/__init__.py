"""rnnserve: a stateful gRPC inference server for recurrent networks exported to ONNX."""

from importlib.metadata import version

__version__ = version("rnnserve")
"""The installed distribution's version: pyproject's [project].version, the one place it is
defined (`make version` changes it and every manifest that names it)."""
