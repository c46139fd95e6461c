"""anomdiff: train, evaluate and serve multi-class visual anomaly detectors (diffusion, prototypes, PatchCore) on Ray.

Data and model commands run here in-process; the jobs (the Ray programs ``train``, ``evaluate``, ``scale``,
``tune``, ``bench``, and ``predict`` and ``promote``, which need no Ray) are ``python -m pipelines.<job>``
programs and the subcommand forwards its arguments to their ``main``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import sys
from pathlib import Path

from anomdiff.models.config import preset_names

# Errors that mean "your input is wrong", reported as one line without a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, FileExistsError, KeyError)

JOBS = {  # command -> (module, what it does)
    "train": ("pipelines.train", "train a model on a converted dataset (Ray Train + DeepSpeed) and export it"),
    "evaluate": ("pipelines.evaluate", "score a model on a dataset's test split: metrics, per-image results, report"),
    "predict": ("pipelines.predict", "score image files or folders: a CSV of scores and decisions, overlays"),
    "demo": ("pipelines.demo", "synthesize a dataset, train the demo model on it and evaluate it, on this machine"),
    "tune": ("pipelines.tune", "search hyperparameters on Ray Tune (training-time or inference-time)"),
    "scale": ("pipelines.scale", "measure accuracy and cost as one model carries more categories"),
    "export": ("pipelines.export", "export a model's scoring to ONNX (knn, proad) for deployment without PyTorch"),
    "register": ("pipelines.register", "register an exported model folder as a new version of a registered model"),
    "promote": ("pipelines.promote", "move a registered model's alias to a version that passes the gate"),
    "bench": ("pipelines.bench.job", "benchmark this machine or cluster (figures as side-by-side ratios)"),
}


def _data_synth(args: argparse.Namespace) -> None:
    from anomdiff.data.synthetic import synthesize

    manifest = synthesize(args.out, args.categories, seed=args.seed, image_size=args.image_size,
                          train_per_category=args.train_per_category, test_per_category=args.test_per_category,
                          shard_mb=args.shard_mb, overwrite=args.overwrite, workers=args.workers)
    print(f"wrote {manifest['total']} images in {len(manifest['counts'])} categories to {args.out}")


def _data_photos(args: argparse.Namespace) -> None:
    import shlex

    from anomdiff.data.photos import make_photo_benchmark

    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    summary = make_photo_benchmark(args.out, categories, seed=args.seed, image_size=args.image_size,
                                   train_per_category=args.train_per_category,
                                   test_per_category=args.test_per_category, overwrite=args.overwrite)
    print(f"wrote {summary['total']} images in {len(summary['categories'])} categories to {args.out} (MVTec layout); "
          f"next: anomdiff data convert {shlex.quote(str(args.out))} DATA --format mvtec "
          f"--image-size {args.image_size}")


def _data_convert(args: argparse.Namespace) -> None:
    from anomdiff.data.convert import convert

    manifest = convert(args.src, args.out, args.format, image_size=args.image_size, skip_bad=args.skip_bad,
                       shard_mb=args.shard_mb, overwrite=args.overwrite, workers=args.workers,
                       json_dir=args.json_dir)
    print(f"wrote {manifest['total']} images in {len(manifest['counts'])} categories to {args.out}")
    if manifest.get("rejected"):
        print(f"left out {manifest['rejected']} bad samples, listed in {Path(args.out) / 'rejected.jsonl'}")


def _data_inspect(args: argparse.Namespace) -> None:
    from anomdiff.data.manifest import format_table, read_manifest, summary, verify

    manifest = read_manifest(args.data)
    doc = summary(manifest)
    print(json.dumps(doc, indent=2) if args.json else format_table(doc))
    if args.verify:
        problems = verify(args.data, manifest)
        for problem in problems:
            print(f"corrupt: {problem}", file=sys.stderr)
        if problems:
            raise SystemExit(1)
        print(f"verified {len(manifest['shards'])} shards", file=sys.stderr)


def _model_params(args: argparse.Namespace) -> None:
    from anomdiff.models.params import count_parameters

    counts = count_parameters(args.preset, args.method)
    if args.json:
        print(json.dumps(counts))
    else:
        for name, n in counts.items():
            print(f"{name:>12}  {n:>14,d}")


def bounded(kind: type, low: float, high: float):
    """An argparse type: a ``kind`` number within [low, high], else a usage error naming the option."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not low <= value <= high:  # also refuses nan and inf
            raise argparse.ArgumentTypeError(f"{text} is outside [{low:g}, {high:g}]")
        return value
    return parse


