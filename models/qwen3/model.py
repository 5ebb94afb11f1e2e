"""The Qwen3 / Qwen3-MoE decoder: the shared decoder as it is (QK-norm comes from the config)."""

from models.decoder import Decoder


class Model(Decoder):
    family = "qwen3"
