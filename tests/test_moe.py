"""MoE: every ``moe_impl`` equals the dense reference in value and gradient, with uneven and
empty expert groups, without a mesh and on the 8-device CPU mesh with expert parallelism
(megablox in interpret mode); dispatch sorts per device, never the global token set; megablox
compiles for a v5p topology to its two kernels and no dense expert-wide convolution."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.config import preset
from models.grouped_matmul import IMPLS, gmm
from models.moe import MoE, resolve_impl
from mopd_jax import sharding as shd
from mopd_jax.checkpoint import abstract_with_shardings

TOL = {"float32": 1e-5}  # normwise: float32 round-off of sums, relative to the largest entry
GROUPS = (7, 0, 13, 1, 0, 15)  # uneven, two empty, 4 rows past the last group


def _close(actual, desired, what=""):
    """max |actual - desired| <= tol * max |desired|, per array of a pytree."""
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(desired)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, what
        err, scale = np.max(np.abs(a - b), initial=0), np.max(np.abs(b), initial=0)
        assert err <= TOL[str(b.dtype)] * max(scale, 1e-30), f"{what}: {err} vs {scale}"


def _per_group(x, w, sizes):
    """The grouped matmul written out: one slice and matmul per group, zeros after."""
    out, start = [], 0
    for g, n in enumerate(sizes):
        out.append(x[start:start + n] @ w[g])
        start += n
    out.append(jnp.zeros((x.shape[0] - start, w.shape[2]), x.dtype))
    return jnp.concatenate(out)


# (block_rows, capacity) of blocked and of ragged's weight gradient: rows past a group's
# capacity run in the block loop (several blocks of one group at 4); capacity 0: loop only
LAYOUTS = [(8, None), (4, 0), (4, 4), (None, None)]


@pytest.mark.parametrize("impl, block_rows, capacity",
                         [("megablox", 8, None)]  # its own tiling
                         + [(i, *lay) for i in ("ragged", "blocked") for lay in LAYOUTS])
def test_grouped_matmul_equals_per_group_matmuls(impl, block_rows, capacity):
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (40, 24))
    w = jax.random.normal(kw, (len(GROUPS), 24, 16))
    cot = jax.random.normal(kc, (40, 16))
    gs = jnp.asarray(GROUPS, jnp.int32)

    def vjp(f):
        y, pull = jax.vjp(f, x, w)
        return (y, *pull(cot))

    ours = jax.jit(lambda: vjp(lambda a, b: gmm(a, b, gs, impl, block_rows=block_rows,
                                                capacity=capacity)))()
    ref = vjp(lambda a, b: _per_group(a, b, GROUPS))
    for a, b, what in zip(ours, ref, ("y", "dx", "dw")):
        _close(a, b, f"{impl} {block_rows} {capacity} {what}")
    assert not np.any(np.asarray(ours[2])[[1, 4]])  # empty groups get no weight gradient


def _cfg(router: str, impl: str):
    over = dict(num_layers=2, mlp_only_layers=(), moe_impl=impl)
    if router == "sigmoid":  # MiMo-V2-Flash routing: grouped sigmoid top-k, correction bias
        over.update(router="sigmoid", n_group=4, topk_group=2, norm_topk_prob=True,
                    routed_scaling_factor=2.5)
    return preset("tiny-moe", **over)


def _loss_and_grads(cfg, state, graphdef, x, ids, mesh=None):
    def loss(state, x):
        moe = nnx.merge(graphdef, state)
        moe.cfg = cfg
        y, aux = moe(x, expert_ids_BTk=ids)
        return jnp.sum(jnp.sin(y)) + aux, y

    def run(state, x):
        if mesh is None:
            return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x)
        with shd.use_rules(mesh, "train"):
            return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x)

    (_, y), grads = jax.jit(run)(state, x)
    return y, grads


@pytest.fixture(scope="module")
def expert_mesh():
    return shd.make_mesh({"fsdp": 2, "tensor": 2, "expert": 2})  # 8 CPU devices


_REFERENCE = {}


def _replay_ids():
    """Router replay onto 3 of 8 experts, unevenly (0 gets most pairs): 5 experts are empty."""
    ids = jnp.asarray(np.random.default_rng(0).choice([0, 1, 5], (4, 6, 2), p=[.6, .3, .1]))
    return ids.at[..., 1].set(jnp.where(ids[..., 1] == ids[..., 0], (ids[..., 0] + 1) % 8,
                                        ids[..., 1]))


@pytest.mark.parametrize("router, replay, impl", [("softmax", True, i) for i in IMPLS]
                         + [("sigmoid", True, "megablox"), ("sigmoid", False, "blocked")])
def test_every_impl_equals_dense_on_the_expert_mesh(router, replay, impl, expert_mesh):
    cfg = _cfg(router, "dense")
    graphdef, state = nnx.split(MoE(cfg, nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (4, 6, cfg.hidden_size))
    ids = _replay_ids() if replay else None
    if (router, replay) not in _REFERENCE:  # dense, no mesh: the reference
        _REFERENCE[router, replay] = _loss_and_grads(cfg, state, graphdef, x, ids)
    y_ref, g_ref = _REFERENCE[router, replay]
    sharded = jax.device_put(state, shd.param_shardings(state, expert_mesh, "train"))
    x_sharded = jax.device_put(x, shd.batch_sharding(expert_mesh, 3))
    y, g = _loss_and_grads(_cfg(router, impl), sharded, graphdef, x_sharded, ids, expert_mesh)
    _close(y, y_ref, impl)
    _close(g, g_ref, impl)


def test_without_a_mesh_every_impl_equals_dense():
    cfg = _cfg("softmax", "dense")
    graphdef, state = nnx.split(MoE(cfg, nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(2), (2, 5, cfg.hidden_size))
    y_ref, g_ref = _loss_and_grads(cfg, state, graphdef, x, None)
    for impl in ("auto", "ragged"):  # auto is blocked on CPU; megablox (interpret): above
        y, g = _loss_and_grads(_cfg("softmax", impl), state, graphdef, x, None)
        _close(y, y_ref, impl)
        _close(g, g_ref, impl)
    assert resolve_impl("auto") == "blocked"  # on CPU


def _sort_sizes(hlo: str) -> list[int]:
    """Element counts of the operands of every sort in a compiled module."""
    sizes = []
    for line in hlo.splitlines():
        if " sort(" in line:
            shape = line.split("= ", 1)[1].split(" sort(")[0]
            sizes += [int(np.prod([int(d) for d in dims.split(",") if d]))
                      for dims in re.findall(r"\[([\d,]*)\]", shape)]
    return sizes


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 1, "expert": 8},
                                        {"fsdp": 2, "tensor": 2, "expert": 2}])
def test_no_device_sorts_the_global_token_set(mesh_shape):
    mesh = shd.make_mesh(mesh_shape)
    cfg = _cfg("softmax", "blocked")
    graphdef, state = nnx.split(MoE(cfg, nnx.Rngs(0)))
    B, T, k = 8, 16, cfg.num_experts_per_tok
    state = jax.device_put(state, shd.param_shardings(state, mesh, "train"))
    x = jax.device_put(jnp.ones((B, T, cfg.hidden_size)), shd.batch_sharding(mesh, 3))

    def fwd(state, x):
        with shd.use_rules(mesh, "train"):
            return nnx.merge(graphdef, state)(x)[0]

    sizes = _sort_sizes(jax.jit(fwd).lower(state, x).compile().as_text())
    token_shards = mesh.devices.size // mesh.shape["tensor"]
    assert sizes, "the dispatch sorts its pairs by expert"
    assert max(sizes) == B * T * k // token_shards < B * T * k


def test_megablox_compiles_for_v5p_to_kernels_without_dense_expert_work():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from mopd_jax import compile_check as cc
    from mopd_jax.flops import hlo_flops

    D, F, E = 256, 384, 8
    mesh = shd.make_mesh({"fsdp": 2, "expert": 2},
                         devices=cc.target_devices(cc.parse_topology("v5p-8")))
    cfg = preset("tiny-moe", hidden_size=D, moe_intermediate_size=F, num_experts=E,
                 dtype="bfloat16", param_dtype="bfloat16")  # moe_impl auto: megablox on TPU
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MoE(cfg, nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, abstract_with_shardings(state, mesh, "train"))
    x = jax.ShapeDtypeStruct((8, 128, D), jnp.bfloat16, sharding=shd.batch_sharding(mesh, 3))

    def loss(state, x):
        with shd.use_rules(mesh, "train"):
            y, aux = nnx.merge(graphdef, state)(x)
        return jnp.sum(y.astype(jnp.float32)) + aux

    hlo = jax.jit(jax.grad(loss)).lower(state, x).compile().as_text()
    calls = re.findall(r"%(\w+)(?:\.\d+)? = [^ ]+ custom-call\(.*tpu_custom_call", hlo)
    assert calls.count("gmm") == 4 and calls.count("tgmm") == 3, calls  # 3 fwd, dx of down
    assert "ragged-all-to-all" in hlo  # expert parallelism over the 2-device expert axis
    assert not _expert_wide(hlo, D, F)
    h = hlo_flops(hlo)
    assert h["conv"] < 0.01 * h["custom_call"]  # only the router's matmuls are left to XLA

    # the check can fail: lax.ragged_dot's weight gradient is dense work over every expert
    def ragged(x, w):
        return jnp.sum(jax.lax.ragged_dot(x, w, jnp.full((E,), 128, jnp.int32)))
    one_chip = NamedSharding(Mesh(mesh.devices.flat[:1], ("x",)), P())
    args = (jax.ShapeDtypeStruct((E * 128, D), jnp.bfloat16, sharding=one_chip),
            jax.ShapeDtypeStruct((E, D, F), jnp.bfloat16, sharding=one_chip))
    assert _expert_wide(jax.jit(jax.grad(ragged, 1)).lower(*args).compile().as_text(), D, F)


def _expert_wide(hlo: str, D: int, F: int) -> bool:
    """A convolution whose output spans a whole expert weight (both D and F): dense work over
    experts instead of a grouped kernel."""
    for line in hlo.splitlines():
        if " convolution(" in line:
            dims = [int(d) for d in re.search(r"\[([\d,]*)\]", line).group(1).split(",") if d]
            if D in dims and F in dims:
                return True
    return False
