"""Runs as Slurm jobs: the definition gains job.sbatch, and `launch` submits it."""

from __future__ import annotations

from pathlib import Path

from distinfer.bundle import RunBundle, atomic_write_text
from distinfer.launchers.base import Launcher
from distinfer.plan import RunSpec
from distinfer.slurm import render_sbatch, sbatch
from distinfer.spec_schema import ClusterSpec, ContainerSpec


class SlurmLauncher(Launcher):
    """One batch job per run, shaped by the experiment's cluster and container sections."""

    name = "slurm"

    def __init__(self, outputs: Path, cluster: ClusterSpec, container: ContainerSpec) -> None:
        super().__init__(outputs)
        self.cluster, self.container = cluster, container

    def prepare(self, run: RunSpec) -> RunBundle:
        bundle = super().prepare(run)
        script = render_sbatch(run, self.cluster, self.container, bundle.root.absolute())
        atomic_write_text(bundle.root / "job.sbatch", script, durable=False)
        return bundle

    def launch(self, run: RunSpec, bundle: RunBundle) -> str:
        """Submit job.sbatch; returns the job id. Files of an earlier attempt move to attempts/<n>/ first."""
        bundle.archive_attempt()
        return sbatch(bundle.root / "job.sbatch")
