"""TurboQuant decode attention's launch geometry: every geometry the sweep can choose computes the reference's
attention on the emulator; the rule table keeps today's launches for every preset layout; a plan picks its
geometry by the key count; the sweep's tables and rules from fake timings."""

import itertools
import json

import mlx.core as mx
import pytest

import metal_check
import metal_emu
from benchmarks import tq_launch_sweep as sweep
from mlx_gemma4.kernels import ENV
from mlx_gemma4.kernels import tq_attention as tq
from mlx_gemma4.kernels.tq_attention import Geometry
from mlx_gemma4.presets import PRESETS
from mlx_gemma4.turboquant.codec import TurboQuantCodec

emulated = pytest.mark.skipif(not (metal_check.CLANG and metal_emu.CXX), reason="needs clang-19 and clang++-19")

# (head dim, GQA group) of the layouts the sweep times: E2B sliding, E2B/31B global, 31B sliding
SWEPT = [(256, 8), (512, 8), (256, 2)]


def swept_geometries():
    """Each HPS the register budget allows at the finest chunking, and every MIN_CHUNK at the default HPS
    (the threadgroups only cap the chunks of caches far longer than an emulator case)."""
    for dim, group in SWEPT:
        default = tq.default_geometry(dim, group)
        for hps in sweep.heads_choices(dim, group):
            yield dim, group, Geometry(hps, min(sweep.MIN_CHUNKS), default.threadgroups)
        for min_chunk in sorted(set(sweep.MIN_CHUNKS) - {min(sweep.MIN_CHUNKS)}):
            yield dim, group, default._replace(min_chunk=min_chunk)


