"""Serving benchmarks: requests arriving over time at an OpenAI-compatible server.

The load generator knows nothing of the engine (as vLLM's `bench serve`): `schedule.py` builds a seeded
arrival schedule, `workload.py` the requests to send, `client.py` fires them with aiohttp and records every
streamed chunk's time, and `metrics.py` derives TTFT, TPOT, ITL, E2E and goodput from the raw records.
They share only the request record (`records.py`).
"""
