"""The run bundle on disk: every file written atomically or appended line by line with flush.

A killed job therefore leaves readable partial results: whole JSON files or none, and complete
JSON lines in completions.jsonl. `summary.json` is written last; a run without it is unfinished.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

RUN_STATUSES = ("ok", "failed", "timeout", "cancelled")


def atomic_write_text(path: Path, text: str, durable: bool = True) -> None:
    """Write via a temporary file in the same folder and rename: readers see all or nothing. `durable` also
    syncs the file to disk before the rename (results, which a crashed node must not lose); a plan's
    definitions, written by the thousand and written again by the next plan, skip it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any, durable: bool = True, indent: int | None = 2) -> None:
    """JSON, indented for readers; `indent=None` takes the C encoder (several times faster) for files written
    by the thousand."""
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n", durable)


def read_json(path: Path) -> Any | None:
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class JsonlWriter:
    """Appends one JSON object per line, each flushed to the operating system as it is written (a killed process
    loses no line) and synced to disk: at every line (`sync_every_s` 0), or every `sync_every_s` by a thread of its
    own (a load generator's event loop cannot wait for a disk), and on close."""

    def __init__(self, path: Path, sync_every_s: float = 0.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("w")
        self._every = sync_every_s
        self._closed = threading.Event()
        self._lock = threading.Lock()
        if sync_every_s > 0:
            threading.Thread(target=self._sync_loop, daemon=True, name="jsonl-sync").start()

    def _sync_loop(self) -> None:
        while not self._closed.wait(self._every):
            with self._lock:
                if not self._file.closed:
                    os.fsync(self._file.fileno())  # releases the GIL: the writer's thread goes on

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if not self._every:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()


DEFINITION_FILES = ("run.json", "job.sbatch", "ds_config.json")
# The layout of run.json and summary.json; the analysis lists bundles with another schema instead of misreading them.
BUNDLE_SCHEMA = 2


@dataclass(frozen=True)
class RunBundle:
    """Paths of one run's files: outputs/<experiment>/<run_id>/."""

    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def summary_json(self) -> Path:
        return self.root / "summary.json"

    @property
    def completions(self) -> Path:
        return self.root / "completions.jsonl"

    def rank_log(self, rank: int) -> Path:
        return self.root / f"rank_{rank}.log"

    def rank_metrics(self, rank: int) -> Path:
        return self.root / f"metrics_rank_{rank}.json"

    def summary(self) -> dict | None:
        return read_json(self.summary_json)

    def is_done(self, config_hash: str | None = None) -> bool:
        """True when the run finished with status ok (such runs are skipped unless forced); with a
        config hash, only if run.json records that same hash (a changed run counts as not done)."""
        summary = self.summary()
        if not (isinstance(summary, dict) and summary.get("status") == "ok"):
            return False
        return config_hash is None or (read_json(self.run_json) or {}).get("config_hash") == config_hash

    def archive_attempt(self) -> Path | None:
        """Move the files of an earlier attempt into attempts/<n>/ (nothing is deleted); the run's definition
        (run.json, job.sbatch, ds_config.json) stays. Returns the archive folder, None if there was nothing."""
        results = [p for p in self.root.glob("*") if p.is_file() and p.name not in DEFINITION_FILES]
        if not results:
            return None
        attempts = self.root / "attempts"
        number = 1 + max((int(p.name) for p in attempts.glob("*") if p.name.isdigit()), default=0)
        target = attempts / str(number)
        target.mkdir(parents=True)
        for path in results:
            path.rename(target / path.name)
        return target
