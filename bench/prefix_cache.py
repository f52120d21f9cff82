"""Shared prefixes on vLLM's CPU build (prefix caching on, its default): the same lengths sent with and without
sharing, side by side against one `vllm serve`, and what vLLM's own /metrics say it reused.

Each repeat sends two loads, alternating which goes first: `shared` (`--groups` groups; a group's requests open
with one `--prefix-tokens` prefix, then a `--suffix-tokens` question of their own) and `unshared` (the same lengths,
one group per request: no two requests share a prefix). Each repeat draws new prefixes (its own seed), so nothing is
cached from an earlier repeat or the other load. Printed per load: the prefix-cache hit rate over the load (vLLM's
prefix_cache_hits / prefix_cache_queries, in tokens; it caches whole blocks, 128 tokens on CPU) and the median
TTFT; then the medians over repeats and the ratio of the median TTFTs.

    python -m bench.prefix_cache [--requests 24] [--rate 4] [--repeats 3] [--groups 2] [--prefix-tokens 1536]
                                 [--suffix-tokens 32] [--new-tokens 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench.experiments import experiment_file, run_local
from bench.vllm_side_by_side import VLLM_PYTHON, served_model_name, start_vllm, stop, wait_healthy
from distinfer.net import free_port


def shared_load(work: Path, name: str, url: str, model: Path, groups: int, seed: int,
                args: argparse.Namespace) -> dict:
    """One shared-prefix load (an endpoint experiment) against `url`: its summary.json."""
    config = experiment_file(
        work / f"{name}.yaml", name, model={"path": str(model)},
        scenario={"kind": "serving", "rate": args.rate, "seed": seed, "requests": args.requests,
                  "warmup_requests": 0, "ignore_eos": True, "input": "shared_prefix",
                  "shared_prefix": {"groups": groups, "prefix_tokens": args.prefix_tokens,
                                    "suffix_tokens": args.suffix_tokens, "output_tokens": args.new_tokens}},
        endpoint={"url": url, "model": served_model_name(url)})
    proc = run_local(config, "--force", "--outputs", str(work / "outputs"), timeout=1800)
    summaries = [json.loads(p.read_text()) for p in (work / "outputs" / name).glob("*/summary.json")]
    if proc.returncode != 0 or not summaries or summaries[0]["status"] != "ok":
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return summaries[0]


def main() -> None:
    from distinfer.models.tiny import build_tiny_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--rate", type=float, default=4.0, help="requests/s (Poisson, seeded)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--prefix-tokens", type=int, default=1536)
    parser.add_argument("--suffix-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    if not VLLM_PYTHON.is_file():
        sys.exit(f"vLLM's environment is missing ({VLLM_PYTHON}): run `make vllm-env` first")
    model = build_tiny_model("tiny-llama")
    results: dict[str, list[tuple[float | None, float]]] = {"shared": [], "unshared": []}
    with tempfile.TemporaryDirectory(prefix="distinfer-prefix-") as folder:
        work = Path(folder)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        length = args.prefix_tokens + args.suffix_tokens + args.new_tokens
        proc, log = start_vllm(work, model, "pp1", port, max_model_len=max(512, 1 << length.bit_length()))
        try:
            wait_healthy(url, proc, log)
            for repeat in range(args.repeats):
                order = ("shared", "unshared") if repeat % 2 == 0 else ("unshared", "shared")
                for kind in order:
                    groups = args.groups if kind == "shared" else args.requests
                    seed = 1000 + 2 * repeat + (kind == "unshared")  # no prefix of one load is drawn by the other
                    summary = shared_load(work, f"{kind}-{repeat}", url, model, groups, seed, args)
                    hit_rate, ttft = summary["prefix_cache_hit_rate"], summary["ttft_s"]["p50"] * 1e3
                    results[kind].append((hit_rate, ttft))
                    shown = "not reported" if hit_rate is None else f"{hit_rate:.1%}"
                    print(f"repeat {repeat} {kind:>8}: prefix-cache hit rate {shown}, TTFT p50 {ttft:.2f} ms",
                          flush=True)
        finally:
            stop(proc)
    print(f"\nvLLM CPU, tiny Llama fp32, {args.requests} requests at {args.rate:g}/s, prompts of {args.prefix_tokens} "
          f"+ {args.suffix_tokens} tokens ({args.groups} shared prefixes, or none shared); medians of "
          f"{args.repeats} repeats:")
    medians = {}
    for kind, rows in results.items():
        rates = [r for r, _ in rows if r is not None]
        medians[kind] = statistics.median(t for _, t in rows)
        rate = f"{statistics.median(rates):.1%}" if rates else "not reported"
        print(f"  {kind:>8}: prefix-cache hit rate {rate}, median TTFT {medians[kind]:.2f} ms")
    ratio = medians["shared"] / medians["unshared"]
    print(f"  shared / unshared median TTFT: {ratio:.2f} ({'lower with sharing' if ratio < 1 else 'NOT lower'})")


if __name__ == "__main__":
    main()
