"""Compact PPO (clipped objective, GAE) for discrete-action policies served by rlserve.

The served policy samples its own action and reports the log-probability it
used, so the trainer can correct for the lag between acting and learning with
PPO's importance ratio.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from tensordict.nn import TensorDictModule


def mlp(n_in: int, n_out: int, hidden: int = 64) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, n_out))


class SamplingActor(nn.Module):
    """observation -> (sampled action, its log-prob). What the inference server runs."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int = 64):
        super().__init__()
        self.net = mlp(obs_dim, n_actions, hidden)

    def forward(self, obs):
        logp = torch.log_softmax(self.net(obs), -1)
        action = torch.multinomial(logp.exp(), 1)
        return action.squeeze(-1), logp.gather(-1, action).squeeze(-1)

    def log_prob_entropy(self, obs, action):
        logp = torch.log_softmax(self.net(obs), -1)
        return logp.gather(-1, action.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def make_policy(obs_dim: int, n_actions: int, hidden: int = 64) -> TensorDictModule:
    return TensorDictModule(SamplingActor(obs_dim, n_actions, hidden), in_keys=["observation"],
                            out_keys=["action", "action_log_prob"])


@dataclass
class PPOConfig:
    lr: float = 2.5e-3
    gamma: float = 0.99
    lam: float = 0.95
    clip: float = 0.2
    epochs: int = 6
    minibatch: int = 512
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    max_grad_norm: float = 0.5
    reward_scale: float = 0.1


class PPO:
    """Owns the trainer's copy of the actor, a critic and their optimizer."""

    def __init__(self, policy: TensorDictModule, obs_dim: int, cfg: PPOConfig, hidden: int = 64):
        self.policy = policy
        self.actor: SamplingActor = policy.module
        self.critic = mlp(obs_dim, 1, hidden)
        self.cfg = cfg
        params = list(self.actor.parameters()) + list(self.critic.parameters())
        self.params = params
        self.opt = torch.optim.Adam(params, lr=cfg.lr, eps=1e-5)

    @torch.no_grad()
    def advantages(self, td):
        """GAE per environment; transitions of one env are in step order within a batch."""
        c = self.cfg
        v = self.critic(td["observation"]).squeeze(-1)
        nv = self.critic(td["next", "observation"]).squeeze(-1)
        r = td["next", "reward"].squeeze(-1) * c.reward_scale
        term = td["next", "terminated"].squeeze(-1).float()
        delta = (r + c.gamma * nv * (1 - term) - v).tolist()
        done = td["next", "done"].squeeze(-1).tolist()
        env = td["env_id"].tolist()
        adv = [0.0] * len(delta)
        later: dict = {}  # env -> advantage of its next step in this batch
        gl = c.gamma * c.lam
        for i in range(len(delta) - 1, -1, -1):
            e = env[i]
            a = delta[i] + (0.0 if done[i] else gl * later.get(e, 0.0))
            adv[i] = later[e] = a
        adv = torch.tensor(adv)
        return adv, adv + v

    def update(self, td) -> dict:
        c = self.cfg
        adv, ret = self.advantages(td)
        obs, act, old_logp = td["observation"], td["action"], td["action_log_prob"]
        n = obs.shape[0]
        mb = min(c.minibatch, n)
        stats = {"loss": 0.0, "clipfrac": 0.0}
        steps = 0
        for _ in range(c.epochs):
            for idx in torch.randperm(n).split(mb):
                a = adv[idx]
                a = (a - a.mean()) / (a.std() + 1e-8) if a.numel() > 1 else a
                logp, ent = self.actor.log_prob_entropy(obs[idx], act[idx])
                ratio = (logp - old_logp[idx]).exp()
                pg = -torch.min(ratio * a, ratio.clamp(1 - c.clip, 1 + c.clip) * a).mean()
                vf = (self.critic(obs[idx]).squeeze(-1) - ret[idx]).pow(2).mean()
                loss = pg + c.vf_coef * vf - c.ent_coef * ent.mean()
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
                self.opt.step()
                stats["loss"] += loss.item()
                stats["clipfrac"] += ((ratio - 1).abs() > c.clip).float().mean().item()
                steps += 1
        return {k: v / max(steps, 1) for k, v in stats.items()}
