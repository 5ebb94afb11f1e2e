"""The model families and one way to build any of them: ``build(cfg, rngs)``.

A family is a package ``models/<family>/`` exposing ``Model`` (a ``models.decoder.Decoder``),
``MODEL_TYPES`` / ``ARCHITECTURES`` (the Hugging Face names it reads), ``config_kwargs(c)``
and ``hf_config(cfg)`` (config.json both ways), ``param_table(cfg)`` (the weight mapping) and
``PRESETS``. Adding a family is its folder plus one line below.
"""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES = {
    "qwen3": "models.qwen3",                  # Qwen3, Qwen3-MoE
    "mimo_v2_flash": "models.mimo_v2_flash",  # MiMo-V2-Flash (hybrid SWA + sinks, sigmoid MoE)
    "llama": "models.llama",                  # Llama 3.x, Qwen2 / Qwen2.5
}


class UnknownFamilyError(ValueError):
    """A config names a family (or a Hugging Face model_type) that no module implements."""


def family(name: str) -> ModuleType:
    """The module of family ``name``."""
    if name not in FAMILIES:
        raise UnknownFamilyError(f"model.family: unknown family {name!r}; supported: "
                                 f"{sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])


def family_for_hf(model_type: str | None, architecture: str | None) -> str:
    """The family that reads a config.json of ``model_type`` / ``architecture``."""
    for name in FAMILIES:
        fam = family(name)
        if model_type in fam.MODEL_TYPES or architecture in fam.ARCHITECTURES:
            return name
    known = sorted(t for n in FAMILIES for t in family(n).MODEL_TYPES)
    raise UnknownFamilyError(f"unsupported model_type {model_type or architecture!r}; "
                             f"supported model types: {known} (families {sorted(FAMILIES)})")


def build(cfg, rngs):
    """A model of ``cfg.family`` built from ``cfg`` (parameters drawn from ``rngs``)."""
    return family(cfg.family).Model(cfg, rngs)
