import pytest

pytest.importorskip("deepspeed")


def test_cpu_ops_build_and_load_ahead_of_training():
    from deepspeed.accelerator import get_accelerator

    from pipelines.deepspeed_ops import build_cpu_ops

    if get_accelerator().device_name() != "cpu":
        pytest.skip("DeepSpeed sees an accelerator: no CPU ops are prebuilt")
    assert build_cpu_ops() == ["deepspeed_shm_comm", "fused_adam", "cpu_adam"]


BF16_ZERO3 = """
import os, socket, torch
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from anomdiff.config import CONF_DIR, load_config
from anomdiff.models import build_model
from pipelines.engine import initialize
cfg = load_config(CONF_DIR / "experiment" / "demo.yaml", [
    "data.path=x", "output_dir=y", "train.precision=bf16", "model.image_size=32", "model.vae.sample_size=32",
    "model.unet.sample_size=8", "model.diffusion.ddim_steps=2", "train.batch_size=2"])
torch.manual_seed(0)
model = build_model(cfg.model, 2)
model.set_stage("denoiser")
deepspeed.init_distributed(dist_backend="gloo")
engine = initialize(model, cfg, 1e-4, 3, 4)
batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "category_index": torch.tensor([0, 1])}
loss = engine(batch)["loss"]
engine.backward(loss)
engine.step()
engine.eval()
with torch.no_grad():
    maps = engine.module.score(batch)["anomaly_map"]
print("dtype", next(engine.module.parameters()).dtype, "loss", float(loss), "finite", bool(torch.isfinite(maps).all()))
"""


def test_a_bf16_zero3_engine_trains_and_scores_on_a_cpu():
    """``train.precision=bf16`` on a CPU: DeepSpeed holds bf16 weights under ZeRO-3, a step trains,
    and validation scoring runs through the frozen backbone's BatchNorm (whose statistics DeepSpeed
    leaves in float32 unless the engine set-up casts them)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", BF16_ZERO3], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dtype torch.bfloat16" in done.stdout and "finite True" in done.stdout, done.stdout
