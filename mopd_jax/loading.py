"""One entry to get a model from a Hugging Face directory, a mopd checkpoint or a preset."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flax import nnx

import models
from models.config import ModelConfig, preset as model_preset
from models.hf import config_from_hf, load_hf_params
from mopd_jax import sharding as shd
from mopd_jax.checkpoint import abstract_model, load_model_params
from mopd_jax.tokenizer import Tokenizer, load_tokenizer


@dataclasses.dataclass
class Loaded:
    cfg: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: Tokenizer | None

    def model(self):
        return nnx.merge(self.graphdef, self.params)


def load_model(hf: str | None = None, checkpoint: str | None = None, *, preset: str | None = None,
               mesh=None, role: str = "train", seed: int = 0, dtype: str | None = None,
               runtime: dict | None = None) -> Loaded:
    """Exactly one of ``hf`` (HF dir), ``checkpoint`` (mopd dir) or ``preset`` (random init).

    ``runtime``: ``models.config.RUNTIME_FIELDS`` to run the model with (kernels, layer scan,
    remat), on top of its own config."""
    runtime = runtime or {}
    if sum(x is not None for x in (hf, checkpoint, preset)) != 1:
        raise ValueError("give exactly one of --hf DIR, --checkpoint DIR (or --preset NAME)")
    mesh = mesh or shd.make_mesh()
    if hf is not None:
        if not Path(hf).is_dir():
            raise FileNotFoundError(f"--hf {hf}: not a directory; pass a local Hugging Face "
                                    "model directory (config.json + *.safetensors)")
        over = {"dtype": dtype, "param_dtype": dtype} if dtype else {}
        cfg = config_from_hf(hf, **over, **runtime)
        graphdef, abs_state = abstract_model(cfg)
        shardings = shd.param_shardings(abs_state, mesh, role)
        params = load_hf_params(hf, abs_state, cfg, shardings)
        return Loaded(cfg, graphdef, params, load_tokenizer(hf))
    if checkpoint is not None:
        if not Path(checkpoint).is_dir():
            raise FileNotFoundError(f"--checkpoint {checkpoint}: not a directory; pass a "
                                    "checkpoint written by `mopd convert --to orbax` or a run")
        cfg, graphdef, params = load_model_params(checkpoint, mesh, role, runtime)
        return Loaded(cfg, graphdef, params, load_tokenizer(checkpoint))
    cfg = model_preset(preset)
    graphdef, params = shd.init_sharded(lambda: models.build(cfg, nnx.Rngs(seed)), mesh, role)
    return Loaded(cfg, graphdef, params, None)
