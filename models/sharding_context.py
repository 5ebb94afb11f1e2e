"""What model code may know of the mesh it runs on: the active ``ShardingContext``.

``mopd_jax.sharding.use_rules`` opens one (``activation_sharding``); ``constrain`` applies its
logical sharding constraints (a no-op outside one) and kernels that run under ``shard_map``
(splash attention, the per-device MoE dispatch) read its mesh through ``current_sharding``.
Its own module so that layers, attention kernels and the MoE import it without a circle.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import jax

_ACTIVATION_RULES: list["ShardingContext"] = []


@dataclasses.dataclass(frozen=True)
class ShardingContext:
    """What model code may know of the mesh it runs on (set by ``mopd_jax.sharding.use_rules``).

    ``constrain(x, axes)`` applies a logical sharding constraint; kernels that must run under
    ``shard_map`` (splash attention, per-device MoE dispatch) read ``mesh`` and
    ``spec(axes, shape)`` (the PartitionSpec the role's rules give those logical axes).
    """

    constrain: Callable
    mesh: object = None
    spec: Callable | None = None


@contextlib.contextmanager
def activation_sharding(constrain_fn: Callable, mesh=None, spec_fn: Callable | None = None):
    """Within this context, ``constrain(x, axes)`` calls ``constrain_fn(x, axes)`` and
    ``current_sharding()`` returns the context.

    The caller (mopd_jax.sharding) supplies a function that maps logical axis names to a
    NamedSharding on its mesh; models stay mesh-agnostic.
    """
    _ACTIVATION_RULES.append(ShardingContext(constrain_fn, mesh, spec_fn))
    try:
        yield
    finally:
        _ACTIVATION_RULES.pop()


def current_sharding() -> ShardingContext | None:
    """The innermost active ``activation_sharding`` context, or None (no mesh: one device)."""
    return _ACTIVATION_RULES[-1] if _ACTIVATION_RULES else None


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint by logical axis names (no-op outside ``activation_sharding``)."""
    return _ACTIVATION_RULES[-1].constrain(x, axes) if _ACTIVATION_RULES else x
