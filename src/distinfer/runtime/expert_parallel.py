"""Expert parallelism for mixture-of-experts models: a stage's experts split over its ranks, tokens routed to
them with `all_to_all`.

The ranks of one stage form its expert-parallel group (consecutive ranks of the (pp, ep) mesh, as tensor
parallel's). Every rank of a stage holds the whole attention, the router and the norms, and 1/ep of each MoE
layer's experts. At an MoE layer the router runs as the model runs it, on every rank; then each rank takes
its share of the tokens, sends each (token, chosen expert) pair to the rank that holds the expert
(`all_to_all_single`, with the counts exchanged first), the experts run on what they received, the results go
back the same way, each rank weights and sums its tokens' expert outputs in the model's order (experts in
increasing index, as `transformers`' loop adds them), and an all-gather gives every rank of the stage every
token's output again. Each rank counts the tokens its experts processed and the time spent in these
collectives, which the run's summary reports per rank.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn


class ExpertShard(nn.Module):
    """The experts `first .. first + local - 1` of one MoE layer (a `transformers` experts module's 3-D weights:
    gate_up_proj [experts, 2 x inner, hidden], down_proj [experts, hidden, inner]) and the routing over `group`."""

    def __init__(self, experts: nn.Module, group: dist.ProcessGroup, ep_rank: int, ep: int,
                 stats: ExpertStats) -> None:
        super().__init__()
        total = int(experts.num_experts)
        self.local, self.first = total // ep, ep_rank * (total // ep)
        self.ep, self.ep_rank, self.group, self.stats = ep, ep_rank, group, stats
        self.act_fn = experts.act_fn
        span = slice(self.first, self.first + self.local)
        self.gate_up_proj = nn.Parameter(experts.gate_up_proj.data[span].clone(), requires_grad=False)
        self.down_proj = nn.Parameter(experts.down_proj.data[span].clone(), requires_grad=False)

    def _all_to_all(self, tensor: torch.Tensor, send: list[int], receive: list[int]) -> torch.Tensor:
        out = tensor.new_empty((sum(receive), *tensor.shape[1:]))
        t0 = time.perf_counter()
        dist.all_to_all_single(out, tensor.contiguous(), receive, send, group=self.group)
        self.stats.all_to_all_s += time.perf_counter() - t0
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        tokens, k = top_k_index.shape
        mine = torch.arange(tokens, device=hidden_states.device).tensor_split(self.ep)[self.ep_rank]
        experts = top_k_index[mine].reshape(-1)  # this rank's (token, slot) pairs, token-major
        owner = experts // self.local
        order = torch.argsort(owner, stable=True)
        send = torch.bincount(owner, minlength=self.ep)
        receive = torch.empty_like(send)
        t0 = time.perf_counter()
        dist.all_to_all_single(receive, send, group=self.group)
        self.stats.all_to_all_s += time.perf_counter() - t0
        send_counts, receive_counts = send.tolist(), receive.tolist()
        rows = self._all_to_all(hidden_states[mine.repeat_interleave(k)][order], send_counts, receive_counts)
        local = (experts - owner * self.local)[order]  # each pair's expert among its owner's
        local_ids = self._all_to_all(local[:, None], send_counts, receive_counts)[:, 0]
        out = torch.empty_like(rows)
        for expert in range(self.local):
            picked = torch.nonzero(local_ids == expert)[:, 0]
            self.stats.add(self.first + expert, int(picked.numel()))
            if picked.numel() == 0:
                continue
            gate, up = nn.functional.linear(rows[picked], self.gate_up_proj[expert]).chunk(2, dim=-1)
            out[picked] = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[expert])
        back = self._all_to_all(out, receive_counts, send_counts)
        results = torch.empty_like(back)
        results[order] = back  # token-major again: [my tokens x k, hidden]
        weights = top_k_weights[mine]  # [my tokens, k]
        # The weighting as transformers does it: an fp16 output times the router's fp32 weight, then cast back.
        results = (results.view(len(mine), k, -1) * weights[..., None]).to(hidden_states.dtype)
        # Sum each token's expert outputs in increasing expert order from zero, as transformers' loop adds them.
        slots = torch.argsort(top_k_index[mine], dim=1, stable=True)
        combined = torch.zeros_like(hidden_states[mine])
        for slot in range(k):
            combined = combined + results.gather(1, slots[:, slot, None, None].expand(-1, 1, results.shape[-1]))[:, 0]
        return self._gather_tokens(combined, tokens)

    def _gather_tokens(self, mine: torch.Tensor, tokens: int) -> torch.Tensor:
        """Every rank's share of the tokens, in token order, on every rank of the stage."""
        sizes = [len(part) for part in torch.arange(tokens).tensor_split(self.ep)]
        padded = mine.new_zeros((max(sizes), mine.shape[-1]))
        padded[: len(mine)] = mine
        gathered = [torch.empty_like(padded) for _ in range(self.ep)]
        t0 = time.perf_counter()
        dist.all_gather(gathered, padded, group=self.group)
        self.stats.all_to_all_s += time.perf_counter() - t0
        return torch.cat([part[:size] for part, size in zip(gathered, sizes)])


class ExpertStats:
    """Tokens each of this rank's experts processed, and the time in the routing collectives."""

    def __init__(self) -> None:
        self.tokens: dict[int, int] = {}
        self.all_to_all_s = 0.0

    def add(self, expert: int, tokens: int) -> None:
        self.tokens[expert] = self.tokens.get(expert, 0) + tokens

    def reset(self) -> None:
        self.tokens.clear()
        self.all_to_all_s = 0.0

    def facts(self) -> dict:
        return {"expert_tokens": {str(e): n for e, n in sorted(self.tokens.items())},
                "all_to_all_s": self.all_to_all_s}


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The MoE blocks of a stage: modules with a router (`gate`) and 3-D `experts`."""
    return [m for m in model.modules() if hasattr(m, "gate") and hasattr(getattr(m, "experts", None), "gate_up_proj")]


def shard_experts(model: nn.Module, group: dist.ProcessGroup, ep_rank: int, ep: int) -> ExpertStats:
    """Keep 1/ep of each MoE layer's experts on this rank and route tokens to the others' (collective)."""
    stats = ExpertStats()
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("expert parallel needs a mixture-of-experts model; this one has no MoE layers")
    for block in blocks:
        block.experts = ExpertShard(block.experts, group, ep_rank, ep, stats)
    return stats
