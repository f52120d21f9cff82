"""Probes of this machine (torch, processes, shared-memory rings): what they measure is written to the cache
folder and read by the performance model (predict/), which never runs them itself."""
