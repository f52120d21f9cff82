"""The performance model: predicted TTFT, TPOT, tokens/s and per-rank busy time of every run, from the model's
sizes, the hardware's peak figures (datasheets; on CPU a probe of the machine) and parameters calibrated on
measured runs. Pure Python + numpy apart from the CPU probe, so `plan` and `predict` run without torch."""
