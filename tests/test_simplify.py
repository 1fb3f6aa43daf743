"""Graph simplification and compaction: fewer nodes and bytes, same outputs at any batch size."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

from dilatequant.core.denoiser import load_model
from dilatequant.export.compact import compact, share_equal_constants, short_id
from dilatequant.export.graph import export_fp_graph
from dilatequant.export.simplify import simplify

ort = pytest.importorskip("onnxruntime")


def run(model, batch: int, denoiser) -> np.ndarray:
    generator = torch.Generator().manual_seed(batch)
    feeds = {"x": torch.randn(batch, *denoiser.sample_shape, generator=generator).numpy(),
             "t": np.linspace(0, 999, batch).astype(np.int64)}  # fmt: skip
    cond = denoiser.conditioning(torch.arange(batch))
    if cond is not None:
        feeds["cond"] = cond.numpy()
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def batch_shape_chains(model) -> int:
    """Reshapes whose target shape is computed at run time."""
    constants = {i.name for i in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type == "Reshape" and n.input[1] not in constants)


@pytest.mark.parametrize("family", ["unet", "unet-cond", "dit", "pixart"])
def test_simplify_folds_batch_shape_chains_and_keeps_outputs_at_every_batch_size(tiny_model_dirs, tmp_path, family):
    denoiser = load_model(tiny_model_dirs[family]).denoiser
    export_fp_graph(denoiser, tmp_path / "fp.onnx", opset=19)
    original = onnx.load(str(tmp_path / "fp.onnx"))
    simplified = gs.export_onnx(simplify(original))
    compact(graph := gs.import_onnx(onnx.ModelProto.FromString(simplified.SerializeToString())))  # compact renames the protos it reads
    compacted = gs.export_onnx(graph)
    assert len(simplified.graph.node) < len(original.graph.node)
    assert batch_shape_chains(simplified) < batch_shape_chains(original)
    for batch in (1, 3):  # the graph was traced at batch 2: the batch dimension must stay dynamic
        reference = run(original, batch, denoiser)
        for model in (simplified, compacted):
            np.testing.assert_allclose(run(model, batch, denoiser), reference, rtol=1e-5, atol=1e-5)
    assert len(compacted.SerializeToString()) < len(simplified.SerializeToString())


def test_short_ids_are_unique_and_short():
    ids = [short_id(i) for i in range(62**2)]
    assert len(set(ids)) == len(ids) and max(map(len, ids)) == 2 and ids[:3] == ["0", "1", "2"] and short_id(62) == "10"


def test_equal_constants_are_shared_but_per_bucket_scales_are_not():
    x = gs.Variable("x", dtype=np.float32, shape=[2])
    ones = [gs.Constant(f"ones{i}", np.ones(2, np.float32)) for i in range(2)]
    scales = [gs.Constant(f"s:{i}", np.array(0.5, np.float32)) for i in range(2)]
    nodes = [gs.Node("Mul", inputs=[x, c], outputs=[gs.Variable(f"y{i}", dtype=np.float32)]) for i, c in enumerate([*ones, *scales])]
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[n.outputs[0] for n in nodes])
    assert share_equal_constants(graph) == 1
    assert nodes[0].inputs[1] is nodes[1].inputs[1] and nodes[2].inputs[1] is not nodes[3].inputs[1]
