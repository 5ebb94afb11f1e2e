"""Meshes, logical-axis rules per role, sharded init and reshard.

A *role* is a layout: ``train`` (student params + optimizer: FSDP over 'fsdp', tensor and
expert parallel), ``sample`` (student params for decode: no FSDP gathers per token, TP/EP
heavy) and ``teacher`` (teacher params for prefill scoring). A layout is a table from logical
axis names (carried by every parameter as ``logical_axes`` metadata) to mesh axes. Moving
params between roles is one ``reshard`` call.

Multi-host: call ``initialize_distributed()`` before building the mesh; ``make_mesh`` then
spans ``jax.devices()`` of every process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from typing import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.sharding_context import activation_sharding

MESH_AXES = ("data", "fsdp", "tensor", "expert")


class MeshError(ValueError):
    """The requested mesh does not fit the devices."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape; exactly one axis may be -1, meaning all remaining devices."""

    data: int = 1
    """Pure data parallelism (params replicated across it)."""
    fsdp: int = -1
    """Data parallelism with params and optimizer state sharded across it (train role)."""
    tensor: int = 1
    """Tensor parallelism over heads, MLP width and vocabulary."""
    expert: int = 1
    """Expert parallelism over the MoE expert axis."""
    roles: dict[str, int] = dataclasses.field(default_factory=dict)
    """Disaggregated sub-meshes: devices per role (trainer, sampler, optionally teachers),
    taken in device order; each role's mesh has the axes above (one may be -1). Empty: one
    mesh for everything. Single-process only for now."""

    def __post_init__(self):
        sizes = self.axis_sizes()
        unknown = sorted(set(self.roles) - set(ROLES))
        if unknown:
            raise MeshError(f"mesh.roles: unknown role(s) {unknown}; choose from {list(ROLES)}")
        if self.roles and not {"trainer", "sampler"} <= set(self.roles):
            raise MeshError("mesh.roles: give both trainer and sampler device counts (and "
                            "optionally teachers), e.g. mesh.roles={trainer: 4, sampler: 4}")
        for role, n in self.roles.items():
            if not isinstance(n, int) or n < 1:
                raise MeshError(f"mesh.roles.{role}: must be a device count >= 1, got {n!r}")
        if sum(s == -1 for s in sizes) > 1:
            raise MeshError("mesh: at most one axis may be -1 (the rest of the devices); "
                            f"got {dict(zip(MESH_AXES, sizes))}")
        for name, s in zip(MESH_AXES, sizes):
            if s == 0 or s < -1:
                raise MeshError(f"mesh.{name}: must be a positive size or -1, got {s}")

    def axis_sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in MESH_AXES)

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Concrete axis sizes for ``num_devices``; a clear error when they do not fit."""
        sizes = dict(zip(MESH_AXES, self.axis_sizes()))
        fixed = math.prod(s for s in sizes.values() if s != -1)
        for name, s in sizes.items():
            if s == -1:
                if num_devices % fixed:
                    raise MeshError(
                        f"mesh: the fixed axes multiply to {fixed}, which does not divide the "
                        f"{num_devices} devices; change the sizes so their product divides "
                        f"{num_devices} (or set one axis to -1)")
                sizes[name] = num_devices // fixed
        if math.prod(sizes.values()) != num_devices:
            raise MeshError(
                f"mesh: {sizes} needs {math.prod(sizes.values())} devices but "
                f"{num_devices} are available; set one axis to -1 or change the sizes")
        return sizes


ROLES = ("trainer", "sampler", "teachers")  # mesh.roles, in device order

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated), per role.
RULES: dict[str, dict[str, object]] = {
    "train": {
        "batch": ("data", "fsdp"), "length": None, "tokens": ("data", "fsdp"),
        "vocab": "tensor", "embed": "fsdp", "mlp": "tensor", "q_heads": "tensor",
        "kv_heads": "tensor", "head_dim": None, "expert": "expert", "norm": None,
        "layers": None,
    },
    "sample": {
        "batch": ("data", "fsdp"), "length": None, "tokens": ("data", "fsdp"),
        "vocab": "tensor", "embed": None, "mlp": "tensor", "q_heads": "tensor",
        "kv_heads": "tensor", "head_dim": None, "expert": "expert", "norm": None,
        "layers": None,
    },
    "teacher": {
        "batch": ("data", "fsdp"), "length": None, "tokens": ("data", "fsdp"),
        "vocab": "tensor", "embed": "fsdp", "mlp": "tensor", "q_heads": "tensor",
        "kv_heads": "tensor", "head_dim": None, "expert": "expert", "norm": None,
        "layers": None,
    },
}


def initialize_distributed() -> None:
    """Start ``jax.distributed`` when launched multi-process (env set by the launcher).

    ``JAX_COORDINATOR_ADDRESS`` / ``MOPD_NUM_PROCESSES`` + ``MOPD_PROCESS_ID`` name the
    cluster explicitly; ``MOPD_DISTRIBUTED=auto`` lets JAX detect it (Cloud TPU slices).
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("MOPD_NUM_PROCESSES"):
        kw = {}
        if os.environ.get("JAX_COORDINATOR_ADDRESS"):
            kw["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
        if os.environ.get("MOPD_NUM_PROCESSES"):
            kw["num_processes"] = int(os.environ["MOPD_NUM_PROCESSES"])
            kw["process_id"] = int(os.environ["MOPD_PROCESS_ID"])
        jax.distributed.initialize(**kw)
    elif os.environ.get("MOPD_DISTRIBUTED") == "auto":
        jax.distributed.initialize()


@functools.lru_cache(maxsize=None)
def _replicate_fn(shardings: tuple):
    return jax.jit(lambda *xs: xs, out_shardings=shardings)


def to_host(tree):
    """Numpy value of every array in ``tree``, whole on every process.

    Arrays sharded over other processes' devices are all-gathered, all in one program (one
    collective dispatch per call, e.g. per decode step): every process must call this at the
    same point. One process: plain ``np.asarray``.
    """
    leaves, treedef = jax.tree.flatten(tree)
    spread = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)
              and not (x.is_fully_addressable or x.is_fully_replicated)]
    if spread:
        from jax.experimental import multihost_utils
        named = [i for i in spread if isinstance(leaves[i].sharding, NamedSharding)]
        reps = tuple(NamedSharding(leaves[i].sharding.mesh, P()) for i in named)
        for i, x in zip(named, _replicate_fn(reps)(*(leaves[i] for i in named))):
            leaves[i] = x
        for i in set(spread) - set(named):
            leaves[i] = multihost_utils.process_allgather(leaves[i], tiled=True)
    return jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])


