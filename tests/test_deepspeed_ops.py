import pytest

pytest.importorskip("deepspeed")


def test_cpu_ops_build_and_load_ahead_of_training():
    from deepspeed.accelerator import get_accelerator

    from pipelines.deepspeed_ops import build_cpu_ops

    if get_accelerator().device_name() != "cpu":
        pytest.skip("DeepSpeed sees an accelerator: no CPU ops are prebuilt")
    assert build_cpu_ops() == ["deepspeed_shm_comm", "fused_adam"]
