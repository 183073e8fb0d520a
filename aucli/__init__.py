"""aucli: facial Action Unit detection in video with MDHR (Wang et al., CVPR 2024).

Public API: ``load_model``, ``detect`` and ``__version__``. Heavy libraries
(torch, timm, PyAV) are imported only when these are called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "detect"]

if TYPE_CHECKING:
    import torch


def load_model(path: str, device: str = "cpu") -> "torch.nn.Module":
    """Load an aucli checkpoint: the MDHR model in eval mode with ``.metadata`` attached."""
    from .checkpoint import load_model as _load

    return _load(path, device)


if TYPE_CHECKING:
    import pandas


def detect(path: str, checkpoint: str | None = None, **options: Any) -> "pandas.DataFrame":
    """AU table of one video as a DataFrame (one row per frame; metadata in ``.attrs``).

    Options as the command line: device, batch_size, faces, threshold, fps, overlay (a path:
    also write the annotated video), ...
    (see ``aucli.pipeline.detect``).
    """
    from .pipeline import detect as _detect

    return _detect(path, checkpoint, **options)
