"""Where does a calibrated model's error come from? PSNR vs FP with subsets of the quantizers switched off.

    python -m dilatequant.tools.sensitivity --calib DIR [--n 20] [--steps 25] [--device cpu]

Every run samples the same initial noise as the FP reference, so the PSNRs are paired.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import click

from dilatequant.core.environment import resolve_device
from dilatequant.core.evaluate import labels_for
from dilatequant.core.metrics import psnr_vs_ref
from dilatequant.core.sampling import SamplerConfig, default_batch_size, sample


def subsets(boundary: set[str]) -> dict[str, tuple[Callable[[str], bool], Callable[[str], bool]]]:
    """case -> (activation quantizers kept on, weight quantizers kept on), as predicates on layer/group names."""
    on, off = (lambda n: True), (lambda n: False)
    not_boundary = lambda n: n not in boundary  # noqa: E731
    cases = {"all quantized": (on, on), "weights only": (off, on), "activations only": (on, off),
             "all but boundary layers": (not_boundary, not_boundary)}  # fmt: skip
    for layer in sorted(boundary):
        cases[f"all but {layer}"] = ((lambda n, b=layer: n != b), (lambda n, b=layer: n != b))
    return cases


@click.command()
@click.option("--calib", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--n", default=20, show_default=True)
@click.option("--steps", default=25, show_default=True)
@click.option("--device", default="auto", show_default=True)
def main(calib: str, n: int, steps: int, device: str) -> None:
    from dilatequant.calibrate.artifact import load_artifact
    from dilatequant.core.denoiser import load_model

    torch_device = resolve_device(device)
    artifact = load_artifact(calib, torch_device)
    quantized, fp = artifact.model.denoiser, load_model(artifact.record.source["spec"], torch_device)
    artifact.check_source(artifact.record.source["spec"])
    labels, sampler = labels_for(fp, n), SamplerConfig(steps=steps, batch_size=default_batch_size(torch_device))
    reference = sample(fp.denoiser, fp.scheduler_config, labels, sampler, torch_device, progress=False)
    results = {}
    boundary = {row.group for row in quantized.plan if row.boundary and row.weight_bits}
    groups = {row.layer: row.group for row in quantized.plan}
    for case, (act_on, weight_on) in subsets(boundary).items():
        for group, quantizer in quantized.act_quantizers().items():
            quantizer.enabled = act_on(group)
        for layer, wrapper in quantized.quant_layers().items():
            wrapper.weight_quantizer.enabled = weight_on(layer)
            wrapper.input_quantizer.enabled = act_on(groups[layer])  # dynamic inputs (Q-DiT) have no table above
        images = sample(quantized, fp.scheduler_config, labels, sampler, torch_device, progress=False)
        results[case] = round(psnr_vs_ref(images, reference), 2)
        click.echo(f"{case:40s} psnr_vs_fp {results[case]:6.2f} dB")
    click.echo(json.dumps({"calib": calib, "n": n, "steps": steps, "psnr_vs_fp": results}))


if __name__ == "__main__":
    main()
