"""The server's ranks talking: steps and hidden states from stage to stage, sampled tokens back to stage 0;
or, in a tensor-parallel layout, each step broadcast from rank 0 to the ranks that hold the other shards.

Stage 0 (the rank with the HTTP server and the scheduler) sends each group's `Step` to stage 1, which passes
it on before it computes, so that every stage knows what comes; the hidden states follow, one message per
forward, their shape known from the step. The last stage sends the step's sampled tokens to stage 0. Sends
do not wait (a send completes when the peer receives), so several groups are in the pipeline at once and the
stages work on different groups at the same time. `None` as a step stops the stages; an empty step (group
-1) is a heartbeat that keeps an idle server's stages within the process group's timeout.

In a tensor-parallel layout (DeepSpeed AutoTP: every rank runs every layer on its shard, and the layers'
all-reduces join them) each rank applies every step to its shard; rank 0 samples, the others' tokens are
the same and are not used.
"""

from __future__ import annotations

import pickle
import time

import torch
import torch.distributed as dist

from distinfer.serving.stages import StageState, Step

HEARTBEAT = Step(group=-1)


class StageLink:
    """Point-to-point messages of one stage over the job's process group (gloo on CPU, NCCL on GPU)."""

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        self.group = dist.group.WORLD
        self.wait_s = 0.0  # time spent waiting in receives
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        tensor = tensor.contiguous()
        self._pending = [(work, t) for work, t in self._pending if not work.is_completed()]
        self._pending.append((self.group.send([tensor], dst, 0), tensor))

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        t0 = time.perf_counter()
        self.group.recv([buf], src, 0).wait()
        self.wait_s += time.perf_counter() - t0
        return buf

    def send_step(self, step: Step | None, dst: int) -> None:
        data = torch.frombuffer(bytearray(pickle.dumps(step)), dtype=torch.uint8).to(self.device)
        self.send(torch.tensor([data.numel()], device=self.device), dst)
        self.send(data, dst)

    def recv_step(self, src: int) -> Step | None:
        size = int(self.recv((1,), torch.long, src))
        return pickle.loads(self.recv((size,), torch.uint8, src).cpu().numpy().tobytes())

    def drain(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()


class TensorPeers:
    """Rank 0's steps broadcast to the other ranks of a tensor-parallel layout (a collective: every rank calls)."""

    def __init__(self) -> None:
        self.group = dist.group.WORLD

    def send_step(self, step: Step | None) -> None:
        dist.broadcast_object_list([step], src=0, group=self.group)

    def recv_step(self) -> Step | None:
        holder: list[Step | None] = [None]
        dist.broadcast_object_list(holder, src=0, group=self.group)
        return holder[0]

    def drain(self) -> None:
        """Nothing to wait for: a broadcast returns once every rank has it."""


def run_tensor_peer(stage: StageState, peers: TensorPeers) -> None:
    """A tensor-parallel rank other than 0, until rank 0 says stop: apply each step to this rank's shard."""
    while True:
        step = peers.recv_step()
        if step is None:
            break
        if step.group >= 0:
            _apply(stage, None, step)


def run_first_stage(stage: StageState, link: StageLink | None, step: Step) -> list[int] | None:
    """Stage 0's part of `step`: pass the step on and compute, sending each forward's hidden states to stage 1.
    With one stage the tokens are sampled here and returned; with more, None (they come back from the last)."""
    if link is not None:
        link.send_step(step, 1)
    return _apply(stage, link, step)


def run_later_stage(stage: StageState, link: StageLink) -> None:
    """A stage after the first, until stage 0 says stop: receive each step, pass it on, compute its forwards."""
    while True:
        step = link.recv_step(link.rank - 1)
        if not stage.is_last:
            link.send_step(step, link.rank + 1)
        if step is None:
            break
        if step.group < 0:
            continue
        tokens = _apply(stage, link, step)
        if tokens:
            link.send(torch.tensor(tokens, device=stage.device), 0)
    link.drain()


def _apply(stage: StageState, link: StageLink | None, step: Step) -> list[int] | None:
    """Keep, decode, prefill on this stage: the first stage from the step's token ids, the others from the
    hidden states the previous stage sends. Returns the sampled tokens on the last stage, else None after
    sending each forward's output to the next stage."""
    def hidden(rows: int, length: int) -> torch.Tensor:
        return link.recv((rows, length, stage.hidden_size), stage.dtype, link.rank - 1)

    stage.keep(step.group, step.keep)
    tokens: list[int] = []
    if step.decode:
        rows = stage.rows(step.group)
        ids = torch.tensor(step.tokens, device=stage.device) if stage.is_first else hidden(len(step.tokens), 1)
        out = stage.decode(step.group, ids)
        tokens += _pass_on(stage, link, step.group, out, range(rows))
    if step.prefills:
        lengths = [len(p.prompt_ids) for p in step.prefills]
        prompts = [p.prompt_ids for p in step.prefills] if stage.is_first else hidden(len(lengths), max(lengths))
        first_row = stage.rows(step.group)
        out = stage.prefill(step.group, prompts, lengths, [p.sampling for p in step.prefills])
        tokens += _pass_on(stage, link, step.group, out, range(first_row, first_row + len(lengths)))
    return tokens if stage.is_last else None


def _pass_on(stage: StageState, link: StageLink | None, group: int, out: torch.Tensor, rows: range) -> list[int]:
    if stage.is_last:
        return stage.sample(group, out, rows)
    link.send(out, link.rank + 1)
    return []
