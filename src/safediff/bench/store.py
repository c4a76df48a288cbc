"""A run folder: content-addressed images, one record file per finished batch, the protocol, the results.

    RUN/protocol.json          what determines every number (written once; a different protocol is refused)
    RUN/images/<sha256>.png    images named by the sha256 of their PNG bytes
    RUN/batches/<id>.json      the records of one batch, written after all its images
    RUN/results.json           metrics + per-sample records (written last)

Every file is written atomically (temporary file + ``os.replace``), so a run killed at any moment leaves only whole
files (and perhaps a stray ``.*.tmp``, removed on the next start). A batch counts as done when its record file exists
and every image it names is present with the right hash; anything else is redone, and since an image depends only
on the protocol and its batch, redoing it reproduces the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

from safediff.hashing import bytes_sha256, file_sha256
from safediff.records import record
from safediff.storage import open_run_folder, remove_partial_writes, write_bytes_atomic, write_json_atomic

PROTOCOL = "protocol.json"
RESULTS = "results.json"


class RunStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.images = self.root / "images"
        self.batches = self.root / "batches"

    @classmethod
    def open(cls, root: str | Path, identity: dict, **fields) -> "RunStore":
        """Create RUN for ``identity`` (a ``bench-run`` record with ``fields``), or reopen it when it was made with
        exactly the same identity."""
        store = cls(Path(root))
        open_run_folder(store.root, PROTOCOL, identity, record("bench-run", identity=identity, **fields),
                        "run folder", units=("batches/*.json",))
        store.images.mkdir(exist_ok=True)
        store.batches.mkdir(exist_ok=True)
        remove_partial_writes(store.root, store.images, store.batches)
        return store

    def put_image(self, png: bytes) -> str:
        digest = bytes_sha256(png)
        path = self.images / f"{digest}.png"
        if not (path.is_file() and file_sha256(path) == digest):
            write_bytes_atomic(path, png)
        return digest

    def image_path(self, digest: str) -> Path:
        return self.images / f"{digest}.png"

    def _batch_path(self, batch_id: int) -> Path:
        return self.batches / f"{batch_id:06d}.json"

    def put_batch(self, batch_id: int, records: list[dict]) -> None:
        write_json_atomic(self._batch_path(batch_id), {"batch": batch_id, "records": records})

    def batch(self, batch_id: int) -> list[dict] | None:
        """The records of a finished batch whose images are all intact, else None (to be redone)."""
        path = self._batch_path(batch_id)
        if not path.is_file():
            return None
        try:
            records = json.loads(path.read_text())["records"]
            for r in records:
                img = self.image_path(r["image"])
                if not img.is_file() or file_sha256(img) != r["image"]:
                    return None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):  # a damaged or tampered record: redo
            return None
        return records

    def write_results(self, results: dict) -> Path:
        path = self.root / RESULTS
        write_json_atomic(path, results)
        return path
