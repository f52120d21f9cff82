"""Weight quantization of a loaded model (or pipeline stage): torchao int8 weight-only."""

from __future__ import annotations

import warnings

from torch import nn


def quantize_int8_weights(model: nn.Module) -> nn.Module:
    """Every nn.Linear's weight to int8 with a per-channel scale (torchao Int8WeightOnlyConfig), in place.

    Activations stay in the model's dtype; on CPU and GPU alike. Embeddings are not quantized.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())
    return model
