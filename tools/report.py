"""The demo's HTML report and its figures: per-timestep scales with the bucket boundaries, estimated error per
bucket count, latency, sample grids and quality numbers. Pure rendering: every number comes from the JSON the
pipeline wrote; images are PNG files beside the HTML."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from dilatequant.core.plots import require_matplotlib, save_figure

SCALE_CURVES = 6  # input groups drawn: those whose step varies most over the timesteps


def scale_plot(steps: np.ndarray, groups: list[str], timesteps: list[int], boundaries: list[float], path: Path) -> Path:
    """Per-timestep activation step of the most time-varying input groups (each relative to its median),
    with the bucket boundaries the export chose."""
    plt = require_matplotlib()
    order = np.argsort(timesteps)
    relative = steps[:, order] / np.median(steps, axis=1, keepdims=True)
    chosen = np.argsort(relative.max(1) / relative.min(1))[-SCALE_CURVES:]
    figure, axis = plt.subplots(figsize=(7.5, 3.4))
    for index in chosen:
        axis.plot(np.array(timesteps)[order], relative[index], drawstyle="steps-mid", label=groups[index], linewidth=1.2)
    for boundary in boundaries:
        axis.axvline(boundary, color="black", linestyle="--", linewidth=0.8)
    axis.set_xlabel("timestep t (dashed: bucket boundaries)")
    axis.set_ylabel("activation step / its median")
    axis.invert_xaxis()
    axis.legend(fontsize=6, loc="best")
    return save_figure(figure, path)


def selection_plot(selection: dict, path: Path) -> Path:
    """Calibration samples per timestep (calibration.json statistics.data_selection); for TDAC also its
    normalised density and diversity scores."""
    plt = require_matplotlib()
    timesteps = np.array(selection["timesteps"])
    width = 0.8 * float(np.min(np.abs(np.diff(timesteps)))) if len(timesteps) > 1 else 1.0
    figure, axis = plt.subplots(figsize=(7.5, 3.2))
    axis.bar(timesteps, selection["counts"], width=width, color="#4c72b0", label="samples")
    axis.set_xlabel("timestep t")
    axis.set_ylabel(f"calibration samples ({selection['mode']})")
    axis.invert_xaxis()
    if "density" in selection:
        scores = axis.twinx()
        scores.plot(timesteps, selection["density"], color="#dd8452", label="density D_t")
        scores.plot(timesteps, selection["diversity"], color="#55a868", label="diversity V_t")
        scores.set_ylabel("normalised score")
        scores.legend(fontsize=7, loc="upper left")
    return save_figure(figure, path)


def error_plot(error_by_k: dict[str, float], chosen: int, path: Path) -> Path:
    """Estimated quantization error of the best K-bucket partition, relative to per-timestep scales."""
    plt = require_matplotlib()
    ks = sorted(int(k) for k in error_by_k)
    figure, axis = plt.subplots(figsize=(5, 3))
    axis.plot(ks, [error_by_k[str(k)] for k in ks], marker="o", markersize=3)
    axis.plot([chosen], [error_by_k[str(chosen)]], marker="o", color="red", label=f"K = {chosen} (exported)")
    axis.set_xscale("log")
    axis.set_xlabel("buckets K")
    axis.set_ylabel("estimated error / per-timestep")
    axis.legend(fontsize=8)
    return save_figure(figure, path)


def table(rows: list[list], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def latency_rows(profile: dict) -> list[list]:
    ratios = {(c["engines"], b): r for c in profile["comparisons"] for b, r in c["ratio_p50"].items()}
    rows = []
    for name, entry in profile["engines"].items():
        for batch, row in entry["batches"].items():
            ratio = ratios.get((name, batch))
            rows.append([name, f"{entry['profile']}/{entry['precision']}", entry["n_buckets"], batch, f"{row['p50_ms']:.1f}",
                         f"{row['p95_ms']:.1f}", f"{row['sampling_seconds_per_image']:.3f}", f"{ratio:.2f}x" if ratio else "—",
                         f"{entry['memory']['peak_rss_mb']:.0f}"])  # fmt: skip
    return rows


def fidelity_section(fidelity: dict) -> str:
    """The build's check of the INT8 engines against their graphs (engines/fidelity.py)."""
    rows = [[b["bucket"], b["samples"], f"{b['end_to_end_rel_error']:.2%}", html.escape(b["worst_layers"][0]["layer"]),
             b["worst_layers"][0]["kernel"], f"{b['worst_layers'][0]['rel_error']:.1e}"] for b in fidelity["buckets"]]  # fmt: skip
    verdict = "passed" if fidelity["passed"] else "FAILED: " + html.escape("; ".join(fidelity["failures"]))
    return f"""<h2>Engines vs their graphs</h2><p>The build's fidelity check {verdict}. Reference: {html.escape(fidelity['reference'])};
integer kernels <code>{fidelity['integer_kernels']}</code> on {html.escape(fidelity['device'])}. Each quantized layer is run
alone (bound {fidelity['layer_bound']:.0e}); end to end, single code flips compound (bound {fidelity['end_to_end_bound']:.0%}).</p>
{table(rows, ["bucket", "inputs", "end to end", "worst layer", "its kernel", "its error"])}"""


