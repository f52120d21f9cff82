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
SHARDED_FAMILIES = ("llama", "gpt2")


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

    Llama family: `parallelize_module` lays the weights out (each rank keeps its shard); the layers then run on
    the local shards as plain tensors, with one all-reduce after each row-wise product, as gpt-fast does: the
    DTensor dispatch around every product cost several times DeepSpeed AutoTP's step on CPU. GPT-2 family
    (`Conv1D` layers, q/k/v fused in one): the same split, the shards cut by hand."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    group = tensor_mesh.get_group()
    if family.name == "gpt2":
        for layer in family.decoder_layers(model):
            _shard_gpt2_layer(layer, group)
        return
    if family.name not in SHARDED_FAMILIES:
        raise ValueError(f"tensor parallel inside pipeline stages supports the {', '.join(SHARDED_FAMILIES)} "
                         f"families; this model is {family.name}")
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {name: styles[style]() for name, style in LLAMA_PLAN.items()}
    for layer in family.decoder_layers(model):
        parallelize_module(layer, tensor_mesh, plan)
        for name, style in LLAMA_PLAN.items():
            _run_local(layer.get_submodule(name), style == "rowwise", group)


def _shard_gpt2_layer(layer: nn.Module, group: dist.ProcessGroup) -> None:
    """A GPT-2 block's share on this rank: c_attn's q, k and v columns of its heads, c_fc's columns; c_proj's
    matching rows (attention and MLP), joined by an all-reduce, their bias added by the group's first rank."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    attn, mlp = layer.attn, layer.mlp
    width = attn.embed_dim // size
    parts = [slice(part * attn.embed_dim + rank * width, part * attn.embed_dim + (rank + 1) * width)
             for part in range(3)]
    _conv_columns(attn.c_attn, parts)
    attn.split_size = width
    inner = mlp.c_fc.nf // size
    _conv_columns(mlp.c_fc, [slice(rank * inner, (rank + 1) * inner)])
    for conv, rows in ((attn.c_proj, slice(rank * width, (rank + 1) * width)),
                       (mlp.c_proj, slice(rank * inner, (rank + 1) * inner))):
        conv.weight = nn.Parameter(conv.weight.data[rows].clone(), requires_grad=False)
        if rank:
            conv.bias = nn.Parameter(torch.zeros_like(conv.bias), requires_grad=False)
        conv.register_forward_hook(lambda _module, _inputs, output: _all_reduce(output, group))


def _conv_columns(conv: nn.Module, columns: list[slice]) -> None:
    """Keep these output columns of a `Conv1D` (weight [in, out], bias [out])."""
    conv.weight = nn.Parameter(torch.cat([conv.weight.data[:, c] for c in columns], dim=1).clone(),
                               requires_grad=False)
    conv.bias = nn.Parameter(torch.cat([conv.bias.data[c] for c in columns]).clone(), requires_grad=False)
    conv.nf = conv.weight.shape[1]


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
