"""Data sources: each turns a `DataConfig` into a `Source` of {id, label, split, path|image}
(and `offset`, `size` where a path's image is a byte range of a shard)."""

from raylt.data.source import SOURCES, Source, load_source

# Importing the modules registers their sources.
from raylt.data import cifar, demo, folder, inat, parquet_images, splitfile, webdataset  # noqa: E402,F401

__all__ = ["SOURCES", "Source", "load_source"]
