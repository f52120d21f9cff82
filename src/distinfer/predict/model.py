"""Predict one run: per stage the time of a prefill and of a decode step (a roofline of its FLOPs and bytes at
calibrated efficiencies, plus fixed host costs), the messages between stages and the collectives inside them,
and the pipeline schedule (schedule.py) over the run's batches.

On a GPU the host launches work asynchronously, so a forward takes the longer of the device's time and the
host's; on a CPU the host does the work, so the two add up. CPU ranks of one machine share its cores and its
memory bandwidth: pipeline stages without micro-batches take turns on every core, ranks that compute together
get an even share of the cores (as the workers do), and the machine's bandwidth bounds what they read together.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from distinfer.engines import capabilities
from distinfer.layout import place_engine, split_layers
from distinfer.memory import DTYPE_BYTES, ModelFacts
from distinfer.predict.costs import FUSED_OPS_PER_LAYER, OPS_PER_LAYER, Work, forward_work
from distinfer.predict.hardware import LINKS, DeviceSpeed, Link, cpu_speed, gpu_speed, read_bandwidth
from distinfer.predict.schedule import decode_cycle, first_tokens
from distinfer.profiles import HardwareProfile


@dataclass(frozen=True)
class Efficiency:
    """The calibrated parameters of one engine on one kind of device: the fraction of peak FLOP/s its decode
    products reach (a few rows against each weight matrix) and its prefill products reach (whole prompts against
    it, closer to the kernels' peak), the fraction of the memory bandwidth its reads reach (above 1 where the
    weights stay in a CPU's caches), the fixed host time of one stage forward beyond its launched operations, the
    host time of setting up one batch (stages set up at the same time, so a batch pays it once), and the host time
    of one decode step of the whole batch beyond its micro-batches' forwards (one stage with two micro-batches of
    one row measured 1.5 x, not 2 x, the time of one micro-batch of one row). A server adds its own time a step
    (scheduling, joining requests' caches), a time per token it streams and a time per request it takes in
    (predict/serving.py)."""

    compute: float = 0.5
    memory: float = 0.7
    step_s: float = 5e-4
    batch_s: float = 2e-3
    cycle_s: float = 1e-4
    prefill: float = 0.5
    serve_step_s: float = 1e-3
    serve_token_s: float = 5e-5
    serve_request_s: float = 1e-3

    def to_dict(self) -> dict:
        return asdict(self)


FALLBACK = {  # whose calibration an engine borrows when it has none of its own: DeepSpeed runs the reference's
    # transformers forward; the pipeline's CPU decode path and generate() differ several times in their fixed
    # costs, so those two never borrow from each other (an uncalibrated engine keeps the defaults)
    "pipeline": ("pipeline",),
    "reference": ("reference",),
    "deepspeed": ("deepspeed", "reference"),
}


def fit_used(engine: str, efficiency: dict[str, Efficiency]) -> str | None:
    """Whose fit in `efficiency` predicts `engine`: its own, or the one it borrows (FALLBACK); None: the defaults."""
    return next((e for e in FALLBACK.get(engine, (engine,)) if e in efficiency), None)


NO_LINK = Link("none", math.inf, 0.0, "one stage: no message")


@dataclass(frozen=True)
class Machine:
    """Where the ranks run: the hardware profile (the CPU probe for `cpu`), the network between nodes, and whether
    every rank shares this one machine (`run --local`)."""

    profile: HardwareProfile
    network: Link
    probe: dict | None = None
    local: bool = False
    gpus_per_node: int = 1
    nodes: int | None = None

    @property
    def cores(self) -> int:
        return int(self.probe["cores"]) if self.probe else 0


@dataclass
class Prediction:
    run_id: str
    ttft_s: float
    tpot_s: float
    output_tokens_per_s: float
    wall_s: float
    output_tokens: int
    rank_busy_s: list[float] = field(default_factory=list)  # per rank: computing (the rest of wall_s it idles)


@dataclass(frozen=True)
class _Rank:
    device: DeviceSpeed
    cores: tuple[int, ...]  # CPU cores it computes on (empty on GPU)
    node: int


def _ranks(run_engine: str, pp: int, group: int, together: bool, machine: Machine) -> list[_Rank]:
    if machine.profile.gpu:
        layout = place_engine(run_engine, pp, group, 1, gpu=True, gpus_per_node=machine.gpus_per_node,
                              nodes=machine.nodes)
        return [_Rank(gpu_speed(machine.profile), (), layout.coordinates(r).node) for r in range(pp * group)]
    if machine.probe is None:
        raise ValueError("a CPU prediction needs the machine's probe (probes/cpu.py)")
    world, cores = pp * group, machine.cores
    if not machine.local:  # a CPU cluster: one rank per node, each with the node's cores
        return [_Rank(cpu_speed(machine.probe, cores), tuple(range(cores)), r) for r in range(world)]
    if not together:
        return [_Rank(cpu_speed(machine.probe, cores), tuple(range(cores)), 0) for _ in range(world)]
    per = max(1, cores // world)
    return [_Rank(cpu_speed(machine.probe, per), tuple((r * per + i) % cores for i in range(per)), 0)
            for r in range(world)]


def _link(machine: Machine, a: _Rank, b: _Rank) -> Link:
    if a.node != b.node:
        return machine.network
    link = LINKS[machine.profile.node_link]
    if not machine.profile.gpu and machine.probe:  # shared memory: the probe's hand-off, a message written and read
        bandwidth = read_bandwidth(tuple(machine.probe["read_all"]), 1.0) / 2
        latency = machine.probe.get("handoff_s") or machine.probe.get("wake_s") or link.latency_s
        return Link(link.name, bandwidth, latency, "measured on the machine")
    return link


def forward_time(work: Work, device: DeviceSpeed, dtype: str, eff: Efficiency, gpu: bool,
                 working_set: float, ops_per_layer: int = OPS_PER_LAYER) -> float:
    """One forward of one rank: its products and its reads (at the bandwidth of the working set the device holds),
    and the host's fixed cost. On a GPU the reads overlap the products (the roofline's max) and the host's launches
    overlap both; on a CPU the same cores stream the weights and multiply them, and the host is one of those cores,
    so the three add up (measured: batch 8 decode of the 160 M Llama on 2 cores takes the batch-1 read time plus
    the products, not the larger of the two)."""
    flops = device.flops.get(dtype) or device.flops["float32"]
    compute = work.flops / (flops * (eff.prefill if work.prefill else eff.compute))
    reads = work.bytes / (device.bandwidth(working_set) * eff.memory)
    host = eff.step_s + work.layers * ops_per_layer * device.launch_s
    return max(compute, reads, host) if gpu else compute + reads + host


def _collectives(facts: ModelFacts, layers: int, tokens: int, size: int, tp: int, ep: int, link: Link,
                 top_k: int) -> float:
    """Tensor parallel: a ring all-reduce of the hidden states after attention and after the MLP of every layer.
    Expert parallel: per MoE layer, the (token, expert) pairs sent to their experts and back, and the tokens
    gathered again."""
    total = 0.0
    hidden_bytes = tokens * facts.hidden * size
    if tp > 1:
        one = 2 * (tp - 1) / tp * hidden_bytes / link.bandwidth + 2 * (tp - 1) * link.latency_s
        total += 2 * layers * one
    if ep > 1:
        pairs = hidden_bytes * top_k / ep * (ep - 1) / ep
        total += layers * (2 * (pairs / link.bandwidth + (ep - 1) * link.latency_s)
                           + hidden_bytes * (ep - 1) / ep / link.bandwidth + (ep - 1) * link.latency_s)
    return total


class StageCosts:
    """The cost of one run's stages: each stage's time for a forward of a micro-batch, the messages between stages
    and the cores and memory the stages share; what the offline schedule (predict_run) and the serving simulation
    (serving.py) put in order."""

    def __init__(self, run, facts: ModelFacts, machine: Machine, efficiency: dict[str, Efficiency],  # noqa: ANN001
                 together: bool | None = None, stock_kernels: bool = False) -> None:
        engine = run.engine
        fitted = fit_used(engine, efficiency)
        self.eff = efficiency[fitted] if fitted else Efficiency()
        self.facts, self.dtype, self.quantization = facts, run.dtype, run.quantization
        self.pp, _, self.microbatches, self.tp, self.ep = capabilities(engine).axes(
            run.pp, None, run.microbatches, max(run.tp, capabilities(engine).min_tp), run.ep)
        self.group = max(self.tp, self.ep)
        self.together = self.group > 1 or self.microbatches > 1 if together is None else together
        self.ranks = _ranks(engine, self.pp, self.group, self.together, machine)
        self.stages = split_layers(facts.layers, self.pp, run.layers)
        self.gpu = machine.profile.gpu
        self.size = DTYPE_BYTES[run.dtype]
        self.lead = [self.ranks[s * self.group] for s in range(self.pp)]  # each stage's first rank
        self.links = [_link(machine, self.lead[s], self.lead[(s + 1) % self.pp]) if self.pp > 1 else NO_LINK
                      for s in range(self.pp)]
        self.inner = _link(machine, self.ranks[0], self.ranks[min(1, len(self.ranks) - 1)])
        self.shared_machine = not self.gpu and machine.local  # every rank reads through one machine's memory
        # a Llama stage of the pipeline engine on CPU decodes through runtime/cpu's fused layers (prefill stays
        # eager); the server runs transformers' own forward
        self.fused = (not self.gpu and capabilities(engine).fast_cpu_kernels and run.cpu_kernels == "fast"
                      and not stock_kernels
                      and facts.gated_mlp and not facts.experts and self.group == 1)

    def stage_times(self, rows: int, new: int, context: float) -> tuple[list[float], list[float]]:
        """Each stage's time for one micro-batch of `rows` with `new` positions each, and the bytes each of its
        ranks reads."""
        works = [forward_work(self.facts, st, rows, new, context, self.dtype, self.quantization, self.tp, self.ep)
                 for st in self.stages]
        everything = sum(w.bytes for w in works) * self.group
        ops = FUSED_OPS_PER_LAYER if self.fused and new == 1 else OPS_PER_LAYER
        times = [forward_time(w, self.lead[s].device, self.dtype, self.eff, self.gpu,
                              everything if self.shared_machine else w.bytes, ops)
                 + _collectives(self.facts, w.layers, rows * new, self.size, self.tp, self.ep, self.inner, 2)
                 for s, w in enumerate(works)]
        return times, [w.bytes for w in works]

    def hop_times(self, rows: int, new: int) -> list[float]:
        """The messages of one micro-batch: hidden states to the next stage, the sampled tokens back to the first."""
        return [h.transfer_s(rows * new * self.facts.hidden * self.size if s < self.pp - 1 else rows * 8)
                for s, h in enumerate(self.links)]

    def shared(self, times: list[float], reads: list[float]) -> list[float]:
        """Per-micro-batch busy time of each CPU core the stages share, and of the machine's memory."""
        if not self.shared_machine or not self.together:
            return []
        per_core: dict[int, float] = {}
        for s, t in enumerate(times):
            for r in range(s * self.group, (s + 1) * self.group):
                for core in self.ranks[r].cores:
                    per_core[core] = per_core.get(core, 0.0) + t
        total = sum(reads) * self.group
        return list(per_core.values()) + [total / (self.lead[0].device.machine_bandwidth(total) * self.eff.memory)]


