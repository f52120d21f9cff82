"""What runs on each rank: process group, stages, engines, sampling and the worker."""
