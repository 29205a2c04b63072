"""Stepping a torchrl environment (``EnvBase``) in a collector actor, as torchrl's collectors do.

The whole root TensorDict of the env's current step reaches the policy: every
observation key, ``is_init``, recurrent state from primers, action masks, and
what the policy wrote for the next step (``("next", ...)`` entries carry over
through ``step_and_maybe_reset``), so recurrent policies collect correctly.
Each transition is the policy's answer with the env's ``"next"`` added; a
finished episode is reset by the env itself.

rlserve never imports torchrl: an env is recognised as torchrl's when torchrl
is already imported (the user built the env with it) and the env derives from
its ``EnvBase``.
"""
from __future__ import annotations

import sys
import time
from typing import Any

import torch

from ._td import TensorDictBase

__all__ = ["is_torchrl_env", "TorchRLEnvLoop", "stack_td_transitions"]

_NEXT_REWARD = ("next", "reward")
_NEXT_DONE = ("next", "done")


def is_torchrl_env(env: Any) -> bool:
    """True for a torchrl ``EnvBase`` (checked without importing torchrl)."""
    envs = sys.modules.get("torchrl.envs")
    base = getattr(envs, "EnvBase", None) if envs is not None else None
    return base is not None and isinstance(env, base)


class TorchRLEnvLoop:
    """The stepping loop of one torchrl env (used by ``EnvActor`` for torchrl envs)."""

    def __init__(self, actor: Any):
        self.actor = actor

    def reset(self, env: Any, seed: int | None) -> TensorDictBase:
        a = self.actor
        if seed is not None:
            try:
                env.set_seed(seed)
            except Exception as e:
                from ._env_actor import EnvError

                raise EnvError(a.env_id, f"set_seed({seed})", e) from e
        return a.guard("reset()", env.reset)

    def run(self, env: Any) -> None:
        a = self.actor
        sink, client, env_id, timeout = a.sink, a.client, a.env_id, a.timeout
        td = self.reset(env, a.seed)
        step = env.step_and_maybe_reset
        ep_ret, ep_len = 0.0, 0
        stale = None  # keys the policy writes: not sent back to it with the next step
        while not sink.stopped:
            request = td if not stale else td.exclude(*stale)
            out = client(request, timeout)  # the answer: this step's entries, the policy's outputs, the version
            if stale is None:
                # The env carries the policy's last outputs into its next step (torchrl's step_mdp);
                # they are not the env's state, and would give every request after the first a
                # layout of its own (no shared batch, no shared-memory fast path).
                have = set(request.keys(include_nested=True, leaves_only=True))
                stale = [k for k in out.keys(include_nested=True, leaves_only=True) if k not in have]
            try:
                transition, td = step(out)
            except Exception as e:
                from ._env_actor import EnvError

                raise EnvError(env_id, "step_and_maybe_reset()", e) from e
            sink.put((env_id, transition))
            nxt = transition.get("next")
            ep_ret += float(nxt.get("reward").sum())
            ep_len += 1
            if bool(nxt.get("done").any()):
                sink.episodes.append((time.monotonic(), env_id, ep_ret, ep_len))
                ep_ret, ep_len = 0.0, 0


def stack_td_transitions(recs: list) -> TensorDictBase:
    """Transitions ``(env_id, TensorDict)`` as one TensorDict ``[n, ...]`` in torchrl's layout, plus
    ``env_index`` (torchrl's key) and ``env_id`` (rlserve's) per row."""
    env_ids = torch.tensor([r[0] for r in recs], dtype=torch.int64)
    tds = [r[1] for r in recs]
    try:
        out = torch.stack(tds)
    except (RuntimeError, KeyError, ValueError):  # key sets differ (e.g. a first step): tensordict's lazy stack
        from tensordict import LazyStackedTensorDict

        out = LazyStackedTensorDict(*tds, stack_dim=0)
    if out.batch_dims > 1:
        env_ids = env_ids.reshape(-1, *([1] * (out.batch_dims - 1))).expand(out.batch_size)
    out.set("env_index", env_ids)
    out.set("env_id", env_ids.clone())
    return out
