"""ONNX export: onnxruntime's scores equal PyTorch's for the methods whose scoring is one forward pass."""

import json
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from samples import images, noise_bank_knn

from anomdiff.export import export_onnx
from anomdiff.models import build_model
from anomdiff.models.config import ModelConfig, load_preset
from pipelines import cli

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
TOLERANCE = 1e-4  # relative, on maps and scores: float32 kernels of two runtimes


def onnx_scores(path, x):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["anomaly_map", "image_score"], {"image": x.numpy()})


def assert_same(path, model, x):
    anomaly_map, image_score = onnx_scores(path, x)
    expected = model.score({"image": x})
    scale = float(expected["anomaly_map"].abs().max())
    assert np.abs(anomaly_map - expected["anomaly_map"].numpy()).max() <= TOLERANCE * scale
    assert np.allclose(image_score, expected["image_score"].numpy(), rtol=TOLERANCE)


def test_knn_exports_with_its_bank_and_scores_as_pytorch_does(tmp_path):
    knn = noise_bank_knn(image_size=32)
    knn.save(tmp_path / "knn", metadata={"categories": ["a"], "threshold": 1.5, "score_range": [0.0, 3.0]})
    path = export_onnx(tmp_path / "knn", tmp_path / "knn.onnx", batch_size=2)
    x, _ = images(0, 2, seed=3, defects=True)
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear", antialias=True)
    assert_same(path, knn, x)
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert meta["threshold"] == 1.5 and meta["categories"] == ["a"] and meta["image_size"] == 32


def test_proad_exports_and_scores_as_pytorch_does(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"method": "proad", "image_size": 32}, base=load_preset("tiny"))
    proad = build_model(cfg, 2).eval()
    proad.save(tmp_path / "proad", metadata={"categories": ["a", "b"], "threshold": 0.5})
    path = export_onnx(tmp_path / "proad", tmp_path / "proad.onnx", batch_size=2)
    x, _ = images(1, 2, seed=4, defects=True)
    assert_same(path, proad, torch.nn.functional.interpolate(x, size=32, mode="bilinear", antialias=True))


def test_a_diffusion_chain_is_refused_with_the_reason(tmp_path, monkeypatch, capsys):
    cfg = ModelConfig.from_dict({"image_size": 32, "vae": {"sample_size": 32}, "unet": {"sample_size": 8}},
                                base=load_preset("tiny"))
    build_model(cfg, 1).save(tmp_path / "diad", metadata={"categories": ["a"]})
    monkeypatch.setattr(sys, "argv", ["anomdiff"])
    with pytest.raises(SystemExit) as exit_:
        cli.main(["export", str(tmp_path / "diad"), "--out", str(tmp_path / "diad.onnx")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "diad does not export to ONNX" in err and "diffusion chain" in err
    assert not (tmp_path / "diad.onnx").exists()
