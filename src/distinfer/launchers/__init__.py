"""Where a run's ranks are started: on this machine (`local`, torchrun on CPU) or on Slurm (`slurm`, a job).

Both implement `Launcher` (base.py) over the same bundle code: `prepare` writes the run's definition
(run.json, and ds_config.json or job.sbatch as the launcher needs) into outputs/<experiment>/<run_id>/;
`launch` starts the ranks. Neither imports the other, and neither imports torch.
"""
