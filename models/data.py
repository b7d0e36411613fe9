"""Datasets that are already on the machine: shipped with Python or inside a registry package.

Nothing here downloads. Each loader returns the data with its provenance (where it came from and a
SHA-256 of the exact bytes used), which the model card records.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Provenance:
    source: str
    sha256: str
    description: str


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- characters
# Printable ASCII plus newline; anything else maps to UNK (index 0), so the vocabulary is stable
# across Python versions and clients can encode any text.
UNK = "\x00"
VOCABULARY: tuple[str, ...] = (UNK, "\n", *(chr(c) for c in range(32, 127)))
_INDEX = {ch: i for i, ch in enumerate(VOCABULARY)}


def encode_text(text: str) -> np.ndarray:
    return np.fromiter((_INDEX.get(ch, 0) for ch in text), dtype=np.int64, count=len(text))


def decode_text(ids: np.ndarray) -> str:
    return "".join(VOCABULARY[int(i)] for i in ids)


def python_docs_corpus() -> tuple[str, Provenance]:
    """Python's own reference documentation as shipped in the stdlib (`pydoc_data.topics`)."""
    import pydoc_data.topics as topics
    import sys

    text = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    return text, Provenance(
        source=f"pydoc_data.topics (CPython {sys.version.split()[0]} standard library)",
        sha256=_sha256(text.encode("utf-8")),
        description="Python language reference topics used by help(); English prose and code",
    )


# ---------------------------------------------------------------- sensor series
def elnino_sst() -> tuple[np.ndarray, Provenance]:
    """Monthly sea surface temperature (deg C) in the El Nino 1+2 region, 1950-2010.

    statsmodels' bundled `elnino` dataset: measured by ships and buoys, no gaps.
    """
    import statsmodels
    from statsmodels.datasets import elnino

    frame = elnino.load_pandas().data
    months = frame.drop(columns="YEAR").to_numpy(dtype=np.float32)
    series = np.ascontiguousarray(months.reshape(-1))
    return series, Provenance(
        source=f"statsmodels.datasets.elnino (statsmodels {statsmodels.__version__})",
        sha256=_sha256(series.tobytes()),
        description="Monthly sea surface temperature, El Nino region 1+2, 1950-01..2010-12",
    )


# ---------------------------------------------------------------- digits
def handwritten_digits() -> tuple[np.ndarray, np.ndarray, Provenance]:
    """scikit-learn's bundled 8x8 digits: images [N, 8 rows, 8 pixels] valued 0..16, labels."""
    import sklearn
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)
    labels = bunch.target.astype(np.int64)
    return (
        images,
        labels,
        Provenance(
            source=f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__})",
            sha256=_sha256(images.tobytes() + labels.tobytes()),
            description="UCI optical recognition of handwritten digits, 8x8 images, 10 classes",
        ),
    )
