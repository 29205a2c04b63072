"""The command line: a short `rlserve demo` run and `rlserve bench` dispatch."""
import re

import pytest

from rlserve.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_smoke_writes_report_and_plot(tmp_path, capsys):
    png = tmp_path / "demo.png"
    rc = main(["demo", "--envs", "4", "--time-limit", "4", "--frames-per-batch", "256",
               "--plot", str(png), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "not solved within 4 s" in out  # 4 s is far too short for CartPole
    frames = int(re.search(r"([\d,]+) frames in", out).group(1).replace(",", ""))
    assert frames >= 256 and frames % 256 == 0  # at least one PPO update ran
    assert re.search(r"mean batch size \d+\.\d+; latency p50 \d+\.\d+ ms, p99 \d+\.\d+ ms", out)
    assert re.search(r"policy lag:  mean \d+\.\d+ versions", out)
    assert "weights via SharedMemWeightSyncScheme" in out
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_demo_strict_exit_status(tmp_path):
    rc = main(["demo", "--envs", "2", "--time-limit", "1", "--frames-per-batch", "64", "--plot", "",
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
