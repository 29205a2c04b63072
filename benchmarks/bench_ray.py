"""Ray actors: rlserve's RayTransport (server in an actor / in the driver) vs Ray's bare echo call and torchrl.

    OMP_NUM_THREADS=1 python benchmarks/bench_ray.py [--actors 1 4 8] [--seconds 3] [--repeats 3] \
        [--torchrl-python .venv-bench/bin/python] [--no-wait-idle]
"""
from rlserve.bench.ray_actors import main

if __name__ == "__main__":
    main()
