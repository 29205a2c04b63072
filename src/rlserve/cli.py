"""``rlserve`` command line: ``rlserve demo`` (the main job) and ``rlserve bench``."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import sys

# benchmark name -> candidate modules under rlserve.bench (first importable wins)
BENCHES = {
    "threads": ["threads"],
    "processes": ["processes"],
    "weights": ["weights"],
    "ray": ["ray", "ray_actors", "ray_monarch"],
    "monarch": ["monarch", "monarch_actors", "ray_monarch"],
    "collector": ["collector"],
}


def _demo(a) -> int:
    from .demo import DemoConfig, format_report, train, write_plot

    cfg = DemoConfig(envs=a.envs, time_limit=a.time_limit, target=a.target, window=a.window,
                     frames_per_batch=a.frames_per_batch, seed=a.seed, actor_type=a.actors,
                     torchrl_env=a.torchrl_env,
                     progress=False if a.no_progress else None)
    print(f"training PPO on {cfg.env} with {cfg.envs} environments (time limit {cfg.time_limit:.0f} s, "
          f"target mean return {cfg.target:.0f} over {cfg.window} episodes)", flush=True)
    r = train(cfg)
    print(format_report(r))
    if a.plot:
        print(f"  plot:        {write_plot(r, a.plot)}")
    return 1 if a.strict and not r["solved"] else 0


def _accepted_flags(mod) -> dict[str, bool]:
    """``{--flag: takes a list}`` for the flags a benchmark's ``main`` accepts, read from its ``--help``."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        try:
            mod.main(["--help"])
        except SystemExit:
            pass
    text = buf.getvalue()
    return {f: bool(re.search(re.escape(f) + r" (\w+) \[\1 \.\.\.\]", text))
            for f in re.findall(r"(--[a-z][a-z0-9-]*)", text)}


def _bench_argv(flags: dict, a) -> list[str]:
    """Our options, translated to what one benchmark accepts."""
    argv = []
    actors_flag = "--actors" if "--actors" in flags else "--procs" if "--procs" in flags else None
    for flag, val in ((actors_flag, a.actors), ("--seconds", a.seconds), ("--repeats", a.repeats)):
        if val is None or flag not in flags:
            continue
        if isinstance(val, list):
            val = val if flags[flag] else [max(val)]  # a single-count benchmark gets the largest
        else:
            val = [val]
        argv += [flag, *map(str, val)]
    if a.no_wait_idle and "--no-wait-idle" in flags:
        argv.append("--no-wait-idle")
    if a.torchrl_python and "--torchrl-python" in flags:
        argv += ["--torchrl-python", a.torchrl_python]
    return argv


def _load_bench(name: str):
    errors = []
    for cand in BENCHES.get(name, [name]):
        try:
            return importlib.import_module(f"rlserve.bench.{cand}"), None
        except ModuleNotFoundError as e:
            errors.append(f"{cand}: {e}")
        except ImportError as e:  # the module exists but a dependency is missing
            errors.append(f"{cand}: {e}")
    return None, "; ".join(errors)


def _bench(a) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from .bench.common import print_table

    rows: list[dict] = []
    skipped = []
    ran: dict = {}  # module -> bench name, so a module covering two names runs once
    for name in a.transports:
        mod, why = _load_bench(name)
        if mod is None:
            skipped.append(f"{name} (not available: {why})")
            continue
        if mod.__name__ in ran:
            skipped.append(f"{name} (covered by the {ran[mod.__name__]} run of {mod.__name__})")
            continue
        ran[mod.__name__] = name
        argv = _bench_argv(_accepted_flags(mod), a)
        print(f"\n=== {name}: rlserve.bench.{mod.__name__.rsplit('.', 1)[-1]} {' '.join(argv)}", flush=True)
        try:
            got = mod.main(argv) or []
        except (Exception, SystemExit) as e:  # one broken benchmark must not hide the others
            skipped.append(f"{name} (failed: {type(e).__name__}: {e})")
            continue
        for r in got:
            rows.append({"bench": name, **r})
    print("\n=== all benchmarks (median [min-max] over repeats)")
    if rows:
        print_table([_unify(r) for r in rows], ["bench", "case", "actors", "rate/s", "p50 us", "p99 us", "batch", "other"])
    for s in skipped:
        print(f"skipped: {s}")
    if a.plot and rows:
        print(f"plot: {_bench_plot(rows, a.plot)}")
    return 0 if rows else 1


