"""The benchmark harness runs end to end on a cut-down preset on the CPU and writes sane results."""

import json

import pytest

pytest.importorskip("mlx_lm")
from benchmarks import run  # noqa: E402

DEPTH = 24


def test_harness_on_a_reduced_preset(tmp_path):
    stem = run.main([
        "E2B", "--bits", "4", "--layers", "2", "--vocab", "1024", "--prompt-tokens", "16", "--gen-tokens", "3",
        "--depths", "0", str(DEPTH), "--repeats", "1", "--prefill-step", "16", "--bandwidth-bytes", str(64 << 20),
        "--out", str(tmp_path), "--name", "cpu",
    ])  # fmt: skip
    results = json.loads(stem.with_suffix(".json").read_text())

    assert results["schema"] == 1
    assert results["device"]["bandwidth_used_gbps"] > 0
    assert {"mlx", "mlx-lm"} <= set(results["versions"])
    assert results["commit"]
    [model] = results["models"]
    assert model["model"] == "E2B/2L/1024V"
    assert model["logits_check"]["rel_l2"] < 1e-4
    assert [row["test"] for row in model["rows"]] == ["pp16", "tg3", f"tg3 @ d{DEPTH}"]
    for row in model["rows"]:
        assert row["ours"] > 0 and row["mlx-lm"] > 0
        assert row["ratio"] == pytest.approx(row["ours"] / row["mlx-lm"])
    for row in model["rows"][1:]:
        assert 0 < row["roofline_pct"]["ours"] and 0 < row["roofline_pct"]["mlx-lm"]
    for case in model["runs"]:
        for runtime in ("ours", "mlx-lm"):
            assert case[runtime]["peak_memory_gb"]["median"] >= model["weights_gb"]
            assert case[runtime]["prompt_tps"]["median"] > 0
    table = stem.with_suffix(".md").read_text()
    assert "| E2B/2L/1024V | tg3 @ d24 |" in table and "mlx_lm.benchmark form" in table


def test_decode_timeline_split():
    """Steps cut at the argmax kernel; busy counts overlapping kernels once; families sum per step."""
    from benchmarks.decode_timeline import split

    rows = []
    for step in range(3):  # argmax, then a GEMV and an overlapping head_norm_rope, then a gap of 100 ns
        t = 1000 * step
        rows += [(t, 10, "arg_reduce_general"), (t + 20, 200, "custom_kernel_quantized_gemv_x"),
                 (t + 120, 200, "custom_kernel_head_norm_rope_x")]
    rows.append((3000, 10, "arg_reduce_general"))
    result = split(rows, steps=3)
    assert result["steps"] == 3 and result["kernels_per_step"] == 3
    assert result["span_us"] == pytest.approx(1.0)  # end of one argmax to end of the next
    assert result["busy_us"] == pytest.approx(0.31)  # 20..320 once, plus the argmax's 10
    families = {row["family"]: row for row in result["families"]}
    assert families["quantized GEMV (ours)"]["us_per_step"] == pytest.approx(0.2)
    assert families["q/k/v norms + RoPE (ours)"]["per_step"] == 1
