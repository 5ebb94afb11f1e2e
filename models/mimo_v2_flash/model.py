"""The MiMo-V2-Flash decoder: the shared decoder; every trait is a config field set by
``mimo_config`` / ``config_kwargs`` (per-layer KV heads and sinks, Vd, value scale, partial
rotary with per-kind bases, grouped sigmoid router)."""

from models.decoder import Decoder


class Model(Decoder):
    family = "mimo_v2_flash"
