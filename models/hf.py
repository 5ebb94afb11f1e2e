"""Hugging Face Qwen3 / Qwen3-MoE checkpoints in and out.

Import streams safetensors tensor by tensor (memory-mapped, so only one tensor is resident on
the host at a time) straight into the target shardings with ``jax.make_array_from_callback``;
export writes the Hub layout (per-expert keys) that ``transformers`` loads. One table,
``_param_table``, states the mapping both ways.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from models.config import ModelConfig

SUPPORTED = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")


class HFCheckpointError(ValueError):
    """A Hugging Face directory is missing files or does not match the model."""


# ------------------------------------------------------------------------ safetensors I/O
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise HFCheckpointError(f"{path}: truncated safetensors file (no header); "
                                    "re-download or re-export it")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise HFCheckpointError(f"{path}: corrupt safetensors header; re-export the file")
    return header, 8 + n


class SafetensorsDir:
    """Lazy, memory-mapped view of every tensor in a checkpoint directory."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise HFCheckpointError(f"{self.dir}: no *.safetensors files; point --hf at a "
                                    "Hugging Face model directory")
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for f in files:
            header, offset = _read_header(f)
            size = f.stat().st_size
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if meta["data_offsets"][1] + offset > size:
                    raise HFCheckpointError(f"{f}: tensor {name} runs past the end of the file "
                                            "(truncated download?); re-download it")
                self._where[name] = (f, meta, offset)

    def keys(self):
        return self._where.keys()

    def __contains__(self, name):
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise HFCheckpointError(f"{self.dir}: tensor {name!r} not found in the checkpoint")
        f, meta, offset = self._where[name]
        if meta["dtype"] not in _DTYPES:
            raise HFCheckpointError(f"{f}: tensor {name} has unsupported dtype {meta['dtype']}")
        start, end = meta["data_offsets"]
        return np.memmap(f, dtype=_DTYPES[meta["dtype"]], mode="r", offset=offset + start,
                         shape=tuple(meta["shape"]))


def save_safetensors(tensors: dict[str, np.ndarray], path: str | Path, metadata=None):
    """Write one safetensors file (little-endian, 8-byte aligned header, as the spec says)."""
    header, offset, order = {}, 0, []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        order.append(arr)
    header["__metadata__"] = metadata or {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in order:
            f.write(arr.tobytes())


# ------------------------------------------------------------------------------ config
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise HFCheckpointError(f"{path}: missing; a Hugging Face model directory needs "
                                "config.json and *.safetensors")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise HFCheckpointError(f"{path}: not valid JSON ({e})")


class _RequiredFields(dict):
    """config.json whose ``c[name]`` names the file and field when the field is absent."""

    def __init__(self, c: dict, where: str):
        super().__init__(c)
        self.where = where

    def __missing__(self, name):
        raise HFCheckpointError(f"{self.where}: missing field {name!r}, which this "
                                f"architecture needs; add it to config.json")


def config_from_hf(src: str | Path | dict, **overrides) -> ModelConfig:
    """ModelConfig from a ``config.json`` (dir, file or dict); both transformers-5 spellings."""
    if isinstance(src, dict):
        c, where = src, "config.json"
    else:
        p = Path(src)
        p = p / "config.json" if p.is_dir() or not p.suffix else p
        c, where = _read_json(p), str(p)
    arch = (c.get("architectures") or [None])[0]
    mtype = c.get("model_type")
    c = _RequiredFields(c, where)
    if arch not in SUPPORTED and mtype not in ("qwen3", "qwen3_moe"):
        raise HFCheckpointError(f"{where}: unsupported architecture {arch or mtype!r}; "
                                f"supported: {list(SUPPORTED)}")
    if c.get("attention_bias"):
        raise HFCheckpointError(f"{where}: attention_bias=true is not supported by the Qwen3 "
                                "family here")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise HFCheckpointError(f"{where}: rope type {rope.get('rope_type')!r} is not "
                                "supported; only default RoPE")
    n_layers = c["num_hidden_layers"]
    layer_types = None
    if c.get("layer_types"):
        layer_types = tuple("sliding" if t == "sliding_attention" else "full"
                            for t in c["layer_types"])
    elif c.get("use_sliding_window") and c.get("sliding_window"):
        mw = c.get("max_window_layers", n_layers)
        layer_types = tuple("sliding" if i >= mw else "full" for i in range(n_layers))
    if layer_types is not None and "sliding" not in layer_types:
        layer_types = None
    num_experts = c.get("num_experts", c.get("num_local_experts", 0)) or 0
    if mtype == "qwen3" or arch == "Qwen3ForCausalLM":
        num_experts = 0
    dtype = c.get("dtype", c.get("torch_dtype", "float32"))
    dtype = "bfloat16" if dtype == "bfloat16" else "float32"
    kw = dict(
        name=c.get("_name_or_path") or arch or "hf", vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_layers=n_layers, num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
        head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
        rope_theta=float(theta), rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        max_position_embeddings=c.get("max_position_embeddings", 40960),
        layer_types=layer_types,
        sliding_window=c.get("sliding_window") if layer_types else None,
        num_experts=num_experts, dtype=dtype, param_dtype=dtype,
    )
    if num_experts:
        kw.update(num_experts_per_tok=c["num_experts_per_tok"],
                  moe_intermediate_size=c["moe_intermediate_size"],
                  norm_topk_prob=bool(c.get("norm_topk_prob", False)),
                  decoder_sparse_step=c.get("decoder_sparse_step", 1),
                  mlp_only_layers=tuple(c.get("mlp_only_layers") or ()),
                  router_aux_loss_coef=c.get("router_aux_loss_coef", 0.001))
    kw.update(overrides)
    return ModelConfig(**kw)


def hf_config_dict(cfg: ModelConfig) -> dict:
    """A ``config.json`` for ``cfg`` that transformers loads as Qwen3 or Qwen3-MoE."""
    if cfg.attention_sink:
        raise HFCheckpointError("model.attention_sink: Qwen3 on the Hub has no attention "
                                "sinks; export this model as an Orbax checkpoint instead")
    moe = cfg.is_moe
    c = {
        "architectures": ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if moe else "qwen3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": False,
        "attention_dropout": 0.0, "dtype": cfg.param_dtype, "use_cache": True,
    }
    if cfg.layer_types is not None:
        c["layer_types"] = ["sliding_attention" if t == "sliding" else "full_attention"
                            for t in cfg.layer_types]
        c["use_sliding_window"] = True
        c["sliding_window"] = cfg.sliding_window
        c["max_window_layers"] = cfg.num_layers
    if moe:
        c.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                 moe_intermediate_size=cfg.moe_intermediate_size,
                 norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=cfg.decoder_sparse_step,
                 mlp_only_layers=list(cfg.mlp_only_layers),
                 router_aux_loss_coef=cfg.router_aux_loss_coef, output_router_logits=False)
    return c


