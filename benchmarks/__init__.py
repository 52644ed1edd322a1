"""Speed and memory harness: mlx-gemma4 vs mlx-lm's Gemma 4, side by side on the same weights.

    python -m benchmarks.run E2B --bits 4 --out benchmarks/results
"""
