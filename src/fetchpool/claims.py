"""Name claims: which URL owns which final path, within one Downloader (DESIGN rule 3)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from .naming import derived_name
from .storage import child_path, inspect_target

__all__ = ["Claims"]


def _key(text: str | Path) -> bytes:
    """Return the 16-byte digest that stands for a path or a URL in :class:`Claims`.

    A remembered name costs its digests instead of a ``Path`` and the URL (measured with
    tracemalloc over 20,000 names: 428 bytes a name before, 128 after). Two names or
    URLs share a digest with odds of about 2**-64 even after billions of names.
    """
    # The digests are compared within this process only: any injective encoding does,
    # and str() (cached by Path) costs one Python call where os.fsencode cost three.
    return hashlib.blake2b(str(text).encode("utf-8", "surrogatepass"), digest_size=16).digest()


class Claims:
    """Which URL owns which final path, within one Downloader.

    A claim protects a name while its download is in flight. After it, the file's
    ``user.xdg.origin.url`` record takes over, so the claim is dropped; it is kept
    for the Downloader's lifetime only where no such record exists (no xattrs, a
    skipped file with no record) and for caller-given names, whose files may belong
    to an earlier run. A failed download drops its claims: it has no file to protect.
    Kept claims grow with the names given out, so they hold digests only; claims in
    flight (at most a few per download under way) hold the path and the URL as they are,
    and cost no hashing.
    """

    def __init__(self, remember: bool) -> None:
        self.remember = remember
        self._lock = threading.Lock()
        #: Claims in flight: path -> (its owner: an origin URL, or the digest of the one
        #: that kept it, if another; number of claims).
        self._owners: dict[str, tuple[str | bytes, int]] = {}
        #: Claims kept for good: path digest -> URL digest.
        self._kept: dict[bytes, bytes] = {}

    def _taken(self, path: str, origin: str) -> bool | None:
        """Whether another URL owns ``path`` (``None``: none does). ``_lock`` held."""
        held = self._owners.get(path)
        if held is not None:
            return held[0] != origin
        if not self._kept:
            return None
        kept = self._kept.get(_key(path))
        return None if kept is None else kept != _key(origin)

    def _add(self, path: str, origin: str) -> None:
        held = self._owners.get(path)
        if held is not None:
            self._owners[path] = (held[0], held[1] + 1)
            return
        owner: str | bytes = origin
        if self._kept:
            kept = self._kept.get(_key(path))
            if kept is not None and kept != _key(origin):
                owner = kept  # still the URL that kept it
        self._owners[path] = (owner, 1)

    def url_name(
        self, directory: Path, name: str, url: str, origin: str, *, look: bool = True
    ) -> Path:
        """Claim ``directory/name`` for ``url``, or its derived name if another URL has it.

        ``look``: also where a file of another URL's stands there (by its recorded
        origin). Without, a file there is not looked for: the caller looks under the
        file's lock, and claims again (looking) if there is one.
        """
        path = child_path(directory, name)
        where = str(path)
        found = None
        if look:
            with self._lock:
                owned = self._taken(where, origin)
            # Looked at outside the lock: its syscalls release the GIL, and workers
            # ending their claims must not queue behind them. A stale answer is
            # harmless, as the worker decides again under the file's lock.
            if owned is None:
                found = inspect_target(where)
        with self._lock:
            taken = self._taken(where, origin)
            if taken is None:
                taken = (
                    found is not None
                    and found.kind == "file"
                    and found.origin not in (None, origin)
                )
            if taken:
                path = child_path(directory, derived_name(name, url))
                where = str(path)
            self._add(where, origin)
        return path

    def add(self, path: Path, origin: str) -> None:
        """Claim ``path`` for ``origin`` unconditionally (a URL's own derived name)."""
        where = str(path)
        with self._lock:
            self._add(where, origin)

    def caller_name(self, path: Path, origin: str) -> bool:
        """Claim a caller-given path; ``False`` if another URL of this run has it."""
        where = str(path)
        with self._lock:
            if self._taken(where, origin):
                return False
            self._add(where, origin)
            return True

    def release(self, path: Path, origin: str, *, keep: bool) -> None:
        """End one claim of ``origin`` on ``path``; ``keep`` remembers the name for good."""
        where = str(path)
        with self._lock:
            held = self._owners.get(where)
            if held is None or held[0] != origin:
                return
            if keep:
                self._kept[_key(where)] = _key(origin)
            if held[1] <= 1:
                del self._owners[where]
            else:
                self._owners[where] = (origin, held[1] - 1)

    def __len__(self) -> int:
        """The number of names claimed now or kept (for tests and diagnostics)."""
        with self._lock:
            return len({_key(path) for path in self._owners} | self._kept.keys())