# ----------------------------------------------------------------------- the mapping table
class _Entry:
    """One of our parameters: its HF keys and the two directions of the transform."""

    def __init__(self, keys: list[str], to_ours: Callable, to_hf: Callable):
        self.keys, self.to_ours, self.to_hf = keys, to_ours, to_hf


def _param_table(cfg: ModelConfig) -> dict[tuple, _Entry]:
    D, H, K, Hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    ident = lambda x: x  # noqa: E731

    def single(key, to_ours=ident, to_hf=ident):
        return _Entry([key], lambda xs: to_ours(xs[0]), lambda y: {key: to_hf(y)})

    def head_in(key, n):  # HF [n*Hd, D] <-> ours [D, n, Hd]
        return single(key, lambda x: x.T.reshape(D, n, Hd), lambda y: y.reshape(D, n * Hd).T)

    t = {("embed",): single("model.embed_tokens.weight"),
         ("norm", "weight"): single("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        t[("lm_head",)] = single("lm_head.weight", lambda x: x.T, lambda y: y.T)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        L = ("layers", i)
        t[L + ("input_layernorm", "weight")] = single(p + "input_layernorm.weight")
        t[L + ("post_attention_layernorm", "weight")] = single(
            p + "post_attention_layernorm.weight")
        a = L + ("self_attn",)
        t[a + ("q_proj",)] = head_in(p + "self_attn.q_proj.weight", H)
        t[a + ("k_proj",)] = head_in(p + "self_attn.k_proj.weight", K)
        t[a + ("v_proj",)] = head_in(p + "self_attn.v_proj.weight", K)
        t[a + ("o_proj",)] = single(p + "self_attn.o_proj.weight",
                                    lambda x: x.T.reshape(H, Hd, D),
                                    lambda y: y.reshape(H * Hd, D).T)
        if cfg.qk_norm:
            t[a + ("q_norm", "weight")] = single(p + "self_attn.q_norm.weight")
            t[a + ("k_norm", "weight")] = single(p + "self_attn.k_norm.weight")
        if cfg.attention_sink:
            t[a + ("sinks",)] = single(p + "self_attn.sinks")
        m = L + ("mlp",)
        if cfg.is_moe_layer(i):
            E = cfg.num_experts
            t[m + ("router",)] = single(p + "mlp.gate.weight", lambda x: x.T, lambda y: y.T)
            for name in ("gate_proj", "up_proj", "down_proj"):
                keys = [f"{p}mlp.experts.{e}.{name}.weight" for e in range(E)]
                t[m + (name,)] = _Entry(
                    keys, lambda xs: np.stack([x.T for x in xs]),
                    lambda y, keys=keys: {k: y[e].T for e, k in enumerate(keys)})
        else:
            for name in ("gate_proj", "up_proj", "down_proj"):
                t[m + (name,)] = single(f"{p}mlp.{name}.weight", lambda x: x.T, lambda y: y.T)
    return t


def _fused_expert_sources(src: SafetensorsDir, cfg: ModelConfig, i: int):
    """transformers>=5 may save experts fused: gate_up_proj [E, 2F, D], down_proj [E, D, F]."""
    p = f"model.layers.{i}.mlp.experts."
    if p + "gate_up_proj" not in src:
        return None
    F = cfg.moe_intermediate_size
    gu = src.get(p + "gate_up_proj")
    return {"gate_proj": lambda: np.swapaxes(gu[:, :F], 1, 2),
            "up_proj": lambda: np.swapaxes(gu[:, F:], 1, 2),
            "down_proj": lambda: np.swapaxes(src.get(p + "down_proj"), 1, 2)}


def _path_tuple(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def load_hf_params(directory: str | Path, abstract_state, cfg: ModelConfig, shardings=None):
    """Fill ``abstract_state`` (an nnx State of ShapeDtypeStructs) from safetensors.

    ``shardings``: a matching pytree of NamedSharding (from mopd_jax.sharding); each host then
    builds only its addressable shards. Without it, arrays land on the default device.
    """
    src = SafetensorsDir(directory)
    table = _param_table(cfg)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    shard_leaves = None if shardings is None else jax.tree.leaves(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    leaves_with_path = jax.tree_util.tree_leaves_with_path(abstract_state, is_leaf=is_var)
    out = []
    for n, (path, var) in enumerate(leaves_with_path):
        key = _path_tuple(path)
        key = key[:-1] if key and key[-1] == "value" else key
        entry = table.get(key)
        if entry is None:
            raise HFCheckpointError(f"internal: no Hugging Face mapping for parameter {key}")
        want = var.get_value() if is_var(var) else var
        host = _load_entry(src, entry, key, cfg, tuple(want.shape))
        if host.shape != tuple(want.shape):
            raise HFCheckpointError(
                f"{directory}: {entry.keys[0]} has shape {host.shape} after mapping but the "
                f"model expects {tuple(want.shape)} for {'/'.join(map(str, key))}; the "
                "checkpoint's config.json does not match its weights")
        host = host.astype(want.dtype) if host.dtype != want.dtype else host
        if shard_leaves is None:
            arr = jax.numpy.asarray(host)
        else:
            arr = jax.make_array_from_callback(host.shape, shard_leaves[n],
                                               lambda idx, h=host: np.asarray(h[idx]))
        out.append(var.replace(arr) if is_var(var) else arr)
        del host
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract_state,
                                                                     is_leaf=is_var), out)


def _check_shape(src: SafetensorsDir, name: str, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        raise HFCheckpointError(
            f"{src.dir}: tensor {name!r} has shape {tuple(got)} but config.json implies "
            f"{tuple(want)}; the checkpoint's config.json does not match its weights")


def _load_entry(src: SafetensorsDir, entry: _Entry, key: tuple, cfg: ModelConfig,
                want_shape: tuple) -> np.ndarray:
    """Our array for ``key``; every stored tensor's shape is checked before it is mapped."""
    missing = [k for k in entry.keys if k not in src]
    if missing and len(key) >= 4 and key[2] == "mlp" and key[3] in ("gate_proj", "up_proj",
                                                                      "down_proj"):
        fused = _fused_expert_sources(src, cfg, key[1])
        if fused is not None:
            E, a, b = want_shape  # ours [E, D, F] (gate/up) or [E, F, D] (down)
            name = "gate_up_proj" if key[3] != "down_proj" else "down_proj"
            full = f"model.layers.{key[1]}.mlp.experts.{name}"
            _check_shape(src, full, src.get(full).shape,
                         (E, 2 * b, a) if name == "gate_up_proj" else (E, b, a))
            return np.asarray(fused[key[3]]())
    if missing:
        raise HFCheckpointError(f"{src.dir}: tensor {missing[0]!r} not found (and "
                                f"{len(missing) - 1} more); is this a "
                                f"{'Qwen3-MoE' if cfg.is_moe else 'Qwen3'} checkpoint?")
    # The Hub shapes our parameter maps to, from a zero-stride view (nothing is allocated).
    hub = entry.to_hf(np.broadcast_to(np.zeros((), np.float32), want_shape))
    raw = [src.get(k) for k in entry.keys]
    for k, x in zip(entry.keys, raw):
        _check_shape(src, k, x.shape, hub[k].shape)
    return np.asarray(entry.to_ours(raw))


def iter_hf_tensors(state, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, host array) pairs, one parameter fetched to the host at a time."""
    table = _param_table(cfg)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=is_var):
        key = _path_tuple(path)
        key = key[:-1] if key and key[-1] == "value" else key
        value = var.get_value() if is_var(var) else var
        host = np.asarray(jax.device_get(value))
        for k, v in table[key].to_hf(host).items():
            yield k, np.ascontiguousarray(v)


def save_hf(state, cfg: ModelConfig, out_dir: str | Path, *, max_shard_bytes: int = 4 << 30,
            extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Write ``config.json`` and sharded ``model-*.safetensors`` + index in the Hub layout."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config_dict(cfg), indent=2))
    shards, current, size = [], {}, 0
    for k, v in iter_hf_tensors(state, cfg):
        if current and size + v.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k], size = v, size + v.nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        name = (f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1
                else "model.safetensors")
        save_safetensors(tensors, out / name)
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.nbytes
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for name, content in (extra_files or {}).items():
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(out / name, mode) as f:
            f.write(content)
    return out

