"""Asynchronous MOPD: rollouts sampled ``run.max_staleness`` steps ahead of the step that
trains on them.

Policy version v = the number of optimizer steps applied to the weights that sampled a
rollout. With staleness bound k, the rollouts of step i are sampled by version max(i - k, 0):

    step i:  take r_i (sampled earlier) -> dispatch train step i (async, trainer devices)
             -> sample r_{i+k} with version i on the sampler devices while it runs

so the sampler works while the trainer trains (they overlap when ``mesh.roles`` puts them on
different devices; on one mesh the two programs queue on the same devices). Version i's
weights reach the sampler before step i donates them: one device-to-device ``device_put``
onto the sampler's layout (a copy even when the layouts coincide). k = 0 samples r_i with
version i right before step i: the synchronous loop.

Every rollout keeps its version (staleness = step - version <= k) and its own sampler
log-probs mu, which estimator A's IcePop mask and IS ratio use, so the staleness is corrected
token by token. The checkpoint of step s holds the in-flight rollouts r_s .. r_{s+k-1}
(``host_state``: tokens, masks, mu, rewards, routing, versions), so a resumed run trains on
exactly the rollouts the uninterrupted one would have; teachers score a step's rollouts when
the step takes them (teachers are frozen, so a resumed run gets the same numbers).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mopd_jax.sampling.rollout import RolloutBatch


@dataclasses.dataclass
class Produced:
    """One step's rollouts, ready to train on once scored."""

    step: int            # the step that trains on them
    version: int         # the policy version that sampled them
    rb: RolloutBatch
    rewards: np.ndarray  # [R]
    sample_s: float = 0.0  # wall time of the rollout (overlapped with training when k > 0)


_ARRAYS = ("tokens", "prompt_mask", "response_mask", "logprobs", "lengths", "prompt_lengths",
           "response_lengths", "prompt_index", "sample_index")


class RolloutQueue:
    """Rollouts for steps ``i .. i + k`` while step i trains (see module docstring).

    ``produce(step, params, version) -> Produced`` samples one step's rollouts with ``params``
    (already on the sampler's devices); ``to_sampler(params)`` copies trainer weights there;
    ``domains`` names the domain ids a checkpoint stores.
    """

    def __init__(self, max_staleness: int, total_steps: int, *,
                 produce: Callable[[int, object, int], Produced],
                 to_sampler: Callable[[object], object], domains: tuple[str, ...]):
        self.k, self.total, self.domains = int(max_staleness), int(total_steps), domains
        self._produce, self._to_sampler = produce, to_sampler
        self.items: dict[int, Produced] = {}
        self.staleness: dict[int, int] = {}  # staleness -> steps trained at it (this process)

    def take(self, step: int, params):
        """The rollouts of ``step`` and the sampler copy of the current weights (version
        ``step``), which ``ahead`` samples with after the train step is dispatched."""
        sampler_params = self._to_sampler(params)
        if self.k == 0:
            item = self._produce(step, sampler_params, step)
        else:
            for j in range(step, min(step + self.k, self.total)):
                if j not in self.items:  # the first steps (or a checkpoint without them)
                    self.items[j] = self._produce(j, sampler_params, step)
            item = self.items.pop(step)
        lag = step - item.version
        self.staleness[lag] = self.staleness.get(lag, 0) + 1
        return item, sampler_params

    def ahead(self, step: int, sampler_params) -> None:
        """Sample the rollouts of step ``step + k`` with version ``step`` (k > 0)."""
        j = step + self.k
        if self.k and j < self.total and j not in self.items:
            self.items[j] = self._produce(j, sampler_params, step)

    # ------------------------------------------------------------------ checkpointing
    def host_state(self) -> dict | None:
        """The in-flight rollouts as numpy arrays (None when there are none)."""
        if not self.items:
            return None
        out = {}
        for j, it in sorted(self.items.items()):
            rb = it.rb
            d = {k: np.asarray(getattr(rb, k)) for k in _ARRAYS}
            d.update(rewards=np.asarray(it.rewards, np.float32),
                     version=np.asarray(it.version, np.int64),
                     finish_stop=np.asarray([f == "stop" for f in rb.finish_reason]),
                     domain_id=np.asarray([self.domains.index(x) for x in rb.domain],
                                          np.int32))
            if rb.expert_ids is not None:
                d["expert_ids"] = rb.expert_ids
            out[str(j)] = d
        return out

    def load_host_state(self, arrays: dict | None, step: int) -> None:
        """Restore the in-flight rollouts saved at ``step`` (their rewards are saved, so
        their prompts' metadata is not needed again)."""
        self.items = {}
        for key, d in (arrays or {}).items():
            j = int(key)
            if j < step:
                continue
            R = len(d["tokens"])
            rb = RolloutBatch(
                **{k: np.asarray(d[k]) for k in _ARRAYS},
                finish_reason=["stop" if s else "length" for s in np.asarray(d["finish_stop"])],
                domain=[self.domains[i] for i in np.asarray(d["domain_id"])],
                metadata=[{} for _ in range(R)],
                expert_ids=np.asarray(d["expert_ids"]) if "expert_ids" in d else None)
            self.items[j] = Produced(j, int(d["version"]), rb, np.asarray(d["rewards"]))


def sampler_copy(engine, params):
    """``params`` on the engine's devices in its layout, never aliasing the trainer's buffers
    (the train step donates those): device to device, no host round trip."""
    moved = engine.shard_params(params)
    return jax.tree.map(lambda new, old: jnp.copy(new) if new is old else new, moved, params)
