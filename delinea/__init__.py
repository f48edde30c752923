"""delinea: MedDelinea medical image segmentation with a Control DiT over a frozen latent DiT.

``delinea.Segmenter`` segments scans from Python (:mod:`delinea.segmenter`); ``delinea`` on the command line trains,
tests and predicts (:mod:`delinea.main`). The Segmenter is imported on first use, so ``import delinea`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from delinea.segmenter import Segmenter


def __getattr__(name: str) -> Any:
    if name == "Segmenter":
        from delinea.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'delinea' has no attribute {name!r}")


__all__ = ["Segmenter", "__version__"]