IMAGE_SIZE = bounded(int, 16, 4096)  # the backbones' strides need 16 px; 4096 px is ~50 MB per decoded image
PER_CATEGORY = bounded(int, 1, 1_000_000)
SEED = bounded(int, 0, 2**32 - 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomdiff", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="build and inspect datasets").add_subparsers(dest="data", required=True)
    synth = data.add_parser("synth", help="write the synthetic multi-category dataset")
    synth.add_argument("out")
    synth.add_argument("--categories", type=bounded(int, 1, 10_000), required=True)
    synth.add_argument("--seed", type=SEED, default=0)
    synth.add_argument("--image-size", type=IMAGE_SIZE, default=128)
    synth.add_argument("--train-per-category", type=PER_CATEGORY, default=40)
    synth.add_argument("--test-per-category", type=PER_CATEGORY, default=20)
    photos = data.add_parser("photos", help="write the real-photograph benchmark (MVTec layout) from skimage.data")
    photos.add_argument("out")
    photos.add_argument("--categories", help="comma-separated photographs (default: all)")
    photos.add_argument("--seed", type=SEED, default=0)
    photos.add_argument("--image-size", type=IMAGE_SIZE, default=64)
    photos.add_argument("--train-per-category", type=PER_CATEGORY, default=40)
    photos.add_argument("--test-per-category", type=PER_CATEGORY, default=20)
    photos.add_argument("--overwrite", action="store_true", help="replace a benchmark this command wrote before")
    photos.set_defaults(func=_data_photos)
    convert = data.add_parser("convert", help="convert a public dataset layout to sharded parquet")
    convert.add_argument("src")
    convert.add_argument("out")
    convert.add_argument("--format", required=True, choices=("mvtec", "visa", "realiad", "folder"))
    convert.add_argument("--image-size", type=IMAGE_SIZE, default=256)
    convert.add_argument("--skip-bad", action="store_true", help="leave bad samples out, listed in rejected.jsonl")
    convert.add_argument("--json-dir", help="realiad: another split set (e.g. single-view, fuiad json folder)")
    for sub in (synth, convert):
        sub.add_argument("--shard-mb", type=bounded(float, 0.01, 65536), default=128)
        sub.add_argument("--overwrite", action="store_true",
                         help="replace OUT if it holds a dataset (never the source or a folder holding it)")
        sub.add_argument("--workers", type=bounded(int, 1, 1024), default=None, help="processes (default: all cores)")
    synth.set_defaults(func=_data_synth)
    convert.set_defaults(func=_data_convert)
    inspect = data.add_parser("inspect", help="counts per category/split/label")
    inspect.add_argument("data")
    inspect.add_argument("--json", action="store_true")
    inspect.add_argument("--verify", action="store_true", help="check every shard's sha256 and row count")
    inspect.set_defaults(func=_data_inspect)

    model = commands.add_parser("model", help="facts about a model preset").add_subparsers(dest="model", required=True)
    params = model.add_parser("params", help="parameter counts per component")
    params.add_argument("--preset", required=True, choices=preset_names(), help="a file of conf/model/")
    params.add_argument("--method", default=None, help="default: the preset's own method")
    params.add_argument("--json", action="store_true")
    params.set_defaults(func=_model_params)

    for job, (_, summary) in JOBS.items():  # listed for --help; main() hands their arguments to the job
        commands.add_parser(job, help=summary)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in JOBS:  # the jobs parse their own arguments
            importlib.import_module(JOBS[argv[0]][0]).main(argv[1:])
            return
        args = build_parser().parse_args(argv)
        args.func(args)
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"anomdiff: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"anomdiff: error: {where}no space left on the device; free some space and run the same command "
              "again", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
