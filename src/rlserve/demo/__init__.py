"""The demo: train a policy on CartPole-v1 with environments served by rlserve.

``rlserve demo`` (see :mod:`rlserve.cli`) runs :func:`train`, prints
:func:`format_report` and writes :func:`write_plot`'s PNG.
"""
from .ppo import PPO, PPOConfig, make_policy
from .report import format_report, write_plot
from .train import DemoConfig, train

__all__ = ["DemoConfig", "PPO", "PPOConfig", "format_report", "make_policy", "train", "write_plot"]
