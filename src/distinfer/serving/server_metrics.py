"""The target's own counters, read from its Prometheus `GET /metrics` before and after a load.

vLLM counts its prefix cache in tokens: `vllm:prefix_cache_queries_total` (prompt tokens looked up) and
`vllm:prefix_cache_hits_total` (those found cached). A load's hit rate is the change of hits over the change of
queries while it ran (warm-up requests included). A target that does not report them (distinfer's server, or an
endpoint without /metrics) gives None, and the summary says the rate was not reported: never 0.
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
PREFIX_HITS = "vllm:prefix_cache_hits_total"
SCRAPE_TIMEOUT_S = 5.0
MAX_BYTES = 8 << 20  # a /metrics page larger than this is not read


def metrics_url(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1") + "/metrics"


def parse(text: str) -> dict[str, float]:
    """Each sample name's value, summed over its labels (engines, models); {} for text that is not Prometheus's."""
    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    except (ValueError, TypeError, IndexError):
        return {}
    return values


def scrape(url: str, api_key: str | None = None) -> dict[str, float] | None:
    """The target's counters now, or None where it has no readable /metrics."""
    request = urllib.request.Request(metrics_url(url), headers={"Authorization": f"Bearer {api_key}"} if api_key
                                     else {})
    try:
        with urllib.request.urlopen(request, timeout=SCRAPE_TIMEOUT_S) as response:
            text = response.read(MAX_BYTES).decode("utf-8", errors="replace")
    except (OSError, ValueError):
        return None
    return parse(text) or None


def prefix_cache(before: dict[str, float] | None, after: dict[str, float] | None) -> dict | None:
    """{queried_tokens, hit_tokens, hit_rate} over the load, or None where the target does not count them."""
    if not before or not after or not all(name in d for name in (PREFIX_QUERIES, PREFIX_HITS) for d in (before, after)):
        return None
    queried = after[PREFIX_QUERIES] - before[PREFIX_QUERIES]
    hits = after[PREFIX_HITS] - before[PREFIX_HITS]
    return {"queried_tokens": queried, "hit_tokens": hits, "hit_rate": hits / queried if queried > 0 else None}
