"""The Llama decoder: the shared decoder with Llama 3's RoPE frequency scaling."""

from __future__ import annotations

import math

from models.config import ModelConfig
from models.decoder import Decoder
from models.layers import default_inv_freq


def llama3_inv_freq(inv_freq, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position_embeddings: float) -> tuple[float, ...]:
    """Llama 3 scaling: long wavelengths divided by ``factor``, short ones kept, a smooth blend
    between (transformers' ``_compute_llama3_parameters``)."""
    old = original_max_position_embeddings
    low_wavelen, high_wavelen = old / low_freq_factor, old / high_freq_factor
    out = []
    for f in inv_freq:
        wavelen = 2 * math.pi / f
        g = f / factor if wavelen > low_wavelen else f
        if high_wavelen <= wavelen <= low_wavelen:
            smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            g = (1 - smooth) * g / factor + smooth * g
        out.append(float(g))
    return tuple(out)


class Model(Decoder):
    family = "llama"

    @staticmethod
    def rope_inv_freq(cfg: ModelConfig, layer_idx: int) -> tuple[float, ...]:
        if not cfg.rope_scaling:
            return None
        return llama3_inv_freq(default_inv_freq(cfg, layer_idx), **dict(cfg.rope_scaling))
