"""Which layers each pipeline stage owns (pure: no torch, so the planner can use it)."""

from __future__ import annotations

from dataclasses import dataclass


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
