"""One Linear layer on ONNX Runtime CPU: FP32 MatMul vs group-wise 4-bit MatMulNBits (float input, and int8 input
blocks with `accuracy_level=4`), timed interleaved (medians of rounds), with each output's error against the
fake-quantized layer it deploys.

    python -m dilatequant.tools.layer_bench [--tokens 2048] [--width 256] [--out-features 1024] [--group-size 64]

The defaults are one fc1 of `digits-dit` at batch 8 (256 tokens per image).
"""

from __future__ import annotations

import json
import statistics
import time

import click
import numpy as np
import torch


def session(nodes, tensors, width: int, out_features: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", out_features])], tensors)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@click.command()
@click.option("--tokens", default=2048, show_default=True)
@click.option("--width", default=256, show_default=True)
@click.option("--out-features", default=1024, show_default=True)
@click.option("--group-size", default=64, show_default=True)
@click.option("--threads", default=0, show_default=True, help="Intra-op threads (0: ONNX Runtime's choice).")
@click.option("--rounds", default=30, show_default=True)
def main(tokens: int, width: int, out_features: int, group_size: int, threads: int, rounds: int) -> None:
    from onnx import helper, numpy_helper

    from dilatequant.calibrate.groupwise import DynamicActQuantizer, GroupWeightQuantizer
    from dilatequant.export.matmul_nbits import matmul_nbits

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, width, generator=generator) / width**0.5
    x = torch.randn(tokens, width, generator=generator)
    quantizer = GroupWeightQuantizer(weight, 4, group_size)
    deployed = quantizer(weight).detach()
    fp32 = session([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(weight.T.contiguous().numpy(), "w")],
                   width, out_features, threads)  # fmt: skip
    sessions, expected = {"fp32 MatMul": fp32}, {"fp32 MatMul": x @ weight.T}
    for level, simulated in ((0, x), (4, DynamicActQuantizer(8, group_size, symmetric=True)(x))):
        node, tensors = matmul_nbits("fc", "x", "y", weight.numpy(), quantizer.step.detach().numpy(), quantizer.zero_point.numpy(),
                                     4, False, accuracy_level=level)  # fmt: skip
        name = f"MatMulNBits 4-bit, accuracy_level {level}"
        sessions[name], expected[name] = session([node], tensors, width, out_features, threads), simulated @ deployed.T
    feed = {"x": x.numpy()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):  # interleaved: every round times every session once
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feed)
            times[name].append(time.perf_counter() - start)
    report = {}
    for name, s in sessions.items():
        got, want = s.run(None, feed)[0], expected[name].numpy()
        report[name] = {"p50_ms": round(1e3 * statistics.median(times[name]), 3),
                        "max_error_vs_simulated": float(np.abs(got - want).max() / np.abs(want).max())}  # fmt: skip
    base = report["fp32 MatMul"]["p50_ms"]
    for row in report.values():
        row["vs_fp32"] = round(row["p50_ms"] / base, 3)
    click.echo(json.dumps({"tokens": tokens, "width": width, "out_features": out_features, "group_size": group_size,
                           "threads": threads, "rounds": rounds, "layers": report}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
