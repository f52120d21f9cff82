"""Pipeline-parallel generation over torch.distributed point-to-point messages.

Stage r owns a slice of decoder layers (stage 0 also the embedding, the last stage the norm and
head) and one KV cache per micro-batch. Hidden states go forward as one message per hop, with no
header: every rank knows the shape (the batch's prompt length at prefill, one position after). The
last stage samples and sends the token ids to stage 0, which feeds them in again, and to the middle
stages, so that every stage applies the same stop rule (EOS in every row, or the length) and a
finished micro-batch leaves every stage without a message of its own. All stages walk the live
micro-batches in the same order. With several micro-batches, stage 0 starts micro-batch k+1 while
later stages work on k. While a stage waits for its input it builds the next forward's mask and
rotary embedding, which need no hidden states. A Llama stage on CPU runs its decode steps through
`LlamaDecoder` (fewer operations, a preallocated KV cache per micro-batch) when the worker passes one.
CPU stages on one machine pass each message that fits a slot through a shared-memory ring with a futex
wake-up (runtime/cpu/shm_ring.py); the rest go straight to the process group (`ProcessGroup.send/recv`),
past the `torch.distributed` wrappers' cost per call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from transformers import DynamicCache

from distinfer.models.families import Family
from distinfer.runtime.sampling import Sampler

RING_SLOT_BYTES = 1 << 20  # decode messages up to 1 MiB (e.g. 80 rows of a 3200-wide model) go through a ring

class Decoder(Protocol):
    """Runs a stage's decode steps instead of the model's own forward (runtime/cpu/llama_decode.py on CPU)."""

    def adopt(self, cache: DynamicCache, rows: int, capacity: int) -> object: ...
    def prepare(self, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> object: ...
    def run(self, hidden: torch.Tensor, inputs: object, kv: object) -> torch.Tensor: ...


@dataclass(frozen=True)
class Batch:
    """Prompts generated together, tokenized with left padding to the batch's longest prompt."""

    index: int
    prompt_indices: list[int]
    input_ids: torch.Tensor  # [rows, seq]
    attention_mask: torch.Tensor  # [rows, seq]


@dataclass
class BatchOutput:
    """Per row: generated token ids (through the first EOS) and their arrival times since the batch start."""

    tokens: list[list[int]]
    token_times: list[list[float]]
    start: float


@dataclass(frozen=True)
class StopRule:
    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int


@dataclass
class _MicroBatch:
    index: int
    rows: torch.Tensor  # row numbers within the batch
    prompt_indices: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    cache: DynamicCache | None = field(default_factory=DynamicCache)  # prefill's; None once `kv` holds it
    kv: object | None = None  # the decoder's cache (a StaticKV on CPU Llama stages), from the first decode step on
    finished: torch.Tensor | None = None
    any_finished: bool = False  # a row has sampled EOS (its later tokens are padding)
    tokens: list[torch.Tensor] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    step: int = 0  # forwards done on this stage
    generated: int = 0  # tokens sampled so far (every stage counts them to apply the stop rule)
    pending_tokens: torch.Tensor | None = None  # single-stage: sampled, not yet consumed
    layer_kwargs: object | None = None  # the next forward's mask, rotary embedding, ..., built ahead
    decoder_step: bool = False  # layer_kwargs are the decoder's inputs (its `prepare`), not transformers' kwargs
    prepare_s: float = 0.0  # time spent building them (counted as compute)

    def extend(self) -> None:
        """One more position for every row: what `generate` does to the mask and positions each step."""
        ones = torch.ones_like(self.attention_mask[:, :1])
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=-1)
        self.position_ids = self.position_ids[:, -1:] + 1


def prefill_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded prompts, as `transformers` generate computes them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


