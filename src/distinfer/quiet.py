"""Third-party log lines go to distinfer's log, not to the user's terminal.

DeepSpeed announces its accelerator when `transformers` imports it, torchao lists the CUDA libraries it
cannot load on a CPU machine, and torch notes deprecations of torchao's calls. A rank's log keeps them
(logger `distinfer.third_party`, level INFO); the command line, which shows only warnings of its own,
does not print them. Call `route_third_party_logs` before those packages are imported (it is idempotent).
"""

from __future__ import annotations

import logging

THIRD_PARTY_LOGGERS = ("DeepSpeed", "torchao", "torch.utils._pytree")
SINK = "distinfer.third_party"


def _forward(record: logging.LogRecord) -> bool:
    """Re-log a third-party record under SINK; False: the record goes no further where it came from."""
    logging.getLogger(SINK).info("%s: %s", record.name, record.getMessage())
    return False


class _Forward(logging.Handler):
    """For the package's child loggers, whose records reach the package's logger's handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        _forward(record)


_HANDLER = _Forward()


def route_third_party_logs() -> None:
    """Filter (DeepSpeed brings its own handler, which a filter on its logger stops) and handler (for child
    loggers), once per logger."""
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        if _HANDLER not in logger.handlers:
            logger.addFilter(_forward)
            logger.addHandler(_HANDLER)
            logger.propagate = False


def quiet_transformers() -> None:
    """No progress bars or info lines from transformers in library use; third-party lines to the log."""
    route_third_party_logs()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