def render(report: dict) -> str:
    """The HTML page for a demo run's `report` record (see tools/demo.py)."""
    quality, profile = report["quality"], report["profile"]
    engines = next(iter(profile["engines"].values()))  # the INT8 engines: where and with what the latency was measured
    targets = table([[t["target"], t["measured"], "met" if t["met"] else f"MISSED{': ' + t['why'] if t.get('why') else ''}"]
                     for t in report["targets"]],
                    ["target", "measured", ""])  # fmt: skip
    latency = table(latency_rows(profile), ["engines", "graphs", "buckets", "batch", "p50 ms", "p95 ms", "sampling s/image",
                                            "p50 vs FP32", "peak RSS MiB"])  # fmt: skip
    quality_rows = [[name, q["n"], f"{q['fid_digits']:.2f}", f"{q['class_accuracy']:.3f}", q.get("psnr_vs_fp", "—")]
                    for name, q in quality.items()]  # fmt: skip
    stages = table([[name, f"{seconds:.1f}"] for name, seconds in report["stage_seconds"].items()], ["stage", "seconds"])
    settings = html.escape(report["settings"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dilatequant demo: {html.escape(report['model'])}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:14px;text-align:right}}th{{background:#f3f3f3}}img{{max-width:100%}}
code{{background:#f3f3f3;padding:1px 4px}}</style></head><body>
<h1>dilatequant demo: {html.escape(report['model'])} W8A8, {report['n_buckets']} timestep buckets</h1>
<p>Calibrated per timestep, exported to {report['n_buckets']} ONNX graphs with explicit Q/DQ (one per timestep bucket,
profile <code>ort-cpu</code>), built into ONNX Runtime engines and compared with the FP32 model's engine on
<b>{html.escape(engines['device'])}</b> with {html.escape(engines['backend'])} {html.escape(engines['backend_version'])}, side by side in
one process.</p>
<h2>Targets</h2>{targets}
<h2>Per-timestep activation scales and the buckets</h2>
<img src="{report['figures']['scales']}" alt="per-timestep activation scales with bucket boundaries">
<p>Estimated quantization error of the best partition into K buckets (1.0 = a scale per timestep):</p>
<img src="{report['figures']['error_by_k']}" alt="estimated error per K">
{fidelity_section(report["fidelity"])}
<h2>Latency</h2>{latency}<img src="{report['figures']['latency']}" alt="latency chart">
<p>p50/p95 over {profile['settings']['runs']} timed calls per bucket after {profile['settings']['warmup']} warm-ups,
rotating the order of engine sets each round; sampling time covers the full {profile['settings']['sampling_steps']}-step
loop with the scheduler; peak RSS is measured in a fresh process (Python and torch included).</p>
<h2>Samples (same initial noise)</h2>
<p>FP32 engine:</p><img src="{report['figures']['grid_fp32']}" alt="FP32 samples">
<p>INT8 engines:</p><img src="{report['figures']['grid_int8']}" alt="INT8 samples">
<h2>Quality</h2>{table(quality_rows, ["engines", "n", "fid_digits", "class_accuracy", "psnr vs FP32 (dB)"])}
<p>{html.escape(report['quality_note'])}</p>
<h2>Rank them by eye: K-Sort Arena</h2>
<p>Metrics say how far INT8 drifts; your eyes decide. Serve these variants side by side, anonymously, on images from
identical noise, vote best-of-4 or a full ranking, and read the Bayesian leaderboard:</p>
<p><code>{html.escape(report['arena']['command'])}</code></p>
<p>then open <a href="{report['arena']['url']}">{report['arena']['url']}</a> (leaderboard at
<a href="{report['arena']['url']}leaderboard">{report['arena']['url']}leaderboard</a>).</p>
<h2>How this was made</h2>{stages}<p>Settings: <code>{settings}</code></p>
<p>Versions: <code>{html.escape(str(report['versions']))}</code></p>
</body></html>
"""
