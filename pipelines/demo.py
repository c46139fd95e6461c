"""The demo: synthesize the embedded multi-category dataset and inspect it.

    anomdiff demo                       # = make demo
    python -m pipelines.demo --categories 8

Writes under ``$ANOMDIFF_HOME/demo`` (default ``./.anomdiff/demo``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from anomdiff.data.manifest import format_table, read_manifest, summary, verify
from anomdiff.data.synthetic import synthesize


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anomdiff demo", description=__doc__.splitlines()[0])
    parser.add_argument("--categories", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    home = Path(os.environ.get("ANOMDIFF_HOME", ".anomdiff")) / "demo"
    data = home / "data"
    print(f"[1/2] synthesizing {args.categories} categories into {data}")
    synthesize(data, args.categories, seed=args.seed, image_size=args.image_size, overwrite=True)
    manifest = read_manifest(data)
    problems = verify(data, manifest)
    if problems:
        raise SystemExit("\n".join(problems))
    print(f"[2/2] {len(manifest['shards'])} shards verified")
    print(format_table(summary(manifest)))


if __name__ == "__main__":
    main()
