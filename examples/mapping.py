"""Choose the file names yourself: ``download_all({url: filename}, dest)``.

Runs offline against fetchpool's loopback image server. The URLs all end in ``thumb.jpg``
or ``thumb.png`` and differ only in their query, so we name the files ourselves, in
subdirectories of ``dest``. A name that would escape ``dest`` (``../escape.png``) is not
written anywhere: it becomes a failed result with an ``UnsafeFilenameError``.

    python examples/mapping.py [--dest DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fetchpool import download_all
from fetchpool.testing import ImageServer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, help="directory (default: a temporary one)")
    args = parser.parse_args()

    with (
        ImageServer(n_images=0) as server,
        tempfile.TemporaryDirectory(prefix="fetchpool-mapping-") as tmp,
    ):
        dest = args.dest or Path(tmp) / "images"
        names = {
            server.url("/any/thumb.jpg?id=1"): "cats/tabby.jpg",
            server.url("/any/thumb.jpg?id=2"): "cats/siamese.jpg",
            server.url("/any/thumb.png?id=3"): "dogs/corgi.png",
            server.url("/any/thumb.png?id=4"): "../escape.png",  # outside dest: refused
        }
        results = download_all(names, dest, workers=4)

        # One result per mapping entry, in the mapping's order.
        for url, result in zip(names, results, strict=True):
            query = url.rsplit("/", 1)[-1]
            if result.ok and result.path is not None:
                where = result.path.relative_to(dest).as_posix()
                print(f"{query:<16} -> {where:<18} {result.status}")
            else:
                print(f"{query:<16} -> {names[url]:<18} {type(result.error).__name__}")
        files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
        print(f"files in dest: {', '.join(files)}")
        print(results.summary())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
