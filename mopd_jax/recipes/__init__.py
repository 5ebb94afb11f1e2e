"""Recipes: short loops composing data -> sample -> score -> loss -> step -> checkpoint.

``RECIPES`` is the one registry of recipe names (``run.recipe``, ``mopd train``, ``mopd
compare``); ``recipe_fn(name)`` imports the recipe only when it runs.
"""

from __future__ import annotations

import importlib

RECIPES = {
    "sft": "mopd_jax.recipes.sft:run_sft",
    "grpo": "mopd_jax.recipes.grpo:run_grpo",
    "mopd": "mopd_jax.recipes.mopd:run_mopd",
    "mix_rl": "mopd_jax.recipes.baselines:run_mix_rl",
    "cascade": "mopd_jax.recipes.baselines:run_cascade",
    "offpolicy_ft": "mopd_jax.recipes.baselines:run_offpolicy_ft",
    "merge": "mopd_jax.recipes.baselines:run_merge",
}


def recipe_fn(name: str):
    """The ``run_<recipe>(cfg, *, resume, quiet)`` function of recipe ``name``."""
    if name not in RECIPES:
        raise KeyError(f"run.recipe: unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    module, fn = RECIPES[name].split(":")
    return getattr(importlib.import_module(module), fn)