_CASE = ("env", "transport", "model", "size", "placement", "mode", "obs")
_COUNT = ("actors", "procs")
_KEEP = ("p50 us", "p99 us", "batch")


def _is_rate(k: str) -> bool:
    return "/s" in k or k.startswith("req_s")


def _unify(r: dict) -> dict:
    """One benchmark row in the shared columns; whatever else it says goes to ``other``."""
    rates = [k for k in r if _is_rate(k) and not k.startswith("_")]
    out = {
        "bench": r["bench"],
        "case": " ".join(str(r[k]) for k in _CASE if r.get(k) not in (None, "")),
        "actors": next((r[k] for k in _COUNT if k in r), ""),
        "rate/s": (f"{r[rates[0]]} ({rates[0]})" if len(rates) == 1
                   else "; ".join(f"{k}={r[k]}" for k in rates)),
    }
    out.update({k: r[k] for k in _KEEP if k in r})
    rest = [k for k in r if k not in out and k not in _CASE + _COUNT + _KEEP and k not in rates
            and not k.startswith("_") and k != "bench"]
    out["other"] = " ".join(f"{k}={r[k]}" for k in rest)
    return out


def _rate(r: dict) -> float | None:
    """The requests/s figure of a row: ``_req_s`` or the median in a ``req/s``-like column."""
    v = r.get("_req_s")
    if isinstance(v, (int, float)):
        return float(v)
    for k, v in r.items():
        if "/s" in k and not k.startswith("_"):
            m = re.match(r"\s*([\d,]+(?:\.\d+)?)", str(v))
            if m:
                return float(m.group(1).replace(",", ""))
    return None


def _bench_plot(rows: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r, _rate(r)) for r in rows]
    pts = [(r, v) for r, v in pts if v is not None]
    labels = [" ".join(str(r[k]) for k in ("bench", "env", "transport", "mode", "obs", "size", "actors", "procs") if k in r)
              for r, _ in pts]
    benches = list(dict.fromkeys(r["bench"] for r, _ in pts))
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(pts) + 2), 4.5))
    ax.bar(range(len(pts)), [v for _, v in pts], color=[f"C{benches.index(r['bench']) % 10}" for r, _ in pts])
    ax.set_xticks(range(len(pts)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("requests or frames per s (median)")
    ax.set_yscale("log")
    ax.set_title("rlserve bench")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rlserve", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="train PPO on CartPole-v1 with environments served by rlserve")
    d.add_argument("--envs", type=int, default=16, help="environments / actor threads (default 16)")
    d.add_argument("--time-limit", type=float, default=300.0, help="seconds before giving up (default 300)")
    d.add_argument("--target", type=float, default=475.0, help="mean return that counts as solved")
    d.add_argument("--window", type=int, default=50, help="episodes averaged for the target (default 50)")
    d.add_argument("--frames-per-batch", type=int, default=2048)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--actors", choices=["thread", "process"], default="thread",
                   help="actor threads (default) or one process per env (MPTransport)")
    d.add_argument("--torchrl-env", action="store_true",
                   help="step torchrl's GymEnv instead of gymnasium's env (needs torchrl)")
    d.add_argument("--plot", default="demo.png", help="PNG to write ('' for none; default demo.png)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar even on a tty")
    d.add_argument("--strict", action="store_true", help="exit with status 1 when not solved")
    d.set_defaults(fn=_demo)
    b = sub.add_parser("bench", help="run the benchmarks and print one table")
    b.add_argument("--transports", nargs="+", default=list(BENCHES), metavar="NAME",
                   help=f"benchmarks to run (default: {' '.join(BENCHES)})")
    b.add_argument("--actors", type=int, nargs="+", help="actor counts (passed to benchmarks that take them)")
    b.add_argument("--seconds", type=float, help="seconds per measurement")
    b.add_argument("--repeats", type=int, help="repeats per measurement")
    b.add_argument("--no-wait-idle", action="store_true", help="do not wait for an idle machine")
    b.add_argument("--plot", help="write a PNG bar chart of requests/s here")
    b.add_argument("--torchrl-python", help="python of an environment with torchrl, for benchmarks that "
                                            "run torchrl's server in a separate process (ray)")
    b.set_defaults(fn=_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