class PipelineEngine:
    """One rank's stage of the pipeline; every rank calls `generate` with the same batches."""

    def __init__(
        self,
        model: nn.Module,
        family: Family,
        rank: int,
        world_size: int,
        device: torch.device,
        sampler: Sampler,
        stop: StopRule,
        microbatches: int = 1,
        group: dist.ProcessGroup | None = None,
        decoder: Decoder | None = None,
        shared_memory: bool = True,
        timeout_s: float = 1800.0,
    ) -> None:
        """`rank` and `world_size` are this stage's place in `group`, by default the whole job's group;
        `decoder`, where given, runs the decode steps of this stage's layers. With `shared_memory`, CPU stages
        on one machine pass the messages that fit a ring's slot through `SharedRing`s (collective: every rank
        of `group` builds its engine with the same setting); a receive fails after `timeout_s` without one."""
        self.model, self.family = model, family
        self.rank, self.world_size, self.device = rank, world_size, device
        self.is_first, self.is_last = rank == 0, rank == world_size - 1
        self.sampler, self.stop, self.microbatches = sampler, stop, microbatches
        self.decoder = decoder
        self.hidden_size = int(model.config.hidden_size)
        self.dtype = next(model.parameters()).dtype
        self.steps: list[dict] = []  # raw per-step timings of this rank
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []  # keep each tensor alive until sent
        self._group = (group or dist.group.WORLD) if world_size > 1 else None
        self._token_peers = list(range(world_size - 1)) if self.is_last else []  # stage 0 and the middle stages
        self._eos = torch.tensor(stop.eos_token_ids, device=device)
        self._batch_index = 0
        self.messages = {"ring": 0, "backend": 0}  # messages this rank sent or received, by path
        self._rings_in: dict = {}  # peer -> SharedRing (runtime/cpu/shm_ring.py), CPU stages only
        self._rings_out: dict = {}
        self._peers = 0  # the ranks this stage receives from or sends to, counted per direction
        if self._group is not None:
            sources = sorted(({rank - 1} if rank > 0 else set()) | ({world_size - 1} if not self.is_last else set()))
            destinations = self._token_peers if self.is_last else [rank + 1]
            self._peers = len(sources) + len(destinations)
            if device.type == "cpu" and shared_memory:
                from distinfer.runtime.cpu.shm_ring import connect_rings

                self._rings_in, self._rings_out = connect_rings(self._group, rank, sources, destinations,
                                                                microbatches + 2, RING_SLOT_BYTES, timeout_s)

    @property
    def transport(self) -> str:
        """How this stage's messages travel: the backend's, 'shared memory', or both where only some peers
        share this machine."""
        rings = len(self._rings_in) + len(self._rings_out)
        if self._group is None:
            return "none"
        if rings == 0:
            return dist.get_backend(self._group)
        return "shared memory" if rings == self._peers else f"shared memory + {dist.get_backend(self._group)}"

    # -- communication, timed ------------------------------------------------------------------
    def _send(self, tensor: torch.Tensor, dst: int) -> None:
        tensor = tensor.contiguous()
        ring = self._rings_out.get(dst)
        if ring is not None and ring.fits(tensor):  # both ends decide by size alone: each path keeps its order
            ring.send(tensor)
            self.messages["ring"] += 1
            return
        self.messages["backend"] += 1
        self._pending.append((self._group.send([tensor], dst, 0), tensor))

    def _drain(self) -> None:
        """Wait for every send. Only at the end of a batch: a send completes when the peer receives it,
        so waiting mid-batch can deadlock two stages that both wait for their sends."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def _forget_completed(self) -> None:
        self._pending = [(work, t) for work, t in self._pending if not work.is_completed()]

    def _recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        ring = self._rings_in.get(src)
        if ring is not None and ring.fits(buf):
            self.messages["ring"] += 1
            return ring.recv(buf)
        self.messages["backend"] += 1
        self._group.recv([buf], src, 0).wait()
        return buf

    def _ends(self, mb: _MicroBatch, tokens: torch.Tensor) -> bool:
        """Note one step's sampled tokens; True when the micro-batch is done (every row at EOS, or the length).
        Every stage calls this with the same tokens, so they all drop the micro-batch at the same step."""
        mb.generated += 1
        if mb.generated >= self.stop.max_new_tokens:
            return True
        mb.finished |= torch.isin(tokens, self._eos)
        done = int(mb.finished.sum())
        mb.any_finished = done > 0
        return done == mb.finished.numel()

    def _sync(self) -> None:
        if self.device.type == "cuda":  # GPU path: kernels are asynchronous; time them whole
            torch.cuda.synchronize(self.device)

    def _record(self, mb: _MicroBatch, tokens: int, compute: float, send: float, wait: float) -> None:
        self.steps.append(
            {"batch": self._batch_index, "mb": mb.index, "step": mb.step, "tokens": tokens,
             "compute_s": compute, "send_s": send, "wait_s": wait}
        )

    # -- one stage's work on one micro-batch --------------------------------------------------
    def _prepare(self, mb: _MicroBatch, positions: int) -> None:
        """Build the next forward's layer inputs (mask, rotary embedding) from what is known before its
        input arrives: called while waiting, it takes these small ops off the path from one stage to the next."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            if positions == 1 and self.decoder is not None:
                if mb.kv is None:  # the first decode step takes over what prefill cached
                    capacity = mb.input_ids.shape[1] + self.stop.max_new_tokens
                    mb.kv, mb.cache = self.decoder.adopt(mb.cache, mb.rows.numel(), capacity), None
                mb.layer_kwargs = self.decoder.prepare(mb.attention_mask, mb.position_ids)
                mb.decoder_step = True
            else:
                mb.decoder_step = False
                mb.layer_kwargs = self.family.layer_kwargs(self.model, (mb.rows.numel(), positions), self.dtype,
                                                           mb.attention_mask, mb.position_ids, mb.cache)
        mb.prepare_s = time.perf_counter() - t0

    def _compute(self, mb: _MicroBatch, inputs: torch.Tensor) -> torch.Tensor:
        """Embedding (first stage), this stage's layers, and the head + sampling (last stage)."""
        layer_kwargs, mb.layer_kwargs = mb.layer_kwargs, None  # built by `_prepare` before every forward
        hidden = self.family.embed(self.model, inputs, mb.position_ids) if self.is_first else inputs
        if mb.decoder_step:
            hidden = self.decoder.run(hidden, layer_kwargs, mb.kv)
        else:
            hidden = self.family.run_layers(self.model, hidden, layer_kwargs)
        if not self.is_last:
            return hidden
        logits = self.family.head(self.model, hidden[:, -1:, :])[:, -1, :]
        return self.sampler(logits, mb.prompt_indices)

    def _forward(self, mb: _MicroBatch, inputs: torch.Tensor, wait: float) -> torch.Tensor:
        """Compute, send the result on, note the timings; returns the result (the last stage's: tokens)."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self._compute(mb, inputs)
        self._sync()
        t1 = time.perf_counter()
        if self.is_last and self.is_first:
            mb.pending_tokens = out
        elif self.is_last:
            for peer in self._token_peers:
                self._send(out, peer)
        else:
            self._send(out, self.rank + 1)
        self._forget_completed()
        compute, mb.prepare_s = t1 - t0 + mb.prepare_s, 0.0
        self._record(mb, int(inputs.shape[0] * inputs.shape[1]), compute, time.perf_counter() - t1, wait)
        return out

    def _first_stage_step(self, mb: _MicroBatch, start: float) -> bool:
        """Stage 0: take the sampled tokens of `mb`, decide whether it goes on, feed them in again. The next
        position's inputs are built before the tokens are awaited (wasted once, at the micro-batch's end)."""
        mb.extend()
        self._prepare(mb, 1)
        t0 = time.perf_counter()
        if self.is_last:
            tokens, mb.pending_tokens = mb.pending_tokens, None
        else:
            tokens = self._recv((mb.rows.numel(),), torch.long, self.world_size - 1)
        wait = time.perf_counter() - t0
        mb.times.append(time.perf_counter() - start)
        if mb.any_finished:
            tokens = torch.where(mb.finished, self.stop.pad_token_id, tokens)
        mb.tokens.append(tokens)
        mb.step += 1
        if self._ends(mb, tokens):
            return False
        self._forward(mb, tokens[:, None], wait)
        return True

    def _later_stage_step(self, mb: _MicroBatch) -> bool:
        """Stages 1..n-1: receive hidden states, compute, pass them on (or sample and send the tokens)."""
        rows = mb.rows.numel()
        wait = 0.0
        if mb.step > 0 and not self.is_last:  # a middle stage learns the last step's tokens first
            t0 = time.perf_counter()
            tokens = self._recv((rows,), torch.long, self.world_size - 1)
            wait = time.perf_counter() - t0
            if self._ends(mb, tokens):
                return False
        if mb.step > 0:
            mb.extend()
        length = mb.input_ids.shape[1] if mb.step == 0 else 1
        self._prepare(mb, length)
        t0 = time.perf_counter()
        hidden = self._recv((rows, length, self.hidden_size), self.dtype, self.rank - 1)
        wait += time.perf_counter() - t0
        out = self._forward(mb, hidden, wait)
        mb.step += 1
        return not (self.is_last and self._ends(mb, out))

    # -- a whole batch --------------------------------------------------------------------------
    def generate(self, batch: Batch) -> BatchOutput | None:
        """Generate for one batch; returns the tokens on stage 0 and None on the other stages."""
        self._batch_index = batch.index
        input_ids = batch.input_ids.to(self.device)
        attention_mask = batch.attention_mask.to(self.device)
        positions = prefill_positions(attention_mask)
        micro = []
        for index, rows in enumerate(torch.arange(input_ids.shape[0]).tensor_split(self.microbatches)):
            if rows.numel() == 0:
                continue
            micro.append(
                _MicroBatch(
                    index=index,
                    rows=rows,
                    prompt_indices=[batch.prompt_indices[r] for r in rows.tolist()],
                    input_ids=input_ids[rows],
                    attention_mask=attention_mask[rows],
                    position_ids=positions[rows],
                    finished=torch.zeros(rows.numel(), dtype=torch.bool, device=self.device),
                )
            )
        start = time.perf_counter()
        live = list(micro)
        if self.is_first:
            for mb in micro:
                self._prepare(mb, mb.input_ids.shape[1])
                self._forward(mb, mb.input_ids, 0.0)
            while live:
                live = [mb for mb in live if self._first_stage_step(mb, start)]
        else:
            while live:
                live = [mb for mb in live if self._later_stage_step(mb)]
        self._drain()
        if not self.is_first:
            return None
        return _collect(micro, batch.input_ids.shape[0], self.stop, start)


def _collect(micro: list[_MicroBatch], rows: int, stop: StopRule, start: float) -> BatchOutput:
    tokens: list[list[int]] = [[] for _ in range(rows)]
    times: list[list[float]] = [[] for _ in range(rows)]
    for mb in micro:
        generated = torch.stack(mb.tokens, dim=1).tolist()  # [rows, steps]
        for row, ids in zip(mb.rows.tolist(), generated):
            tokens[row], times[row] = truncate_at_eos(ids, mb.times, stop.eos_token_ids)
    return BatchOutput(tokens=tokens, token_times=times, start=start)


def eos_prefix(ids: list[int], eos: tuple[int, ...]) -> list[int]:
    """Tokens through the first EOS (inclusive)."""
    for i, token in enumerate(ids):
        if token in eos:
            return ids[: i + 1]
    return ids


def truncate_at_eos(ids: list[int], times: list[float], eos: tuple[int, ...]) -> tuple[list[int], list[float]]:
    """Tokens through the first EOS (inclusive), with their times."""
    tokens = eos_prefix(ids, eos)
    return tokens, times[: len(tokens)]
