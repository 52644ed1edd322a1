"""The GEMV's launch shapes by GPU time (session 8) against the wall-clock ones (session 7), alternated in one
process: pipelined decode tok/s.

    MLX_GEMMA4_KERNELS=cuda python -m benchmarks.launch_shapes_ab --out FILE --presets 31B

For each preset (random 4-bit weights) and 512 and 4096 cached tokens (growing over the rounds, alike for
both), ROUNDS rounds of STEPS decode steps with each table (benchmarks/decode_ab.py); the layers re-plan on
every switch.
"""

from mlx_gemma4.kernels import quantized_matmul as qmm
from mlx_gemma4.model.quantized_linear import use_kernel_layers

from . import decode_ab

# LAUNCH_SHAPES["cuda"] of session 7 (benchmarks/results/gemv_sweep.md, wall clock)
WALL_CLOCK = (
    (1, 5376, 5376, 2048, 2048, 8, 4),
    (1, 5376, 5376, 4096, 4096, 4, 1),
    (1, 5376, 5376, 8192, 8192, 8, 2),
    (1, 5376, 5376, 16384, 16384, 8, 2),
    (1, 16384, 16384, 5376, 5376, 8, 1),
    (1, 5376, 5376, 262144, 262144, 8, 2),
)
GPU_TIME = qmm.LAUNCH_SHAPES["cuda"]


def table(rules: tuple):
    def switch(model):
        qmm.LAUNCH_SHAPES["cuda"] = rules
        qmm.launch_shape.cache_clear()
        use_kernel_layers(model)  # drops the layers' plans
    return switch


if __name__ == "__main__":
    variants = {"gpu_time": table(GPU_TIME), "wall_clock": table(WALL_CLOCK)}
    decode_ab.main(__doc__.splitlines()[0], variants, table(GPU_TIME), ["31B"])
