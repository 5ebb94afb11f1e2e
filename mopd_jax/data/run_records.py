"""The records of a run: built-in domains and data files, by domain, with where each came from.

``load_located(cfg)`` -> ``({domain: [(where, record)]}`` train, same for eval): ``where`` is
``file:line`` (JSONL), ``file: record i`` (Parquet, ArrayRecord) or ``built-in add #i``, so
checks before the first step (``mopd_jax.validate``) can name the record they refuse.
"""

from __future__ import annotations

from mopd_jax.config import ConfigError
from mopd_jax.data import domains as builtin
from mopd_jax.data.sources import DataError, read_located


def load_located(cfg: Config) -> tuple[dict, dict]:
    """``load_records`` with each record's location: {domain: [(where, record)]}."""
    d = cfg.data
    train: dict[str, list] = {}
    evals: dict[str, list] = {}
    for name in d.builtin:
        if name not in builtin.BUILTIN:
            raise ConfigError(f"data.builtin: unknown built-in domain {name!r}; choose from "
                              f"{list(builtin.BUILTIN)}")
        train[name] = [(f"built-in {name} #{i}", r) for i, r in
                       enumerate(builtin.generate(name, d.builtin_size, seed=cfg.run.seed))]
        evals[name] = [(f"built-in {name} eval #{i}", r) for i, r in
                       enumerate(builtin.generate(name, d.eval_size, seed=0, split="eval"))]
    for path in d.files:
        for where, r in read_located(path):
            train.setdefault(r["domain"], []).append((where, r))
    for path in d.eval_files:
        for where, r in read_located(path):
            evals.setdefault(r["domain"], []).append((where, r))
    evals = {k: v[:d.eval_size] for k, v in evals.items()}
    if not train:
        raise ConfigError("data: no training prompts; set data.builtin (e.g. [add, sort, rev]) "
                          "or data.files")
    if d.only_domains:
        unknown = sorted(set(d.only_domains) - set(train))
        if unknown:
            raise DataError(f"data.only_domains: unknown domain(s) {unknown}; the data has "
                            f"{sorted(train)}")
    absent = sorted(set(d.weights) - set(train))
    if absent:
        raise ConfigError(f"data.weights: no training data for domain(s) {absent}; the data "
                          f"has {sorted(train)}: remove them or fix the domain names")
    if d.only_domains:
        train = {k: v for k, v in train.items() if k in d.only_domains}
    for name, recs in train.items():
        if not recs:
            raise DataError(f"domain {name!r} has no training prompts; remove it or add data")
    return train, evals
