"""``python -m pipelines.bench``: the benchmark job (``pipelines.bench.job``)."""

from pipelines.bench.job import main

if __name__ == "__main__":
    main()
