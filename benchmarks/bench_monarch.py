"""Monarch actors: rlserve's MonarchTransport (server in an actor / in the driver) vs Monarch's bare echo endpoint.

    OMP_NUM_THREADS=1 python benchmarks/bench_monarch.py [--actors 1 4 8] [--seconds 3] [--repeats 3] [--no-wait-idle]
"""
from rlserve.bench.monarch_actors import main

if __name__ == "__main__":
    main()
