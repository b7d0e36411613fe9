"""How a bundled model's tensors are named and described to clients."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Signature:
    input_name: str
    output_name: str
    description: str
    parameters: tuple[tuple[str, str], ...] = ()
    """Extra `parameters` entries for config.pbtxt (a vocabulary, labels, a unit)."""
