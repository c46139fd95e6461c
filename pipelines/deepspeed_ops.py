"""Compile DeepSpeed's just-in-time CPU ops once, at set-up, instead of inside the first training run.

    python -m pipelines.deepspeed_ops          # run by `make setup`

On a machine without GPU, DeepSpeed loads C++ ops the first time a worker starts: shared-memory
collectives (``deepspeed_shm_comm``, built when ``deepspeed.comm`` initialises), the AdamW kernel
(``fused_adam``, built by the ``AdamW`` optimizer of ``pipelines.engine.deepspeed_config``) and,
for runs that offload their optimizer (``train.zero.offload_optimizer``: the sd15 experiments, the
GPU check's offload settings), ``cpu_adam``. Built there, they cost the first run up to six minutes
of its time budget; built here, they land in torch's extension cache (``~/.cache/torch_extensions``
or ``$TORCH_EXTENSIONS_DIR``) and every run loads them in seconds. On a GPU machine nothing is
built: CUDA ops come with the image or are compiled by DeepSpeed's own install options.
"""

from __future__ import annotations

import time

CPU_OPS = ("ShareMemCommBuilder", "FusedAdamBuilder", "CPUAdamBuilder")


def build_cpu_ops() -> list[str]:
    """Load (compiling if needed) the CPU ops a training run uses; returns their names."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return []
    built = []
    for builder_name in CPU_OPS:
        builder = accelerator.create_op_builder(builder_name)
        builder.load(verbose=False)
        built.append(builder.NAME)
    return built


def main() -> None:
    start = time.perf_counter()
    built = build_cpu_ops()
    if built:
        print(f"DeepSpeed CPU ops ready: {', '.join(built)} ({time.perf_counter() - start:.0f} s)")
    else:
        print("DeepSpeed runs on an accelerator here: no CPU ops to build")


if __name__ == "__main__":
    main()
