"""The launcher interface and the bundle code both launchers share."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

from distinfer.bundle import BUNDLE_SCHEMA, RunBundle, atomic_write_json
from distinfer.engines import capabilities
from distinfer.plan import RunSpec, deepspeed_config
from distinfer.provenance import provenance


def write_run_json(run: RunSpec, outputs: Path, origin: dict | None = None) -> RunBundle:
    """outputs/<experiment>/<run_id>/run.json: the run, its config hash and where it was planned (`origin`,
    by default this process's provenance); and the DeepSpeed config of a deepspeed run."""
    bundle = RunBundle(outputs / run.experiment / run.run_id)
    atomic_write_json(
        bundle.run_json, {"schema": BUNDLE_SCHEMA, "run": run.to_dict(), "config_hash": run.config_hash(),
                          "provenance": origin or provenance(os.environ)}, durable=False, indent=None,
    )
    if capabilities(run.engine).deepspeed_config:
        atomic_write_json(bundle.root / "ds_config.json", deepspeed_config(run), durable=False)
    return bundle


class Launcher(ABC):
    """Starts runs whose bundles live under `outputs`."""

    name: str

    def __init__(self, outputs: Path) -> None:
        self.outputs = outputs
        self.origin = provenance(os.environ)  # where the runs were planned: the same for all of them

    def bundle(self, run: RunSpec) -> RunBundle:
        return RunBundle(self.outputs / run.experiment / run.run_id)

    def prepare(self, run: RunSpec) -> RunBundle:
        """Write the run's definition into its bundle."""
        return write_run_json(run, self.outputs, self.origin)

    @abstractmethod
    def launch(self, run: RunSpec, bundle: RunBundle) -> str:
        """Start the run's ranks; returns what identifies the attempt (a job id, or the final state)."""
