"""The command line: a short `rlserve demo` run and `rlserve bench` dispatch."""
import re

import pytest

from rlserve.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_smoke_writes_report_and_plot(tmp_path, capsys):
    png = tmp_path / "demo.png"
    rc = main(["demo", "--envs", "4", "--time-limit", "4", "--frames-per-batch", "256", "--target", "1e9",
               "--plot", str(png), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "not solved within 4 s" in out  # an unreachable target: the time limit ends the run
    frames = int(re.search(r"([\d,]+) frames in", out).group(1).replace(",", ""))
    assert frames >= 256 and frames % 256 == 0  # at least one PPO update ran
    assert re.search(r"mean batch size \d+\.\d+; latency p50 \d+\.\d+ ms, p99 \d+\.\d+ ms", out)
    assert re.search(r"policy lag:  mean \d+\.\d+ versions", out)
    assert "weights via SharedMemWeightSyncScheme" in out
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_demo_strict_exit_status(tmp_path):
    rc = main(["demo", "--envs", "2", "--time-limit", "1", "--frames-per-batch", "64", "--target", "1e9", "--plot", "",
               "--strict", "--no-progress"])
    assert rc == 1


def test_bench_runs_known_and_skips_missing(tmp_path, capsys):
    png = tmp_path / "bench.png"
    rc = main(["bench", "--transports", "threads", "no_such_bench", "--actors", "2", "--seconds", "0.2",
               "--repeats", "1", "--no-wait-idle", "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0
    table = out.split("=== all benchmarks")[1]
    assert re.search(r"threads\s+rlserve\s+2\s+[\d,]+", table)  # the threads bench row, 2 actors
    assert "skipped: no_such_bench (not available" in out
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_bench_nothing_available(capsys):
    assert main(["bench", "--transports", "no_such_bench", "--no-wait-idle"]) == 1


def test_cli_requires_a_subcommand():
    with pytest.raises(SystemExit):
        main([])


def test_ppo_gae_follows_each_env_separately():
    import torch
    from tensordict import TensorDict

    from rlserve.demo import PPO, PPOConfig, make_policy

    cfg = PPOConfig(gamma=0.5, lam=1.0, reward_scale=1.0)
    ppo = PPO(make_policy(4, 2), 4, cfg)
    for p in ppo.critic.parameters():  # V == 0 everywhere: advantages are plain discounted returns
        torch.nn.init.zeros_(p)
    # env 0: rewards 1, 2, 4 with a termination after the 2nd; env 1 (interleaved): 8, 16, batch cut after
    env = torch.tensor([0, 1, 0, 1, 0])
    rew = torch.tensor([1.0, 8.0, 2.0, 16.0, 4.0])
    term = torch.tensor([False, False, True, False, False])
    td = TensorDict({
        "observation": torch.zeros(5, 4), "env_id": env,
        "next": {"observation": torch.zeros(5, 4), "reward": rew[:, None], "terminated": term[:, None],
                 "truncated": torch.zeros(5, 1, dtype=torch.bool), "done": term[:, None]},
    }, batch_size=[5])
    adv, ret = ppo.advantages(td)
    assert torch.allclose(adv, torch.tensor([1 + 0.5 * 2, 8 + 0.5 * 16, 2.0, 16.0, 4.0]))
    assert torch.allclose(ret, adv)