@emulated
@pytest.mark.parametrize("dim,group,geometry", list(swept_geometries()), ids=str)
def test_every_sweep_geometry_matches_the_reference(dim, group, geometry):
    """Two sequences, two kv heads, 150 packed keys (row 1 left-padded by 9), the newest 16 in full
    precision (row 1 missing 3 of them): chunks of this geometry's size, partials merged with the window."""
    length, window = 150, 16
    k_codec, v_codec = TurboQuantCodec(dim, 4, 10), TurboQuantCodec(dim, 3, 11)
    keys = mx.random.split(mx.random.key(dim + group), 5)
    q = mx.random.normal((2, 2 * group, 1, dim), key=keys[0])
    k = k_codec.encode(mx.random.normal((2, 2, length, dim), key=keys[1]))
    v = v_codec.encode(mx.random.normal((2, 2, length, dim), key=keys[2]))
    mask = (mx.arange(length)[None] >= mx.array([[0], [9]]))[:, None, None]
    recent = tq.Recent(mx.random.normal((2, 2, window, dim), key=keys[3]),
                       mx.random.normal((2, 2, window, dim), key=keys[4]),
                       packed_mask=(mx.arange(length) < length - window)[None, None, None],
                       mask=(mx.arange(window)[None] >= mx.array([[0], [3]]))[:, None, None])
    calls = []

    def launch(kernel, **call):
        calls.append((dict(call["template"]), call["grid"]))
        return metal_emu.run(kernel, **call)

    got = tq.attend(launch, q, k, v, k_codec, v_codec, 0.1, mask, recent, geometry)
    want = tq.reference(q.astype(mx.float64), k, v, k_codec, v_codec, 0.1, mask, recent)
    assert mx.abs(got - want).max().item() <= tq.TOLERANCE
    template, grid = calls[0]
    splits, chunks = tq.launch_grid(geometry, group, 2 * 2, length)
    assert (template["HPS"], template["NK"], grid[1]) == (geometry.heads_per_simdgroup, splits, chunks)
    assert chunks == -(-length // geometry.min_chunk)  # the chunking under test is this geometry's own


@pytest.mark.gpu
@pytest.mark.skipif(tq.backend() == "reference", reason="no GPU backend (set MLX_GEMMA4_KERNELS=cuda or metal)")
@pytest.mark.parametrize("dim,group,geometry", [(512, 8, Geometry(1, 16, 1024)), (512, 8, Geometry(2, 16, 512)),
                                                (256, 8, Geometry(1, 16, 1024)), (256, 8, Geometry(2, 16, 512)),
                                                (256, 2, Geometry(1, 16, 1024))], ids=str)
def test_sweep_geometries_on_device(dim, group, geometry):
    """The HPS values the default never takes on Gemma 4's groups, on the device at 8192 keys (more chunks
    than the threadgroups allow: the cap), with a mask and a recent window, against a float64 reference."""
    length, window = 8192, 64
    k_codec, v_codec = TurboQuantCodec(dim, 4, 1), TurboQuantCodec(dim, 4, 2)
    keys = mx.random.split(mx.random.key(dim + group), 5)
    q = mx.random.normal((2, 2 * group, 1, dim), key=keys[0])
    k = k_codec.encode(mx.random.normal((2, 2, length, dim), key=keys[1]).astype(mx.bfloat16))
    v = v_codec.encode(mx.random.normal((2, 2, length, dim), key=keys[2]).astype(mx.bfloat16))
    mask = (mx.arange(length)[None] >= mx.array([[0], [length // 3]]))[:, None, None]
    recent = tq.Recent(mx.random.normal((2, 2, window, dim), key=keys[3]),
                       mx.random.normal((2, 2, window, dim), key=keys[4]),
                       packed_mask=(mx.arange(length) < length - window)[None, None, None],
                       mask=(mx.arange(window)[None] >= mx.array([[0], [5]]))[:, None, None])
    assert tq.launch_grid(geometry, group, 4, length)[1] < -(-length // geometry.min_chunk)
    got = tq.attend(tq.launcher(tq.backend()), q, k, v, k_codec, v_codec, 1.0, mask, recent, geometry)
    with mx.stream(mx.cpu):  # float64, as test_tq_on_device: at these scores the float32 reference is 1.2e-4 off
        want = tq.reference(q.astype(mx.float64), k, v, k_codec, v_codec, 1.0, mask, recent)
        assert mx.abs(got - want).max().item() <= tq.TOLERANCE  # float64: on the CPU


def preset_layouts() -> set:
    """(head dim, query heads, kv heads) of every preset's sliding and global layers."""
    layouts = set()
    for p in PRESETS.values():
        layouts.add((p["head_dim"], p["num_attention_heads"], p["num_key_value_heads"]))
        layouts.add((p["global_head_dim"], p["num_attention_heads"],
                     p.get("num_global_key_value_heads") or p["num_key_value_heads"]))
    return layouts


def record_plans(monkeypatch, verdict=lambda key: True) -> tuple:
    """Plans whose launches are recorded (template, grid) and yield zeros; probes answered by `verdict`
    (their keys recorded)."""
    launches, probed = [], []

    def launcher(on):
        def launch(kernel, *, template, grid, output_shapes, output_dtypes, **_):
            launches.append((kernel.name, dict(template), grid))
            return [mx.zeros(shape, dtype) for shape, dtype in zip(output_shapes, output_dtypes)]

        return launch

    monkeypatch.setattr(tq, "launcher", launcher)
    monkeypatch.setattr(tq, "usable", lambda key, probe: probed.append(key) or verdict(key))
    monkeypatch.setattr(tq, "_plans", {})
    return launches, probed


def run_plan(dim, heads, kv_heads, length, batch=1):
    """One decode call through the public entry on zero rows of `length` keys."""
    codec = TurboQuantCodec(dim, 4, 0)
    rows = mx.zeros((batch, kv_heads, length, codec.words + 1), mx.uint32)
    tq.tq_attention(mx.zeros((batch, heads, 1, dim), mx.bfloat16), rows, rows, codec, codec, 1.0, None)


def expected_geometry(on, dim, group, kv_rows, length):
    """The backend's rule for this layout and key count as the table reads (first holding rule of the
    layout), else today's default: HPS the largest divisor of G within 4 with HPS·D <= 2048, 64 keys, 512."""
    for rule_dim, rule_group, rule_rows, most, hps, min_chunk, threadgroups in tq.LAUNCH_SHAPES[on]:
        if (rule_dim, rule_group, rule_rows) == (dim, group, kv_rows) and (most is None or length <= most):
            return hps, min_chunk, threadgroups
    return max(h for h in range(1, 5) if group % h == 0 and h * dim <= 2048), 64, 512


@pytest.mark.parametrize("on", ["cuda", "metal"])
def test_every_preset_layout_launches_its_tables_geometry(monkeypatch, on):
    """Every preset layout, batch and key count launches the geometry its backend's rules give (the default
    where none does): NK = 4 / (G / HPS) simdgroups on a chunk's keys, and ceil(S / MIN_CHUNK) chunks up to
    the threadgroups (and 1024 partials) a kv row."""
    monkeypatch.setenv(ENV, on)
    launches, _ = record_plans(monkeypatch)
    for (dim, heads, kv_heads), batch, length in itertools.product(preset_layouts(), (1, 2), (1, 100, 32768, 131072)):
        group = heads // kv_heads
        hps, min_chunk, threadgroups = expected_geometry(on, dim, group, batch * kv_heads, length)
        splits = max(1, 4 // (group // hps))
        chunks = max(1, min(-(-threadgroups // (batch * kv_heads)), 1024 // splits, -(-length // min_chunk)))
        run_plan(dim, heads, kv_heads, length, batch)
        name, template, grid = launches[-2]
        assert name == "tq_attention_partial"
        assert (template["HPS"], template["NK"], grid) == (hps, splits, (32 * group // hps * splits, chunks,
                                                                         batch * kv_heads))


def test_plan_picks_the_rules_geometry_by_key_count(monkeypatch):
    """Rules for one layout up to 100 and 1000 keys, the default beyond: each call launches its key count's
    geometry from one plan, and each geometry was probed with its own configuration."""
    monkeypatch.setenv(ENV, "cuda")
    monkeypatch.setitem(tq.LAUNCH_SHAPES, "cuda", ((256, 4, 2, 100, 2, 16, 512), (256, 4, 2, 1000, 1, 32, 512),
                                                   (512, 4, 2, None, 1, 16, 512)))
    launches, probed = record_plans(monkeypatch)
    expected = {50: (2, 4), 100: (2, 7), 101: (1, 4), 1000: (1, 32), 1001: (4, 16), 5000: (4, 79)}
    for length in expected:
        run_plan(256, 8, 2, length)
    partials = [(template["HPS"], grid[1]) for name, template, grid in launches if name == "tq_attention_partial"]
    assert partials == list(expected.values())
    assert len(tq._plans) == 1
    default = tuple(tq.default_geometry(256, 4))
    assert sorted(key[-3:] for key in probed) == sorted([(2, 16, 512), (1, 32, 512), default])
    run_plan(256, 8, 4, 50)  # 4 kv rows: no rule names the layout
    assert launches[-2][1]["HPS"] == tq.default_geometry(256, 2).heads_per_simdgroup == 2


def test_a_geometry_failing_its_probe_leaves_its_keys_to_the_next_rule(monkeypatch):
    monkeypatch.setenv(ENV, "cuda")
    monkeypatch.setitem(tq.LAUNCH_SHAPES, "cuda", ((256, 4, 2, 100, 2, 16, 512),))
    launches, _ = record_plans(monkeypatch, verdict=lambda key: key[-3:] != (2, 16, 512))
    run_plan(256, 8, 2, 50)
    assert (launches[0][1]["HPS"], launches[0][2][1]) == (4, 1)  # the default's HPS and 64-key chunks
    record_plans(monkeypatch, verdict=lambda key: key[-3:] == (2, 16, 512))
    codec = TurboQuantCodec(256, 4, 0)
    rows = mx.zeros((1, 2, 50, codec.words + 1), mx.uint32)
    assert tq.plan(mx.zeros((1, 8, 1, 256), mx.bfloat16), rows, codec, codec, None, None) is None  # default failed


def test_rules_outside_the_register_budget_are_refused(monkeypatch):
    monkeypatch.setitem(tq.LAUNCH_SHAPES, "cuda", ((512, 8, 1, None, 8, 64, 512),))
    with pytest.raises(ValueError, match="HPS must divide G"):
        tq.geometries("cuda", 512, 8, 1)
    with pytest.raises(ValueError, match="HPS must divide G"):
        tq.attend(None, mx.zeros((1, 6, 1, 256)), mx.zeros((1, 1, 5, 33), mx.uint32), None, TurboQuantCodec(256, 4, 0),
                  TurboQuantCodec(256, 4, 0), geometry=Geometry(4, 64, 512))


def fake_sweep(times: dict) -> list:
    """Sweep results as sweep_row writes them, with µs from `times` {(layer, keys, geometry): µs}."""
    results = []
    for (layer, keys, geometry), us in times.items():
        dim, heads, kv_heads, _ = sweep.LAYOUTS[layer]
        splits, chunks = tq.launch_grid(Geometry(*geometry), heads // kv_heads, kv_heads, keys)
        results.append(dict(layer=layer, dim=dim, group=heads // kv_heads, kv_rows=kv_heads, keys=keys,
                            geometry=list(geometry), splits=splits, chunks=chunks,
                            keys_per_threadgroup=-(-keys // chunks), us=us, max_error=1e-3,
                            error_ok=us != 1.0, timed_as=list(geometry)))
    return results


def test_sweep_tables_and_rules_from_fake_timings(tmp_path, monkeypatch):
    """E2B global: HPS 2 wins at 8K and 32K, the default at 128K; 31B global: a 2 % win (noise, kept
    default) and a faster geometry with a wrong output; E2B sliding: MIN_CHUNK 16 wins. The rules they
    give pick each row's choice from `geometries` at the measured key counts."""
    e2b = big = tuple(tq.default_geometry(512, 8))  # both global layouts have G = 8
    sliding = tuple(tq.default_geometry(256, 8))
    times = {
        ("E2B global", 8192, e2b): 60.0, ("E2B global", 8192, (2, 64, 512)): 50.0,
        ("E2B global", 32768, e2b): 160.0, ("E2B global", 32768, (2, 64, 512)): 140.0,
        ("E2B global", 131072, e2b): 300.0, ("E2B global", 131072, (2, 64, 512)): 310.0,
        ("31B global", 32768, big): 270.0, ("31B global", 32768, (2, 64, 512)): 265.0,
        ("31B global", 32768, (4, 16, 1024)): 1.0,  # error_ok False: never chosen
        ("E2B sliding", 512, sliding): 42.0, ("E2B sliding", 512, (4, 16, 512)): 30.0,
    }
    result = dict(device="fake", backend="cuda", mlx=mx.__version__, command="python -m benchmarks.tq_launch_sweep",
                  seconds=1.0, sweep=fake_sweep(times))
    sweep.write(tmp_path, result)
    saved = json.loads((tmp_path / "tq_launch_sweep.json").read_text())
    chosen = {(b["layer"], b["keys"]): tuple(b["chosen"]) for b in saved["best"]}
    assert chosen == {("E2B global", 8192): (2, 64, 512), ("E2B global", 32768): (2, 64, 512),
                      ("E2B global", 131072): e2b, ("31B global", 32768): big, ("E2B sliding", 512): (4, 16, 512)}
    assert [tuple(rule) for rule in saved["rules"]] == [(512, 8, 1, round((32768 * 131072) ** 0.5), 2, 64, 512),
                                                        (256, 8, 1, None, 4, 16, 512)]
    table = (tmp_path / "tq_launch_sweep.md").read_text()
    assert "(512, 8, 1, 65536, 2, 64, 512)," in table and "(256, 8, 1, None, 4, 16, 512)," in table
    assert "| 4/16/1024 | " in table and " ✗ |" in table and "| 2/64/512 | 512 x 1 | 64 | 140.0 | 1.14x |" in table
    monkeypatch.setitem(tq.LAUNCH_SHAPES, "cuda", tuple(tuple(rule) for rule in saved["rules"]))
    for (layer, keys), geometry in chosen.items():
        dim, heads, kv_heads, _ = sweep.LAYOUTS[layer]
        picked = next(g for most, g in tq.geometries("cuda", dim, heads // kv_heads, kv_heads) if keys <= most)
        assert tuple(picked) == geometry, (layer, keys)


@emulated
def test_sweep_row_checks_and_times_each_launch_once(monkeypatch):
    """sweep_row on the emulator (a 100-key E2B sliding layer), timings faked: candidates that launch the
    same grid share one timing, and every launch matches the reference."""
    monkeypatch.setitem(sweep.LAYOUTS, "E2B sliding", (256, 8, 1, 100))
    monkeypatch.setattr(sweep, "launcher", lambda on: metal_emu.run)
    monkeypatch.setattr(sweep, "CALLS", 2)
    timings = iter(range(1, 100))
    monkeypatch.setattr(sweep, "seconds_per_call", lambda *args: next(timings) * 1e-6)
    geometries = sweep.candidates(256, 8, [2, 4], [16, 64, 128], [512, 1024])
    results = sweep.sweep_row("E2B sliding", 100, geometries)
    assert [r["geometry"] for r in results] == [list(g) for g in geometries]
    launches = {(r["geometry"][0], r["chunks"]) for r in results}
    assert launches == {(h, c) for h in (2, 4) for c in (7, 2, 1)}
    assert sorted(r["us"] for r in results if r["timed_as"] == r["geometry"]) == list(range(1, 7))  # default: min(1, 7)
    assert all(r["error_ok"] for r in results)
