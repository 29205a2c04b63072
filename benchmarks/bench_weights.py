"""Weight sync: send() cost, delay until served, throughput with updates every 10 ms vs never.

    OMP_NUM_THREADS=1 python benchmarks/bench_weights.py [--sizes 1M 50M] [--placements thread process]
        [--seconds 3] [--repeats 3] [--period-ms 10] [--no-wait-idle]
"""
from rlserve.bench.weights import main

if __name__ == "__main__":
    main()
