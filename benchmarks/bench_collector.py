"""CartPole experience collection: AsyncBatchedCollector vs single-thread loops.

    OMP_NUM_THREADS=1 python benchmarks/bench_collector.py [--actors 4 16 64] [--repeats 3]
"""
from rlserve.bench.collector import main

if __name__ == "__main__":
    main()