def make_mesh(cfg: MeshConfig | Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A 4-axis mesh ('data', 'fsdp', 'tensor', 'expert') over ``devices`` (default: all)."""
    if cfg is None:
        cfg = MeshConfig()
    elif not isinstance(cfg, MeshConfig):
        cfg = MeshConfig(**cfg)
    devices = list(jax.devices() if devices is None else devices)
    sizes = cfg.resolve(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # non-TPU topologies or fake CPU devices
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


def make_role_meshes(cfg: MeshConfig, devices=None) -> dict[str, Mesh]:
    """One mesh per ``cfg.roles`` entry over disjoint devices (trainer first, then sampler,
    then teachers, in device order); {} without roles."""
    if not cfg.roles:
        return {}
    if jax.process_count() > 1:
        raise MeshError("mesh.roles: disaggregated sub-meshes are single-process for now; "
                        "drop mesh.roles for a multi-process run")
    devices = list(jax.devices() if devices is None else devices)
    want = sum(cfg.roles.values())
    if want != len(devices):
        raise MeshError(f"mesh.roles: {dict(cfg.roles)} asks for {want} devices but "
                        f"{len(devices)} are available; make the counts add up to "
                        f"{len(devices)}")
    out, at = {}, 0
    for role in ROLES:
        if role in cfg.roles:
            n = cfg.roles[role]
            try:
                out[role] = make_mesh(dataclasses.replace(cfg, roles={}), devices[at:at + n])
            except MeshError as e:
                raise MeshError(f"mesh.roles.{role}={n}: {e}") from None
            at += n
    return out


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(axes, shape, mesh: Mesh, role: str) -> P:
    """PartitionSpec for a value with logical ``axes``; a dim that the mesh axis does not
    divide, or a mesh axis already used by an earlier dim, stays replicated."""
    rules = RULES[role]
    unknown = [n for n in axes if n is not None and n not in rules]
    if unknown:  # a silent replication of a new axis would hide a sharding bug
        raise MeshError(f"sharding: logical axis {unknown[0]!r} has no entry in the {role!r} "
                        f"rules table (mopd_jax.sharding.RULES); add it to every role's table")
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        target = rules.get(name) if name is not None else None
        if target is not None:
            tup = (target,) if isinstance(target, str) else tuple(target)
            tup = tuple(a for a in tup if a not in used and mesh.shape[a] > 1)
            if not tup or dim % _axis_size(mesh, tup):
                target = None
            else:
                used.update(tup)
                target = tup[0] if len(tup) == 1 else tup
        spec.append(target)
    return P(*spec)


def _is_var(x):
    return isinstance(x, nnx.Variable)


def param_shardings(state, mesh: Mesh, role: str):
    """NamedShardings for an nnx State (concrete or abstract) from its ``logical_axes``."""
    def one(v):
        axes = v.get_metadata().get("logical_axes") if _is_var(v) else None
        value = v.get_value() if _is_var(v) else v
        if axes is None:
            axes = (None,) * len(value.shape)
        return NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh, role))
    return jax.tree.map(one, state, is_leaf=_is_var)


def init_sharded(model_factory, mesh: Mesh, role: str = "train"):
    """Build a model straight into its shardings (no host copy of the full params).

    ``model_factory()`` constructs the NNX module; returns ``(graphdef, state)``.
    """
    abstract = nnx.eval_shape(model_factory)
    graphdef, abs_state = nnx.split(abstract)
    shardings = param_shardings(abs_state, mesh, role)
    state = jax.jit(lambda: nnx.split(model_factory())[1], out_shardings=shardings)()
    return graphdef, state


def reshard(state, mesh: Mesh, role: str):
    """Move params to ``role``'s layout on ``mesh`` (one device_put; collectives as needed)."""
    return jax.device_put(state, param_shardings(state, mesh, role))


def batch_sharding(mesh: Mesh, ndim: int, role: str = "train") -> NamedSharding:
    """Leading-axis data sharding for a [B, ...] batch array."""
    return NamedSharding(mesh, P(RULES[role]["batch"], *([None] * (ndim - 1))))


@contextlib.contextmanager
def use_rules(mesh: Mesh, role: str):
    """Activate logical activation constraints inside model code for ``role`` on ``mesh``."""
    def constrain(x, axes):
        spec = logical_to_spec(axes, x.shape, mesh, role)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    def spec(axes, shape):
        return logical_to_spec(axes, shape, mesh, role)
    with activation_sharding(constrain, mesh, spec):
        yield
