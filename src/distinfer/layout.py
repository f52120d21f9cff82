"""A run's parallel layout: stages, tensor- and expert-parallel ranks, and how they sit on nodes (pure: no torch).

`Layout` is the one place where pp, tp, ep, the nodes and the GPUs per node are checked against each other;
the experiment file's validation, the memory plan, the job script and the worker all read it. Ranks are
numbered stage-major: rank = stage x ranks_per_stage + position in the stage's group, so the ranks of one
tensor-parallel group are consecutive and, with whole groups per node, sit on one node.
"""

from __future__ import annotations

from dataclasses import dataclass

from distinfer.engines import capabilities


class LayoutError(ValueError):
    """A layout that cannot be placed; `field` names the experiment-file field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class StageLayout:
    """The slice of decoder layers one stage owns, and whether it owns the embedding or the head."""

    start: int
    stop: int
    is_first: bool
    is_last: bool


def split_layers(num_layers: int, stages: int, counts: list[int] | None = None) -> list[StageLayout]:
    """Contiguous layer slices per stage: balanced (earlier stages take the remainder) or explicit counts."""
    if counts is None:
        if not 1 <= stages <= num_layers:
            raise ValueError(f"cannot split {num_layers} layers into {stages} stages")
        base, extra = divmod(num_layers, stages)
        counts = [base + (1 if s < extra else 0) for s in range(stages)]
    if len(counts) != stages or sum(counts) != num_layers or min(counts) < 1:
        raise ValueError(f"layer counts {counts} do not give {stages} stages covering {num_layers} layers")
    layouts, start = [], 0
    for s, count in enumerate(counts):
        layouts.append(StageLayout(start=start, stop=start + count, is_first=s == 0, is_last=s == stages - 1))
        start += count
    return layouts


@dataclass(frozen=True)
class RankCoordinates:
    """Where one rank sits: its pipeline stage, its place in the stage's tensor-parallel group, its node."""

    rank: int
    stage: int
    tp_rank: int
    node: int
    local_rank: int


