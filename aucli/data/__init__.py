"""Datasets: the standard list layout, clip sampling, augmentation, prepare and synthetic data."""

from .layout import FORMATS, DatasetFormat, Split, get_format, load_split, write_split

__all__ = ["FORMATS", "DatasetFormat", "Split", "get_format", "load_split", "write_split"]
