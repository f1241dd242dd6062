"""Where bytes live. A small protocol so other backends can follow; the local filesystem is the one
we ship (it also covers shared filesystems mounted on every node)."""

from shardckpt.storage.local import DataFileWriter, LocalStorage, Storage

__all__ = ["DataFileWriter", "LocalStorage", "Storage"]