@dataclass(frozen=True)
class Layout:
    """pp stages of tp tensor-parallel ranks each (ep: expert-parallel ranks per stage, which share the tp
    ranks' devices), placed on nodes of `gpus_per_node` ranks (one rank per node on CPU profiles unless
    `nodes` says otherwise). Construction validates; a bad combination raises LayoutError."""

    pp: int = 1
    tp: int = 1
    ep: int = 1
    gpus_per_node: int = 1  # ranks a node holds: its GPUs; 1 for CPU nodes
    nodes: int | None = None  # the user's fixed node count; None: as many as the ranks need
    groups_within_node: bool = True  # a stage's tp / ep group on one node (GPU clusters); CPU ranks may span nodes

    def __post_init__(self) -> None:
        for name in ("pp", "tp", "ep", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise LayoutError(f"parallel.{name}" if name != "gpus_per_node" else "cluster.gpus_per_node",
                                  f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.ep > 1 and self.tp > 1 and max(self.tp, self.ep) % min(self.tp, self.ep):
            raise LayoutError("parallel.ep", f"ep {self.ep} and tp {self.tp} must divide one another: the expert "
                              "ranks of a stage are its tensor-parallel ranks")
        if self.nodes is not None:
            if self.nodes < 1:
                raise LayoutError("cluster.nodes", f"nodes must be at least 1 (got {self.nodes})")
            if self.world_size % self.nodes:
                raise LayoutError("cluster.nodes", f"{self.world_size} rank(s) ({self.describe()}) cannot be spread "
                                  f"evenly over {self.nodes} node(s); leave cluster.nodes out to size each run "
                                  "by its ranks")
            if self.ranks_per_node > self.gpus_per_node:
                raise LayoutError("cluster.nodes", f"{self.world_size} rank(s) ({self.describe()}) on {self.nodes} "
                                  f"node(s) is {self.ranks_per_node} per node, more than the "
                                  f"{self.gpus_per_node} a node holds (cluster.gpus_per_node)")
        elif self.world_size > self.gpus_per_node and self.world_size % self.gpus_per_node:
            raise LayoutError("parallel", f"{self.world_size} ranks ({self.describe()}) do not fill nodes of "
                              f"{self.gpus_per_node} GPUs; use a multiple of cluster.gpus_per_node")
        group = self.ranks_per_stage
        if self.groups_within_node and self.nodes_needed > 1 and (group > self.ranks_per_node
                                                                 or self.ranks_per_node % group):
            what = "tensor-parallel" if self.tp >= self.ep else "expert-parallel"
            raise LayoutError("parallel.tp" if self.tp >= self.ep else "parallel.ep",
                              f"a {what} group of {group} ranks must sit on one node, but the run places "
                              f"{self.ranks_per_node} rank(s) per node ({self.describe()})")

    @property
    def ranks_per_stage(self) -> int:
        return max(self.tp, self.ep)

    @property
    def world_size(self) -> int:
        return world_size(self.pp, self.tp, self.ep)

    @property
    def ranks_per_node(self) -> int:
        if self.nodes is not None:
            return self.world_size // self.nodes
        return min(self.gpus_per_node, self.world_size)

    @property
    def nodes_needed(self) -> int:
        return self.world_size // self.ranks_per_node

    def describe(self) -> str:
        parts = [f"pp {self.pp}"] + [f"{n} {v}" for n, v in (("tp", self.tp), ("ep", self.ep)) if v > 1]
        return " x ".join(parts)

    def coordinates(self, rank: int) -> RankCoordinates:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a layout of {self.world_size} ranks")
        node, local = divmod(rank, self.ranks_per_node)
        stage, tp_rank = divmod(rank, self.ranks_per_stage)
        return RankCoordinates(rank, stage, tp_rank, node, local)


def place_engine(engine: str, pp: int, tp: int = 1, ep: int = 1, *, gpu: bool, gpus_per_node: int,
                 nodes: int | None) -> Layout:
    """`place` for a run of `engine`, as its capabilities say (engines.py): e.g. the reference on one device,
    vLLM on CPU on one node."""
    caps = capabilities(engine)
    return place(pp, tp, ep, gpu=gpu, gpus_per_node=gpus_per_node, nodes=nodes, single_device=caps.single_device,
                 one_node=caps.one_node_on_cpu and not gpu)


def world_size(pp: int, tp: int = 1, ep: int = 1) -> int:
    """Ranks of a layout: each of the pp stages has max(tp, ep) ranks (experts are spread over the same ranks
    that split the attention)."""
    return pp * max(tp, ep)


def place(pp: int, tp: int = 1, ep: int = 1, *, gpu: bool, gpus_per_node: int, nodes: int | None,
          single_device: bool = False, one_node: bool = False) -> Layout:
    """The layout of a run on a cluster: GPU nodes hold `gpus_per_node` ranks, and a tensor-parallel group sits
    on one node; CPU nodes hold one rank each unless the node count is fixed, and a group may span them (its
    all-reduce then goes over gloo); a single-device run (the reference) takes one node whatever `nodes` says,
    and so does a `one_node` run (vLLM's CPU backend, which runs its ranks on one machine only)."""
    nodes = None if single_device else (1 if one_node else nodes)
    world = world_size(pp, tp, ep)
    per_node = gpus_per_node if gpu else (world if nodes is not None else 1)
    return Layout(pp=pp, tp=tp, ep=ep, gpus_per_node=max(1, per_node), nodes=nodes, groups_within_node=gpu)


def tensor_split_problem(config: dict, tp: int) -> str | None:
    """Why `tp` cannot split this model's attention (a message), or None."""
    heads = int(config.get("num_attention_heads", config.get("n_head", 1)))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = config.get("hidden_size") or config.get("n_embd")
    intermediate = config.get("intermediate_size") or config.get("n_inner") or (4 * int(hidden) if hidden else None)
    if heads % tp:
        return f"tp {tp} does not divide the model's {heads} attention heads"
    if kv_heads % tp:
        return f"tp {tp} does not divide the model's {kv_heads} key/value heads"
    if intermediate and int(intermediate) % tp:
        return f"tp {tp} does not divide the model's MLP width {intermediate}"
    return None
