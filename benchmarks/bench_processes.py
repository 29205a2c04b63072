"""Actor processes: rlserve MPTransport vs direct calls and torchrl's process transports.

    OMP_NUM_THREADS=1 python benchmarks/bench_processes.py [--procs 1 2 4 8] [--repeats 3] [--seconds 3]

Run it with the torchrl venv (.venv-bench) to get torchrl's MPTransport and
ProcessSlotTransport in the same run; rlserve is taken from ../src when it is
not installed there.
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    import rlserve  # noqa: F401
except ImportError:
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    sys.path.insert(0, os.path.abspath(src))
    os.environ["PYTHONPATH"] = os.path.abspath(src) + os.pathsep + os.environ.get("PYTHONPATH", "")

from rlserve.bench.processes import main  # noqa: E402

if __name__ == "__main__":
    main()
