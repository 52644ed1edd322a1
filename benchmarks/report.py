"""Benchmark results -> JSON, a Markdown table and a PNG plot (tok/s vs depth, ours vs mlx-lm).

    python -m benchmarks.report benchmarks/results/NAME.json    # redraw NAME.md and NAME.png

The plot needs matplotlib (`pip install -e ".[bench]"`); without it only JSON and Markdown are written.
"""

import json
import os
import sys
from pathlib import Path

RUNTIMES = ("ours", "mlx-lm")


def write(results: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    _replace(stem.with_suffix(".json"), lambda p: p.write_text(json.dumps(results, indent=1) + "\n"))
    _replace(stem.with_suffix(".md"), lambda p: p.write_text(markdown(results)))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    _replace(stem.with_suffix(".png"), lambda p: plot(results, p))


def _replace(path: Path, write_to) -> None:
    """Write through a temporary file, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    write_to(tmp)
    os.replace(tmp, path)


def row_line(row: dict) -> str:
    line = f"{row['test']}: ours {row['ours']:.1f}, mlx-lm {row['mlx-lm']:.1f} tok/s, ratio {row['ratio']:.2f}"
    if "roofline_tps" in row:
        line += f", roofline {row['roofline_tps']:.0f} (ours {row['roofline_pct']['ours']:.0f} %)"
    return line


def markdown(results: dict) -> str:
    s, d, v = results["settings"], results["device"], results["versions"]
    quant = f"{s['bits']}-bit (group {s['group_size']}, {s['dtype']} scales)" if s["bits"] else s["dtype"]
    reduced = "".join(f", {k} cut to {s[k]}" for k in ("layers", "vocab") if s.get(k))
    lines = [
        f"# mlx-gemma4 vs mlx-lm: {d['name']}, {quant}",
        "",
        f"{results['date']} · {d['backend']} · mlx {v['mlx']} · mlx-lm {v['mlx-lm']} · commit {results['commit']}  ",
        f"Random weights, the same arrays in both runtimes{reduced}. Measured bandwidth "
        f"{d['bandwidth_gbps']['read']:.0f} GB/s read, {d['bandwidth_gbps']['copy']:.0f} GB/s copy (read + write); "
        f"the roofline uses {d['bandwidth_used_gbps']:.0f}.  ",
        f"Median of {s['repeats']} runs (± is half the min-max range); prefill in chunks of {s['prefill_step']} "
        f"for both; greedy, no tokenizer.  ",
        f"`{results['command']}`",
        *(f"\n{note}" for note in results.get("notes", [])),
        "",
        "## llama-bench rows (tok/s)",
        "",
        "| model | test | ours | mlx-lm | ours / mlx-lm | roofline | ours % of roofline | mlx-lm % of roofline |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model in results["models"]:
        for row in model["rows"]:
            cells = [model["model"], row["test"], _rate(row, "ours"), _rate(row, "mlx-lm"), f"{row['ratio']:.2f}"]
            if "roofline_tps" in row:
                cells += [f"{row['roofline_tps']:.0f}"] + [f"{row['roofline_pct'][r]:.0f} %" for r in RUNTIMES]
            else:
                cells += ["", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## mlx_lm.benchmark form (prompt {s['prompt_tokens']}, generation {s['gen_tokens']})",
        "",
        "| model | runtime | prompt tok/s | generation tok/s | peak memory GB | weights GB | read per token GB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for model in results["models"]:
        first = next((run for run in model["runs"] if run["prompt_tokens"] == s["prompt_tokens"]), None)
        for runtime in RUNTIMES if first else ():
            stats = first[runtime]
            lines.append(
                f"| {model['model']} | {runtime} | {stats['prompt_tps']['median']:.1f} | "
                f"{stats['generation_tps']['median']:.1f} | {stats['peak_memory_gb']['median']:.2f} | "
                f"{model['weights_gb']:.2f} | {model['weights_read_per_token_gb']:.2f} |"
            )
    lines += [
        "",
        "Peak memory is each runtime's own weights plus what its run allocated on top (both models stay "
        "resident, sharing arrays).",
        "",
        "## Logits check (ours vs mlx-lm, prompt + one decode step)",
        "",
        "| model | tokens | max abs diff | relative L2 | argmax agree |",
        "|---|---:|---:|---:|---:|",
    ]
    for model in results["models"]:
        c = model["logits_check"]
        lines.append(
            f"| {model['model']} | {c['tokens']} | {c['max_abs_diff']:.2g} | {c['rel_l2']:.2g} | {c['argmax_agree']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _rate(row: dict, runtime: str) -> str:
    return f"{row[runtime]:.1f} ± {row[f'{runtime}_spread_pct'] / 2:.1f} %"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = [m for m in results["models"] if any("roofline_tps" in r for r in m["rows"])]
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(4.2 * max(len(models), 1), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in model["rows"] if "roofline_tps" in r]
        depths = [r["depth"] for r in rows]
        for runtime, style in (("ours", "o-"), ("mlx-lm", "s-")):
            ax.plot(depths, [r[runtime] for r in rows], style, label=runtime)
        ax.plot(depths, [r["roofline_tps"] for r in rows], "k:", label="roofline")
        ax.set_xticks(depths)
        ax.set_title(model["model"])
        ax.set_xlabel("context depth (tokens)")
        ax.set_ylabel(f"decode tok/s (tg{results['settings']['gen_tokens']})")
        ax.set_yscale("log")  # the roofline can sit far above both runtimes
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['device']['name']}, {results['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def main(argv=None) -> None:
    path = Path((sys.argv[1:] if argv is None else argv)[0])
    write(json.loads(path.read_text()), path.with_suffix(""))


if __name__ == "__main__":
    main()
