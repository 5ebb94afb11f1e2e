"""SFT recipe: cross-entropy on (prompt, target) records; produces pi_0.

Each step: a batch of prompts from the domain mix -> prompt + target + EOS rows (loss on the
target and EOS only) -> train_step. The target is ``record[sft.target_field]``.
"""

from __future__ import annotations

import numpy as np

from mopd_jax.batches import SFTBatch
from mopd_jax.data.sources import DataError
from mopd_jax.recipes import common
from mopd_jax.recipes.run_loop import train_loop
from mopd_jax.steps import sft_objective


def sft_rows(run: common.Run, prompts) -> SFTBatch:
    """Prompt + target + EOS rows [B, L] (truncated to L), the target masked in."""
    field = run.cfg.sft.target_field
    L = common.seq_len(run.cfg)
    tokens = np.zeros((len(prompts), L), np.int32)
    mask = np.zeros((len(prompts), L), np.int32)
    for i, p in enumerate(prompts):
        if field not in p.metadata:
            raise DataError(f"sft: record {p.metadata.get('uid', i)} has no {field!r} field; "
                            f"set sft.target_field to the field holding the target response")
        target = run.tokenizer.encode(str(p.metadata[field])) + [run.tokenizer.eos_id]
        row = (list(p.tokens) + target)[:L]
        tokens[i, :len(row)] = row
        mask[i, len(p.tokens):len(row)] = 1
    return SFTBatch(tokens_BT=tokens, mask_BT=mask,
                    domain_B=run.domain_ids([p.domain for p in prompts]))


def run_sft(cfg, *, resume: bool = False, quiet: bool = False) -> common.Result:
    """Train with SFT for optimizer.total_steps steps; saves the model as OUT/model."""
    run = common.init_student(common.setup(cfg, resume=resume, quiet=quiet))
    pipeline = common.make_pipeline(run, cfg.sft.batch_size)
    opt, state = common.new_train_state(run)
    V = run.model_cfg.vocab_size
    step = common.compile_train_step(run, opt, sft_objective(
        vocab_chunk=min(8192, V), num_domains=len(run.domains),
        aux_coef=run.model_cfg.router_aux_loss_coef))

    def step_fn(state, i, loop):
        batch = sft_rows(run, next(pipeline))
        state, metrics = step(state, batch)
        return state, metrics, {}, None

    state, loop = train_loop(run, state, step_fn, pipeline=pipeline,
                                    total_steps=cfg.optimizer.total_steps, resume=resume,
                                    prefix="sft")
    return common.finish(run, state["params"], loop)
