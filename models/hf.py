"""Hugging Face checkpoints in and out, for every family.

Import streams safetensors tensor by tensor (memory-mapped, so only one tensor is resident on
the host at a time) straight into the target shardings with ``jax.make_array_from_callback``;
export writes the Hub layout (per-expert keys) that ``transformers`` loads. The family
(chosen from config.json's ``model_type``) translates config.json both ways and states its
weight mapping as one table (``param_table``), which is read in both directions; the shared
decoder keys are ``decoder_table``.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from models import registry
from models.config import ModelConfig


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


class RequiredFields(dict):
    """config.json whose ``c[name]`` names the file and field when the field is absent."""

    def __init__(self, c: dict, where: str):
        super().__init__(c)
        self.where = where

    def __missing__(self, name):
        raise HFCheckpointError(f"{self.where}: missing field {name!r}, which this "
                                f"architecture needs; add it to config.json")

    def fail(self, msg: str):
        raise HFCheckpointError(f"{self.where}: {msg}")


def read_hf_config(src: str | Path | dict) -> RequiredFields:
    """config.json (dir, file or dict) with field-naming errors."""
    if isinstance(src, dict):
        return RequiredFields(src, "config.json")
    p = Path(src)
    p = p / "config.json" if p.is_dir() or not p.suffix else p
    return RequiredFields(_read_json(p), str(p))


def hf_dtype(c: dict) -> str:
    dtype = c.get("dtype", c.get("torch_dtype", "float32"))
    return "bfloat16" if dtype == "bfloat16" else "float32"


def hf_layer_types(c: RequiredFields, n_layers: int):
    """Our per-layer attention kinds from ``layer_types`` (or Qwen's ``max_window_layers``)."""
    if c.get("layer_types"):
        return tuple("sliding" if t == "sliding_attention" else "full" for t in c["layer_types"])
    if c.get("use_sliding_window") and c.get("sliding_window"):
        mw = c.get("max_window_layers", n_layers)
        return tuple("sliding" if i >= mw else "full" for i in range(n_layers))
    return None


def config_from_hf(src: str | Path | dict, **overrides) -> ModelConfig:
    """ModelConfig from a ``config.json`` (dir, file or dict) of any registered family."""
    c = read_hf_config(src)
    arch = (c.get("architectures") or [None])[0]
    try:
        name = registry.family_for_hf(c.get("model_type"), arch)
    except registry.UnknownFamilyError as e:
        raise HFCheckpointError(f"{c.where}: {e}") from None
    kw = registry.family(name).config_kwargs(c)
    kw.setdefault("name", c.get("_name_or_path") or arch or "hf")
    kw.update(family=name, **overrides)
    return ModelConfig(**kw)


def hf_config_dict(cfg: ModelConfig) -> dict:
    """A ``config.json`` for ``cfg`` that transformers loads as its family's class."""
    return registry.family(cfg.family).hf_config(cfg)


# ----------------------------------------------------------------------- the mapping table
class Entry:
    """One of our parameters: its HF keys and the two directions of the transform.

    ``alternatives``: other key lists a checkpoint may store the same tensor under (read on
    import when ``keys`` are absent; export always writes ``keys``).
    """

    def __init__(self, keys: list[str], to_ours: Callable, to_hf: Callable,
                 alternatives: tuple[list[str], ...] = ()):
        self.keys, self.to_ours, self.to_hf = keys, to_ours, to_hf
        self.alternatives = alternatives


def single(key, to_ours=None, to_hf=None, alternatives: tuple[str, ...] = ()) -> Entry:
    to_ours, to_hf = to_ours or (lambda x: x), to_hf or (lambda x: x)
    return Entry([key], lambda xs: to_ours(xs[0]),
                 lambda y: {key: to_hf(y)}, tuple([a] for a in alternatives))


def transposed(key) -> Entry:
    return single(key, lambda x: x.T, lambda y: y.T)


def decoder_table(cfg: ModelConfig, *, sink_key: str = "self_attn.sinks",
                  sink_alternatives: tuple[str, ...] = ()) -> dict[tuple, Entry]:
    """The Hub keys of a Llama-style decoder (``model.layers.{i}.self_attn.q_proj`` ...), for
    every feature ``cfg`` turns on (biases, QK-norm, sinks, MoE with per-expert keys)."""
    D, H, Hd, Vd = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.value_dim

    def head_in(key, n, d):  # HF [n*d, D] <-> ours [D, n, d]
        return single(key, lambda x: x.T.reshape(D, n, d), lambda y: y.reshape(D, n * d).T)

    def head_bias(key, n, d):  # HF [n*d] <-> ours [n, d]
        return single(key, lambda x: x.reshape(n, d), lambda y: y.reshape(n * d))

    t = {("embed",): single("model.embed_tokens.weight"),
         ("norm", "weight"): single("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        t[("lm_head",)] = transposed("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        K = cfg.kv_heads(i)
        L = ("layers", i)
        t[L + ("input_layernorm", "weight")] = single(p + "input_layernorm.weight")
        t[L + ("post_attention_layernorm", "weight")] = single(
            p + "post_attention_layernorm.weight")
        a = L + ("self_attn",)
        t[a + ("q_proj",)] = head_in(p + "self_attn.q_proj.weight", H, Hd)
        t[a + ("k_proj",)] = head_in(p + "self_attn.k_proj.weight", K, Hd)
        t[a + ("v_proj",)] = head_in(p + "self_attn.v_proj.weight", K, Vd)
        t[a + ("o_proj",)] = single(p + "self_attn.o_proj.weight",
                                    lambda x, K=K: x.T.reshape(H, Vd, D),
                                    lambda y: y.reshape(H * Vd, D).T)
        if cfg.attention_bias:
            t[a + ("q_bias",)] = head_bias(p + "self_attn.q_proj.bias", H, Hd)
            t[a + ("k_bias",)] = head_bias(p + "self_attn.k_proj.bias", K, Hd)
            t[a + ("v_bias",)] = head_bias(p + "self_attn.v_proj.bias", K, Vd)
        if cfg.qk_norm:
            t[a + ("q_norm", "weight")] = single(p + "self_attn.q_norm.weight")
            t[a + ("k_norm", "weight")] = single(p + "self_attn.k_norm.weight")
        if cfg.has_sinks(i):
            t[a + ("sinks",)] = single(p + sink_key,
                                       alternatives=tuple(p + k for k in sink_alternatives))
        m = L + ("mlp",)
        if cfg.is_moe_layer(i):
            E = cfg.num_experts
            t[m + ("router",)] = transposed(p + "mlp.gate.weight")
            if cfg.router == "sigmoid":
                t[m + ("router_bias",)] = single(p + "mlp.gate.e_score_correction_bias")
            for name in ("gate_proj", "up_proj", "down_proj"):
                keys = [f"{p}mlp.experts.{e}.{name}.weight" for e in range(E)]
                t[m + (name,)] = Entry(
                    keys, lambda xs: np.stack([x.T for x in xs]),
                    lambda y, keys=keys: {k: y[e].T for e, k in enumerate(keys)})
        else:
            for name in ("gate_proj", "up_proj", "down_proj"):
                t[m + (name,)] = transposed(f"{p}mlp.{name}.weight")
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
    fam = registry.family(cfg.family)
    table = fam.param_table(cfg)
    skipped = [k for k in src.keys() if k.startswith(getattr(fam, "SKIPPED_PREFIXES", ()))]
    if skipped:  # e.g. MiMo-V2-Flash's multi-token-prediction head: not part of the LM
        print(f"note: {directory}: skipping {len(skipped)} tensors under "
              f"{', '.join(sorted({k.split('.')[0] + '.' + k.split('.')[1] for k in skipped}))}"
              " (not used by this model)", file=sys.stderr)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    shard_leaves = None if shardings is None else jax.tree.leaves(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    leaves_with_path = jax.tree_util.tree_leaves_with_path(abstract_state, is_leaf=is_var)
    out = []
    for n, (path, var) in enumerate(leaves_with_path):
        key = _path_tuple(path)
        key = key[:-1] if key and key[-1] == "value" else key
        want = var.get_value() if is_var(var) else var
        parts = []
        for layer_key, shape in _unstacked(key, tuple(want.shape), cfg):
            entry = table.get(layer_key)
            if entry is None:
                raise HFCheckpointError(f"internal: no Hugging Face mapping for parameter "
                                        f"{layer_key}")
            parts.append(_load_entry(src, entry, layer_key, cfg, shape))
        host = parts[0] if key[0] != "blocks" else np.stack(parts)
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


def _unstacked(key: tuple, shape: tuple, cfg: ModelConfig) -> list[tuple[tuple, tuple]]:
    """The per-layer parameter keys (and shapes) a parameter stands for: itself, or for a
    scanned model's ``('blocks', g, ...)`` [n, ...] stack, ``('layers', i, ...)`` for each of
    the run's n layers (``models.decoder.layer_groups``)."""
    if key[0] != "blocks":
        return [(key, shape)]
    from models.decoder import layer_groups

    first, n = layer_groups(cfg)[key[1]]
    return [(("layers", first + j, *key[2:]), shape[1:]) for j in range(n)]


def _check_shape(src: SafetensorsDir, name: str, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        raise HFCheckpointError(
            f"{src.dir}: tensor {name!r} has shape {tuple(got)} but config.json implies "
            f"{tuple(want)}; the checkpoint's config.json does not match its weights")


def _load_entry(src: SafetensorsDir, entry: Entry, key: tuple, cfg: ModelConfig,
                want_shape: tuple) -> np.ndarray:
    """Our array for ``key``; every stored tensor's shape is checked before it is mapped."""
    missing = [k for k in entry.keys if k not in src]
    for alt in entry.alternatives if missing else ():
        if all(k in src for k in alt):
            raw = [src.get(k) for k in alt]
            hub = entry.to_hf(np.broadcast_to(np.zeros((), np.float32), want_shape))
            for k, x, want in zip(alt, raw, hub.values()):
                _check_shape(src, k, x.shape, want.shape)
            return np.asarray(entry.to_ours(raw))
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
                                f"{len(missing) - 1} more); is this a {cfg.family} "
                                f"{'MoE ' if cfg.is_moe else ''}checkpoint as config.json "
                                "says?")
    # The Hub shapes our parameter maps to, from a zero-stride view (nothing is allocated).
    hub = entry.to_hf(np.broadcast_to(np.zeros((), np.float32), want_shape))
    raw = [src.get(k) for k in entry.keys]
    for k, x in zip(entry.keys, raw):
        _check_shape(src, k, x.shape, hub[k].shape)
    return np.asarray(entry.to_ours(raw))


def iter_hf_tensors(state, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, host array) pairs, one parameter fetched to the host at a time."""
    table = registry.family(cfg.family).param_table(cfg)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=is_var):
        key = _path_tuple(path)
        key = key[:-1] if key and key[-1] == "value" else key
        value = var.get_value() if is_var(var) else var
        host = np.asarray(jax.device_get(value))
        layers = _unstacked(key, host.shape, cfg)
        for j, (layer_key, _) in enumerate(layers):
            part = host[j] if key[0] == "blocks" else host
            for k, v in table[layer_key].to_hf(part).items():
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

