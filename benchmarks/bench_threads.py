"""Actor threads: rlserve ThreadingTransport vs direct calls, the wake-up floor, the batched limit, torchrl.

    OMP_NUM_THREADS=1 python benchmarks/bench_threads.py [--actors 1 4 16 64] [--repeats 3]
"""
from rlserve.bench.threads import main

if __name__ == "__main__":
    main()
