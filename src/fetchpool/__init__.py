"""fetchpool: download many files (first of all images) concurrently, correctly and fast.

>>> from fetchpool import download_all
>>> results = download_all(urls, "images", workers=16)  # doctest: +SKIP
>>> print(results.summary())  # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0"

import logging

from .api import download_all
from .downloader import Downloader
from .errors import (
    BlockedAddressError,
    ChecksumError,
    FetchError,
    HTTPStatusError,
    InvalidURL,
    NotAnImageError,
    RedirectError,
    ShardError,
    StorageError,
    TooLargeError,
    TransferError,
    UnsafeFilenameError,
)
from .items import Item
from .results import DownloadResult, ProgressEvent, Results, Summary
from .retry import RetryPolicy

logging.getLogger("fetchpool").addHandler(logging.NullHandler())

__all__ = [
    "BlockedAddressError",
    "ChecksumError",
    "DownloadResult",
    "Downloader",
    "FetchError",
    "HTTPStatusError",
    "InvalidURL",
    "Item",
    "NotAnImageError",
    "ProgressEvent",
    "RedirectError",
    "Results",
    "RetryPolicy",
    "ShardError",
    "StorageError",
    "Summary",
    "TooLargeError",
    "TransferError",
    "UnsafeFilenameError",
    "__version__",
    "download_all",
]