def predict_run(run, facts: ModelFacts, machine: Machine, efficiency: dict[str, Efficiency],  # noqa: ANN001
                prompt_tokens: list[int]) -> Prediction:
    """Predicted TTFT (mean over requests), TPOT, output tokens/s and per-rank busy time of an offline run
    (a plan.RunSpec) over prompts of the given token lengths, every request generating max_new_tokens."""
    costs = StageCosts(run, facts, machine, efficiency)
    eff, pp, m = costs.eff, costs.pp, costs.microbatches
    n = run.generation.max_new_tokens
    cap = run.generation.max_prompt_tokens
    count = run.num_prompts or len(prompt_tokens)
    lengths = [min(prompt_tokens[i % len(prompt_tokens)], cap or 10**9) for i in range(count)]
    wall = ttft_sum = tpot_sum = 0.0
    busy = [0.0] * pp
    tokens = 0
    for start in range(0, count, run.batch_size):
        batch = lengths[start : start + run.batch_size]
        rows, prompt = len(batch), max(batch)
        per_mb = [len(range(j, rows, m)) for j in range(min(m, rows))] if m > 1 else [rows]
        r = max(per_mb)
        pre = costs.stage_times(r, prompt, prompt)[0]
        dec, reads = costs.stage_times(r, 1, prompt + n / 2)
        finish = [eff.batch_s + f for f in first_tokens(pre, costs.hop_times(r, prompt), len(per_mb), dec[0])]
        cycle = decode_cycle(dec, costs.hop_times(r, 1), len(per_mb), costs.shared(dec, reads)) + eff.cycle_s
        wall += max(finish) + (n - 1) * cycle
        ttft_sum += sum(f * k for f, k in zip(finish, per_mb))
        tpot_sum += cycle * rows
        tokens += rows * n
        for s in range(pp):
            busy[s] += len(per_mb) * (pre[s] + (n - 1) * dec[s])
    requests = max(1, count)
    return Prediction(run.run_id, ttft_sum / requests, tpot_sum / requests, tokens / wall if wall else math.nan,
                      wall, tokens, [busy[r // costs.group] for r in range(pp * costs.group)])
