"""The paper-size models, random weights, trained for two steps on this machine's CPUs by the real
job: DiAD (SD1.5 UNet 859.52M + SG network 471.87M) and DRDC (SD inpainting UNet 859.54M + Pro-AD
base 102.21M). 2 Ray Train workers under ZeRO-3 with the optimizer offloaded, bf16 weights,
gradient checkpointing, 256 px, one image per worker. Each checkpoints, the same command resumes
from the checkpoint, and the exported model scores test images through ``evaluate`` and ``predict``.

About 7 minutes and 22 GB of memory each (docs/training.md): ``make test-sd15`` runs them; ``make
test`` and CI leave them out, since their peak leaves about 2 GB of a 24 GB machine."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from anomdiff.config import CONF_DIR

pytestmark = pytest.mark.sd15
SMOKES = {"diad": (CONF_DIR / "experiment" / "sd15_cpu_smoke.yaml", 1.3e9, 1.5e9),
          "drdc": (CONF_DIR / "experiment" / "sd15_drdc_cpu_smoke.yaml", 1.0e9, 1.1e9)}
ANOMDIFF = str(Path(sys.executable).parent / "anomdiff")


def anomdiff(*args, timeout=3600) -> str:
    done = subprocess.run([ANOMDIFF, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


@pytest.mark.parametrize("method", ["diad", "drdc"])
def test_sd15_trains_resumes_exports_and_scores_on_a_cpu(tmp_path, method):
    smoke, fewest, most = SMOKES[method]
    data, out = tmp_path / "data", tmp_path / "run"
    anomdiff("data", "synth", data, "--categories", 2, "--train-per-category", 6, "--test-per-category", 2,
             "--image-size", 256, "--workers", 1)
    train = ["train", "--config", smoke, f"data.path={data}", f"output_dir={out}",
             f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    first = anomdiff(*train)
    assert "[denoiser] step 2/2" in first and "exported the step-" in first, first[-3000:]
    states = [json.loads(p.read_text()) for p in (out / "ray").glob("checkpoint_*/train_state.json")]
    assert [s["step"] for s in states] == [2] and states[0]["sealed_ranks"] == 2  # keep_checkpoints: 1

    again = anomdiff(*train)  # the same command: loads the step-2 checkpoint, trains nothing more, exports
    assert "resumed from the step-2 checkpoint" in again, again[-3000:]

    from anomdiff.models import load_model

    model = load_model(out / "model")
    unet = model.unet if method == "diad" else model.inpainter
    assert model.method == method and list(unet.config.block_out_channels) == [320, 640, 1280, 1280]
    assert fewest < sum(p.numel() for p in model.parameters()) < most
    del model
    report = tmp_path / "report"
    anomdiff("evaluate", out / "model", data, "--out", report, "evaluate.batch_size=1")
    doc = json.loads((report / "metrics.json").read_text())
    assert doc["num_images"] == 4 and 0 <= doc["mean"]["image_auroc"] <= 1

    from anomdiff.data.schema import read_shard

    row = read_shard(next(data.rglob("split=test/*.parquet")), columns=["image"]).to_pylist()[0]
    (tmp_path / "part.png").write_bytes(row["image"])
    anomdiff("predict", out / "model", tmp_path / "part.png", "--out", tmp_path / "predicted", "--batch-size", 1)
    with open(tmp_path / "predicted" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["score"]) >= 0
