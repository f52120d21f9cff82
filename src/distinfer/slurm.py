"""Slurm: render job scripts (pure), and talk to sbatch / squeue / sacct / scancel through one thin wrapper.

Every user value reaching the script is either restricted to a safe character set (values in
#SBATCH lines, which sbatch parses itself) or passed through `shlex.quote` (everything else).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from distinfer.engines import capabilities
from distinfer.layout import LayoutError, place_engine
from distinfer.memory import GPU_ALLOCATOR
from distinfer.plan import RunSpec
from distinfer.profiles import HARDWARE
from distinfer.spec_schema import ClusterSpec, ContainerSpec

TEMPLATE = Path(__file__).resolve().parent / "templates" / "job.sbatch.tmpl"
SERVING_TEMPLATE = TEMPLATE.with_name("serving.sbatch.tmpl")  # one task: server, load and stop (serving/runner.py)
VLLM_TEMPLATE = TEMPLATE.with_name("vllm.sbatch.tmpl")  # vllm serve per node, then the load (offline or serving)
SAFE_PATH = re.compile(r"^[A-Za-z0-9._/+@-]+$")  # no %: Slurm expands %j, %u, ... in --output


class RenderError(ValueError):
    """A value that cannot be placed safely in a job script."""


class SlurmError(RuntimeError):
    """A Slurm command failed; the message has its stderr."""


@dataclass(frozen=True)
class JobShape:
    nodes: int  # the server's (or an offline run's ranks')
    ranks_per_node: int
    client_nodes: int = 1  # nodes that send a serving run's load
    client_first_node: int = 0  # the first of them, counted in the allocation

    @property
    def job_nodes(self) -> int:
        """The allocation: the server's nodes, and the client's where they come after them."""
        return max(self.nodes, self.client_first_node + self.client_nodes)


def job_shape(run: RunSpec, cluster: ClusterSpec) -> JobShape:
    """Nodes and ranks per node of a run, from its layout on the cluster (layout.py)."""
    try:
        layout = place_engine(run.engine, run.pp, run.tp, run.ep, gpu=HARDWARE[cluster.profile].gpu,
                              gpus_per_node=cluster.gpus_per_node, nodes=cluster.nodes)
    except LayoutError as exc:
        raise RenderError(f"{run.run_id}: {exc}") from None
    client = run.scenario.client if run.scenario else None
    if client is None or client.nodes == 1 and client.placement == "beside":
        return JobShape(layout.nodes_needed, layout.ranks_per_node)
    first = layout.nodes_needed if client.placement == "apart" else 0
    return JobShape(layout.nodes_needed, layout.ranks_per_node, client.nodes, first)


def _fill(template: str, values: dict[str, str]) -> str:
    def value(match: re.Match) -> str:
        return values[match.group(1)]

    return re.sub(r"\{\{(\w+)\}\}", value, template)


def worker_python(cluster: ClusterSpec, container: ContainerSpec) -> str:
    """The interpreter on the compute node: the configured one, else this venv's when not containerised."""
    if "python" in cluster.model_fields_set or container.runtime == "apptainer":
        return cluster.python
    return sys.executable


def profiler_prefix(run: RunSpec, run_dir: Path) -> list[str]:
    """`profile: nsys`: each node's torchrun and its ranks run under Nsight Systems, one report per process."""
    if run.profile != "nsys":
        return []
    return ["nsys", "profile", "--trace=cuda,nvtx,osrt", "--force-overwrite=true", f"--output={run_dir}/nsys-%h-%p"]


JOB_TMP_LINES = """\
# What the processes leave in the temporary folder (torchrun's folders, vLLM's sockets) goes to a folder of this
# job's on its first node, removed when the run ends (not when the job is cancelled; other nodes, without it, use
# their own); PyTorch's compile cache keeps its usual place.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/torchinductor_$(id -un)}
JOB_TMP=$(mktemp -d "${TMPDIR:-/tmp}/distinfer-job-XXXXXX")
export TMPDIR=$JOB_TMP"""  # the job and vLLM scripts; each removes $JOB_TMP once its run's processes have ended


