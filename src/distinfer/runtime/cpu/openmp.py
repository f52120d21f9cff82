"""OpenMP's spin count for a rank's threads, set before torch loads OpenMP (this module imports nothing heavy).

After a parallel region, OpenMP's worker threads spin (GOMP_SPINCOUNT rounds, 300000 by default:
milliseconds) before they sleep; a sleeping worker needs a futex wake-up at the next parallel region, which
in a VM costs tens of microseconds, once per linear layer where every matrix product uses every core.

- A rank alone on its node keeps OpenMP's default: nobody else needs the cores while its workers spin.
- Ranks that share a node spin 20000 rounds: a stage that has finished its step and waits for the next would
  otherwise keep a core busy that the stage now computing needs.

The measurements behind both: docs/performance.md.

A value set by the user wins. Slurm's "nodes" of the one-machine test cluster share the machine's cores
but each sees itself alone: only speed differs there, not tokens.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from distinfer.runtime.ranks import dist_env_from

SHARED_NODE_SPINCOUNT = "20000"


def rank_spin_count(environ: Mapping[str, str]) -> str | None:
    """GOMP_SPINCOUNT for a rank with this environment: the user's, else SHARED_NODE_SPINCOUNT where other
    ranks share its node, else None (OpenMP's default)."""
    if "GOMP_SPINCOUNT" in environ:
        return environ["GOMP_SPINCOUNT"]
    return SHARED_NODE_SPINCOUNT if dist_env_from(environ).local_world_size > 1 else None


def set_rank_spin_count() -> None:
    """Set `rank_spin_count` for this process; must run before torch is imported (OpenMP reads it at load)."""
    spin = rank_spin_count(os.environ)
    if spin is not None:
        os.environ["GOMP_SPINCOUNT"] = spin
