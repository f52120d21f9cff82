"""Models: built-in tiny models, model profiles, per-family adapters and partial loading."""