def render_sbatch(run: RunSpec, cluster: ClusterSpec, container: ContainerSpec, run_dir: Path) -> str:
    """The job script of one run (a pure function of its arguments)."""
    if capabilities(run.engine).program == "endpoint":
        raise RenderError(f"{run.run_id}: a serving run against an endpoint needs no job: run the load from a "
                          "machine that reaches the endpoint, with `distinfer run FILE --local`")
    run_dir = run_dir.resolve() if not run_dir.is_absolute() else run_dir
    if not SAFE_PATH.match(str(run_dir)):
        raise RenderError(f"outputs path {str(run_dir)!r} cannot go in #SBATCH lines; use letters, digits and . _ - / + @ only")
    shape = job_shape(run, cluster)
    profile = HARDWARE[cluster.profile]
    options = [
        f"--job-name=di-{run.experiment}-{run.run_id}",
        f"--nodes={shape.job_nodes}",
        "--ntasks-per-node=1",
        f"--time={cluster.time}",
        f"--output={run_dir}/slurm-%j.out",
        f"--error={run_dir}/slurm-%j.err",
    ]
    if profile.gpu:
        options.append(f"--gpus-per-node={shape.ranks_per_node}")
    for name in ("partition", "account", "qos", "cpus_per_task", "mem"):
        value = getattr(cluster, name)
        if value is not None:
            options.append(f"--{name.replace('_', '-')}={value}")
    options += cluster.extra_sbatch
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if cluster.cpus_per_task:
        env["OMP_NUM_THREADS"] = str(max(1, cluster.cpus_per_task // shape.ranks_per_node))
    if profile.gpu:  # the KV cache grows every step: without this, cached blocks of old sizes pile up
        env["PYTORCH_CUDA_ALLOC_CONF"] = GPU_ALLOCATOR
    env.update(cluster.env)
    launch: list[str] = []
    if container.runtime == "apptainer":
        launch = ["apptainer", "exec", "--nv"]
        for bind in container.binds:
            launch += ["--bind", bind]
        launch.append(str((run.vllm.image if run.vllm else None) or container.image))  # vLLM's jobs: its own image
    values = {
        "run_id": run.run_id,
        "experiment": run.experiment,
        "sbatch_lines": "\n".join(f"#SBATCH {o}" for o in options),
        "module_lines": "\n".join(f"module load {shlex.quote(m)}" for m in cluster.modules) or "# (no modules)",
        "env_lines": "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
        "run_dir": shlex.quote(str(run_dir)),
        "python": shlex.quote(worker_python(cluster, container)),
        "ranks_per_node": str(shape.ranks_per_node),
        "server_nodes": str(shape.nodes),
        "client_nodes": str(shape.client_nodes),
        "client_first_node": str(shape.client_first_node),
        "job_tmp_lines": JOB_TMP_LINES,
        "launch_prefix": " ".join(shlex.quote(part) for part in launch),
        # Quoted even where shlex would not: shellcheck reads a bare comma in an array as a mistake (SC2054).
        "profile_prefix": " ".join(f"'{part}'" if "," in part and "'" not in part else shlex.quote(part)
                                   for part in profiler_prefix(run, run_dir)),
    }
    program = capabilities(run.engine).program
    template = VLLM_TEMPLATE if program == "vllm" else SERVING_TEMPLATE if run.serving else TEMPLATE
    return _fill(template.read_text(), values)


# -- the one wrapper around Slurm's commands ------------------------------------------------------
def slurm_command(args: list[str], timeout: float = 60) -> str:
    """Run a Slurm client command; its stdout, or SlurmError with its stderr."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise SlurmError(f"{args[0]} not found: is this a Slurm login node (or is SLURM_CONF set)?") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(args)} did not answer within {timeout:.0f}s") from None
    if proc.returncode != 0:
        raise SlurmError(f"{' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def sbatch(script: Path) -> str:
    """Submit a job script; returns the job id."""
    return slurm_command(["sbatch", "--parsable", str(script)]).strip().split(";")[0]


def scancel(job_ids: list[str]) -> None:
    if job_ids:
        slurm_command(["scancel", *job_ids])


def squeue_states(job_ids: list[str]) -> dict[str, str]:
    """State of jobs still known to the controller (PENDING, RUNNING, COMPLETING, ...)."""
    if not job_ids:
        return {}
    out = slurm_command(["squeue", "-h", "-o", "%i|%T", "-j", ",".join(job_ids)])
    return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)


ACCOUNTING_FIELDS = ("JobID", "State", "Elapsed", "NodeList", "ExitCode", "MaxRSS")


def sacct_records(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """Accounting per job: from the database (with MaxRSS of the steps), else from the job-completion log."""
    if not job_ids:
        return {}
    ids = ",".join(job_ids)
    try:
        out = slurm_command(["sacct", "-n", "-P", "-j", ids, "-o", ",".join(ACCOUNTING_FIELDS)])
        fields = ACCOUNTING_FIELDS
    except SlurmError:  # no accounting database: `sacct -c` reads job-level records only
        fields = ACCOUNTING_FIELDS[:-1]
        out = slurm_command(["sacct", "-c", "-n", "-P", "-j", ids, "-o", ",".join(fields)])
    records: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        row = dict(zip(fields, line.split("|")))
        job, _, step = row.get("JobID", "").partition(".")
        if not job:
            continue
        record = records.setdefault(job, {})
        if not step:
            record.update({k: v for k, v in row.items() if k != "MaxRSS" or v})
        elif row.get("MaxRSS"):
            record["MaxRSS"] = max(record.get("MaxRSS", ""), row["MaxRSS"], key=_rss_bytes)
    return records


def _rss_bytes(value: str) -> float:
    match = re.match(r"^([\d.]+)([KMGT]?)$", value or "")
    if not match:
        return 0.0
    return float(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " ")
