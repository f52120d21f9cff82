"""`python -m distinfer.serving RUN_DIR [--url URL]`: a serving run's load (runner.py), or an offline run's
batches on a server (offline.py: engine vllm); URL: the server the job started, else the run starts its own."""

import argparse
from pathlib import Path

from distinfer.bundle import read_json
from distinfer.plan import RunSpec


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m distinfer.serving", description="measure a run on a server")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--url", default=None, help="the server the job started (else started here)")
    args = parser.parse_args()
    spec = RunSpec.from_dict((read_json(args.run_dir / "run.json") or {})["run"])
    if spec.serving:
        from distinfer.serving.runner import run
    else:
        from distinfer.serving.offline import run
    raise SystemExit(run(args.run_dir, args.url))


main()
