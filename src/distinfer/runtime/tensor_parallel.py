"""Tensor parallel inside pipeline stages, over PyTorch's own parallel APIs.

The job's ranks form a 2-D device mesh (pp, tp), stage-major as layout.py numbers them: the ranks of one stage
are consecutive and form its tensor-parallel group; the ranks with the same tp index, one per stage, form a
pipeline group, over which the pipeline engine sends hidden states stage to stage (each tp rank to its
counterpart in the next stage). Each stage's decoder layers are sharded with
`torch.distributed.tensor.parallel`, as torchtitan and gpt-fast do: q/k/v and gate/up column-wise (each rank
computes its share of the heads and of the MLP's inner width), o and down row-wise (partial sums joined by one
all-reduce per attention and per MLP); the products then run on the local shards as plain tensors. The KV
cache is therefore sharded by heads. The embedding, the norms and the head stay whole on every rank of their
stage, so every tp rank of a stage holds the same hidden states and the last stage's tp ranks sample the same
tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from distinfer.models.families import Family

# Module names of a Llama decoder layer and how each is split (torchtitan's plan, without sequence parallel).
LLAMA_PLAN = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
              "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
              "mlp.down_proj": "rowwise"}
SHARDED_FAMILIES = ("llama",)


@dataclass(frozen=True)
class StageGroups:
    """This rank's place in the (pp, tp) mesh: its stage, its index within the stage, and the two groups it
    belongs to (the stage's ranks are its tensor-parallel or expert-parallel group)."""

    stage: int
    tp_rank: int
    pipeline: dist.ProcessGroup  # this tp index's ranks, one per stage (group rank = stage)
    tensor: object  # the stage's tp ranks as a 1-D DeviceMesh


def stage_groups(pp: int, tp: int, device: torch.device) -> StageGroups:
    """The 2-D mesh over the whole job (collective: every rank calls it, in the same order)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (pp, tp), mesh_dim_names=("pp", "tp"))
    stage, tp_rank = divmod(dist.get_rank(), tp)
    return StageGroups(stage, tp_rank, mesh["pp"].get_group(), mesh["tp"])


def shard_stage(model: nn.Module, family: Family, tensor_mesh: object) -> None:
    """Split this stage's decoder layers over the stage's tp ranks (the embedding, norms and head stay whole).

    `parallelize_module` lays the weights out (each rank keeps its shard); the layers then run on the local
    shards as plain tensors, with one all-reduce after each row-wise product, as gpt-fast does: the DTensor
    dispatch around every product cost several times DeepSpeed AutoTP's step on CPU."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if family.name not in SHARDED_FAMILIES:
        raise ValueError(f"tensor parallel inside pipeline stages supports the {', '.join(SHARDED_FAMILIES)} "
                         f"family; this model is {family.name}")
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {name: styles[style]() for name, style in LLAMA_PLAN.items()}
    group = tensor_mesh.get_group()
    for layer in family.decoder_layers(model):
        parallelize_module(layer, tensor_mesh, plan)
        for name, style in LLAMA_PLAN.items():
            _run_local(layer.get_submodule(name), style == "rowwise", group)


def _run_local(linear: nn.Module, rowwise: bool, group: dist.ProcessGroup) -> None:
    """The module's weight as this rank's shard, a plain tensor, and no DTensor hooks; a row-wise product's
    partial sums joined by an all-reduce (its bias, if any, added once: by the group's first rank)."""
    linear._forward_pre_hooks.clear()
    linear._forward_hooks.clear()
    linear.weight = nn.Parameter(linear.weight.to_local(), requires_grad=False)
    if linear.bias is not None:
        bias = linear.bias.to_local()
        keep = not rowwise or dist.get_rank(group) == 0
        linear.bias = nn.Parameter(bias if keep else torch.zeros_like(bias), requires_grad=False)
    if rowwise:
        linear.register_forward_hook(lambda _module, _inputs, output: _all_reduce(output, group))


def _all_reduce(output: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    dist.all_reduce(output, group=group)
    return output
