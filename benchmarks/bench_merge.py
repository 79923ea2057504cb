"""Entry point of the merge benchmark; the code lives in pydedup/bench.py so
that `python -m pydedup bench` runs it from an installed package too."""
from pydedup.bench import main

if __name__ == "__main__":
    main()
