"""The optional ``onnx`` section: scoring speed of the exported ONNX graph under onnxruntime against
``model.score`` in PyTorch, both on the CPU at one thread, for the methods that export (``knn``,
``proad``), tiny preset. Speed does not depend on what the weights learned, so the knn bank is
built from the synthetic training images of 8 categories and Pro-AD keeps its seeded
initialisation. Rounds alternate the two runtimes; each figure is the best round."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipelines.bench.measure import experiment, ratio, seeded_model, torch_threads

BATCH = 8
BATCHES = 8
ROUNDS = 3


def _rows(data: Path, split: str):
    import pyarrow as pa

    from anomdiff.data.manifest import read_manifest, shard_paths
    from anomdiff.data.schema import read_shard
    from anomdiff.data.transforms import COLUMNS

    manifest = read_manifest(data)
    return pa.concat_tables([read_shard(p, columns=list(COLUMNS)) for p in shard_paths(data, manifest, split)])


def _knn_bank(model, images) -> None:
    import torch

    features = model.patch_features(torch.from_numpy(images))
    rows = features.permute(0, 2, 3, 1).reshape(len(images), -1, features.shape[1])
    model.build_memory({0: rows.reshape(-1, rows.shape[-1])})


def onnx_section(work: Path, categories: int = 8) -> dict:
    import onnxruntime
    import torch

    from anomdiff.data.synthetic import synthesize
    from anomdiff.data.transforms import DecodeBatch
    from anomdiff.export import export_onnx

    synthesize(work / "data", categories, seed=0, image_size=64)
    train, test = _rows(work / "data", "train"), _rows(work / "data", "test")
    out: dict = {"batch": BATCH, "threads": 1}
    for method in ("knn", "proad"):
        cfg = experiment("tiny", f"model.method={method}")
        model = seeded_model(cfg, categories).eval()
        decode = DecodeBatch(cfg.model.image_size, sorted(set(train.column("category").to_pylist())))
        if method == "knn":
            _knn_bank(model, decode(train)["image"])
        model.save(work / method, metadata={"categories": decode.categories})
        path = export_onnx(work / method, work / f"{method}.onnx", batch_size=BATCH)
        images = decode(test.slice(0, BATCH * BATCHES))["image"]
        batches = [images[i:i + BATCH] for i in range(0, len(images) - BATCH + 1, BATCH)]
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        with torch_threads(1), torch.no_grad():
            runs = {"pytorch": lambda x, m=model: m.score({"image": torch.from_numpy(x)}),
                    "onnxruntime": lambda x, s=session: s.run(None, {"image": x})}
            best = dict.fromkeys(runs, 0.0)
            for _ in range(ROUNDS):
                for name, score in runs.items():
                    score(batches[0])  # warm-up
                    tick = time.perf_counter()
                    for x in batches:
                        score(x)
                    best[name] = max(best[name], sum(len(x) for x in batches) / (time.perf_counter() - tick))
            expected = model.score({"image": torch.from_numpy(batches[0])})["image_score"].numpy()
        got = session.run(["image_score"], {"image": batches[0]})[0]
        out[method] = {"pytorch_images_per_s": best["pytorch"], "onnx_images_per_s": best["onnxruntime"],
                       "speedup": ratio(best["onnxruntime"], best["pytorch"]),
                       "max_relative_score_difference": float(np.max(np.abs(got - expected) / np.abs(expected))),
                       "onnx_mib": path.stat().st_size / 2**20}
        print(f"[bench] onnx / {method}: {best['onnxruntime']:.1f} vs {best['pytorch']:.1f} images/s", flush=True)
    return out
