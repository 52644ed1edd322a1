"""The fused residual + norm kernels on and off, alternated in one process: pipelined decode tok/s.

    MLX_GEMMA4_KERNELS=cuda python -m benchmarks.residual_norm_ab --out FILE --presets 31B E2B

For each preset (random 4-bit weights) and 512 and 4096 cached tokens (growing by ~600 over the rounds, alike
for both), ROUNDS rounds of STEPS decode steps each way (benchmarks/decode_ab.py): the kernels serving up to
TESTED_ROWS rows (on) or none (off, MLX's ops; the CUDA default since session 7).
"""

from mlx_gemma4.kernels import residual_norm as rn

from . import decode_ab


def serving(rows: int):
    def switch(model):
        rn.MOST_ROWS["cuda"] = rows
        rn._plans.clear()
    return switch


if __name__ == "__main__":
    decode_ab.main(__doc__.splitlines()[0], {"on": serving(rn.TESTED_ROWS), "off": serving(0)}, serving(0),
                   ["31B", "E2B"])
