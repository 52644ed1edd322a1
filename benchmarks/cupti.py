"""The GPU's own time of each kernel a piece of MLX code runs, recorded by CUPTI through torch's profiler
(the lent machines have torch with CUDA but no Nsight Systems; CUPTI sees every kernel of the process,
MLX's CUDA graph nodes included). Wall clock on these hosts measures the host's launch cost at small
shapes; this measures the kernels."""

import json
import statistics
import tempfile
from collections import defaultdict


def traced(run) -> tuple:
    """(run()'s result, [(start ns, duration ns, kernel name)] sorted by start) of the kernels it ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        result = run()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    rows = [(int(e["ts"] * 1e3), int(e["dur"] * 1e3), e["name"]) for e in events if e.get("cat") == "kernel"]
    return result, sorted(rows)


def median_us(rows: list, short_name=lambda name: name.split("(")[0]) -> dict:
    """{kernel: median µs} over the rows of `traced`, kernels told apart by `short_name`."""
    durations = defaultdict(list)
    for _, duration, name in rows:
        durations[short_name(name)].append(duration / 1e3)
    return {name: statistics.median(values) for name, values in durations.items()}
