"""Entry point of the benchmark (numpy, merge(), the background scanner and
kernel KSM on the same workloads); the code lives in pydedup/bench/ so that
`python -m pydedup bench` runs it from an installed package too. Same
options: python benchmarks/bench_merge.py --help"""
from pydedup.bench import main

if __name__ == "__main__":
    main()
