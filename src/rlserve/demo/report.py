"""The demo's short text report and its PNG (return vs time, batch-size histogram)."""
from __future__ import annotations


def _f(v, fmt="{:.2f}"):
    return "-" if v is None or v != v else fmt.format(v)


def format_report(r: dict) -> str:
    lat = r["latency_ms"]
    qw = r["queue_wait_ms"]
    status = (f"SOLVED in {r['solve_time_s']:.1f} s" if r["solved"]
              else f"not solved within {r['time_limit_s']:.0f} s")
    return "\n".join([
        f"rlserve demo: PPO on {r['env']} ({r.get('env_kind', 'gymnasium')}), {r['envs']} envs on actor "
        f"{'processes' if r['actor_type'] == 'process' else 'threads'}, weights via {r['weight_sync']}",
        f"  result:      {status} (mean return of the last {r['window']} episodes: "
        f"{_f(r['final_return'], '{:.1f}')}, target {r['target']:.0f})",
        f"  throughput:  {r['frames']:,} frames in {r['elapsed_s']:.1f} s = {r['frames_per_s']:,.0f} frames/s; "
        f"{r['episodes']:,} episodes; {r['updates']} updates ({r['train_time_s']:.1f} s training)",
        f"  server:      mean batch size {r['mean_batch_size']:.2f}; latency p50 {_f(lat['p50'])} ms, "
        f"p99 {_f(lat['p99'])} ms; queue wait p50 {_f(qw['p50'])} ms, p99 {_f(qw['p99'])} ms",
        f"  policy lag:  mean {_f(r['lag_mean'])} versions behind the trainer, max {r['lag_max']} "
        f"(final version {r['policy_version']})",
    ])


def write_plot(r: dict, path: str) -> str:
    """Write the two-panel PNG; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if r["episode_log"]:
        t, ret = zip(*r["episode_log"])
        ax1.scatter(t, ret, s=3, alpha=0.25, label="episode return")
    if r["curve"]:
        t, m = zip(*r["curve"])
        ax1.plot(t, m, color="C1", lw=2, label=f"mean of last {r['window']}")
    ax1.axhline(r["target"], color="k", ls="--", lw=1, label=f"target {r['target']:.0f}")
    ax1.set_xlabel("wall time (s)")
    ax1.set_ylabel("return")
    ax1.set_title(f"{r['env']}: {r['envs']} envs, {r['frames_per_s']:,.0f} frames/s")
    ax1.legend(loc="lower right", fontsize=8)
    hist = r["batch_size_hist"]
    if hist:
        sizes = sorted(hist)
        ax2.bar(sizes, [hist[s] for s in sizes], width=0.8)
    ax2.set_xlabel("requests per forward pass")
    ax2.set_ylabel("forward passes")
    ax2.set_title(f"server batch sizes (mean {r['mean_batch_size']:.1f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
