"""Where bytes live: the ``Storage`` protocol that every path uses, and its backends (a local or
shared POSIX directory; S3 and S3-compatible object stores). ``open_storage`` picks the backend
from a path or URL; the S3 client is imported only when an ``s3://`` location is opened."""

from shardckpt.storage.base import DataWriter, Storage, StorageLock
from shardckpt.storage.local import DataFileWriter, LocalStorage
from shardckpt.storage.resolve import Location, open_storage, parse_location
from shardckpt.storage.s3 import S3Options

__all__ = [
    "DataFileWriter", "DataWriter", "LocalStorage", "Location", "S3Options", "Storage", "StorageLock", "open_storage",
    "parse_location",
]
