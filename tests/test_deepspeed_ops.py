import pytest

pytest.importorskip("deepspeed")


def test_cpu_ops_build_and_load_ahead_of_training():
    from deepspeed.accelerator import get_accelerator

    from pipelines.deepspeed_ops import build_cpu_ops

    if get_accelerator().device_name() != "cpu":
        pytest.skip("DeepSpeed sees an accelerator: no CPU ops are prebuilt")
    assert build_cpu_ops() == ["deepspeed_shm_comm", "fused_adam", "cpu_adam"]


BF16_ZERO3 = """
import torch
import deepspeed
from anomdiff.config import CONF_DIR, load_config
from anomdiff.models import build_model
from pipelines.engine import ScoresThroughEngine, initialize
cfg = load_config(CONF_DIR / "experiment" / "demo.yaml", [
    "data.path=x", "output_dir=y", "train.precision=bf16", "model.method=drdc", "model.image_size=32",
    "model.drdc.patch=8", "model.drdc.timesteps=1", "model.drdc.ddim_steps=1", "train.batch_size=2"])
torch.manual_seed(0)
model = build_model(cfg.model, 2)
model.set_stage("denoiser")
deepspeed.init_distributed(dist_backend="gloo")
# Every parameter partitioned, however small (DeepSpeed keeps those under 1e5 elements whole by
# default): Pro-AD's prototype bank and its attention layers' output projections, read as
# attributes, are partitioned too.
engine = initialize(model, cfg, 1e-4, 3, 4, {"stage3_param_persistence_threshold": 0})
batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "category_index": torch.tensor([0, 1])}
out = engine(batch)
engine.backward(out["loss"])
engine.step()
engine.eval()
with torch.no_grad():
    maps = ScoresThroughEngine(engine).score(batch)["anomaly_map"]
print("dtype", next(engine.module.parameters()).dtype, "base loss", float(out["base"]),
      "finite", bool(torch.isfinite(maps).all()), flush=True)
"""


def test_a_bf16_zero3_engine_trains_and_scores_on_a_cpu():
    """``train.precision=bf16`` on a CPU, two ranks: DeepSpeed holds bf16 weights under ZeRO-3, a
    DRDC step trains its Pro-AD base and inpainter, and validation scoring, run through the engine
    (where DeepSpeed gathers the weights a method reads as attributes), passes the frozen backbone's
    BatchNorm (whose statistics DeepSpeed leaves in float32 unless the engine set-up casts them)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, "-c", BF16_ZERO3], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                              "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                              "OMP_NUM_THREADS": "1"})
             for rank in range(2)]
    try:
        outputs = [rank.communicate(timeout=600) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    for rank, (stdout, stderr) in zip(ranks, outputs, strict=True):
        assert rank.returncode == 0, stderr[-3000:]
        assert "dtype torch.bfloat16" in stdout and "finite True" in stdout, stdout
        assert "base loss 0.0 " not in stdout, stdout
