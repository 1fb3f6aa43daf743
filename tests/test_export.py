"""export(): Q/DQ graphs per timestep bucket — structure, shared weights, integrity and equivalence with torch."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from dilatequant.calibrate.artifact import load_artifact
from dilatequant.calibrate.config import CalibConfig
from dilatequant.calibrate.flow import calibrate
from dilatequant.calibrate.quantizer import fake_quantize
from dilatequant.calibrate.rebucket import bucketed_model
from dilatequant.core.buckets import BucketTable
from dilatequant.core.errors import UserError
from dilatequant.core.manifest import ArtifactError
from dilatequant.export.config import ExportConfig
from dilatequant.export.flow import export
from dilatequant.export.lint import lint_tensorrt, ort_fusion

ort = pytest.importorskip("onnxruntime")
TINY = {"samples": 32, "trajectories": 8, "steps": 5}
QUANTIZED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@pytest.fixture(scope="module")
def calibrations(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("export-calib")
    return {family: calibrate(path, CalibConfig.from_bits("W8A8", method="minmax", **TINY), root / family, progress=False)
            for family, path in tiny_model_dirs.items()}  # fmt: skip


@pytest.fixture(scope="module")
def exports(calibrations, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return {(family, profile): export(path, ExportConfig(buckets=2, profile=profile, fp32=True), root / f"{family}-{profile}")
            for family, path in calibrations.items() for profile in ("tensorrt", "ort-cpu")}  # fmt: skip


@pytest.fixture(scope="module")
def fp16_exports(calibrations, tmp_path_factory):
    root = tmp_path_factory.mktemp("export-fp16")
    return {family: export(path, ExportConfig(buckets=2, profile="tensorrt"), root / family) for family, path in calibrations.items()}


def graphs(export_dir):
    manifest = json.loads((export_dir / "manifest.json").read_text())
    return manifest, [onnx.load(str(export_dir / f), load_external_data=False) for f in manifest["graphs"].values()]


def run_with_outputs(path, names, feeds):
    """Run a graph with extra intermediate outputs."""
    graph = onnx.load(str(path))
    graph.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def check_buckets_against_torch(out, calib, samples_per_bucket: int = 4, end_to_end_rtol: float = 0.1) -> None:
    """Every bucket graph: each Q/DQ pair computes the torch quantizer of that bucket on its own input, each
    pre-scale Mul multiplies by 1/s, and the output tracks the torch fake-quant model end to end."""
    artifact = load_artifact(calib)
    manifest = json.loads((out / "manifest.json").read_text())
    table = BucketTable.from_dict(manifest["buckets"])
    model = bucketed_model(artifact, table, quantized_outputs=frozenset(manifest["quantized_outputs"])).denoiser
    quantizers, data = model.act_quantizers(), artifact.calibration_data()
    suffix = "::0" if manifest["profile"] == "ort-cpu" else ""
    for k in range(len(table)):
        chosen = torch.tensor([table.bucket_of(float(t)) == k for t in data.t])
        x, t, labels = (v[chosen][:samples_per_bucket] for v in (data.x, data.t, data.labels))
        cond = model.conditioning(labels)
        feeds = {"x": x.numpy(), "t": t.numpy(), **({"cond": cond.numpy()} if cond is not None else {})}
        graph = onnx.load(str(out / f"bucket_{k}.onnx"), load_external_data=False)
        by_name = {n.name: n for n in graph.graph.node if n.name}
        consumer = {name: n for n in graph.graph.node for name in n.input}
        producer = {name: n for n in graph.graph.node for name in n.output}
        q_nodes = {g: by_name[f"{g}::Q" if g.endswith("::output") else f"{g}{suffix}::Q"] for g in quantizers}  # outputs: one pair
        q_inputs = {g: q.input[0] for g, q in q_nodes.items()}
        dq_outputs = {g: consumer[q.output[0]].output[0] for g, q in q_nodes.items()}
        mul_inputs = {g: producer[x].input[0] for g, x in q_inputs.items() if x in producer and producer[x].op_type == "Mul"
                      and producer[x].input[1] not in producer}  # a Mul by a constant right before the Q: the pre-scale
        values = run_with_outputs(out / f"bucket_{k}.onnx", [*q_inputs.values(), *mul_inputs.values(), *dq_outputs.values()], feeds)
        assert set(mul_inputs) == {g for g, q in quantizers.items() if q.prescale and (q.dilation != 1).any()} and mul_inputs
        for group, source in mul_inputs.items():
            inverse = quantizers[group].dilation.reciprocal().numpy()
            shape = [1, -1, 1, 1] if values[source].ndim == 4 else [-1]
            np.testing.assert_allclose(values[q_inputs[group]], values[source] * inverse.reshape(shape), rtol=1e-6, atol=1e-7)
        for group, quantizer in quantizers.items():
            source = torch.from_numpy(values[q_inputs[group]])
            expected = fake_quantize(source, quantizer.step[k].detach(), quantizer.zero_point[k], quantizer.fmt).numpy()
            np.testing.assert_allclose(values[dq_outputs[group]], expected, rtol=0, atol=2.6e-4 * float(quantizer.step[k]))
        with torch.no_grad():
            reference = model(x, t, cond).numpy()
        assert np.linalg.norm(values["eps"] - reference) / np.linalg.norm(reference) < end_to_end_rtol


@pytest.mark.parametrize("family", ["unet", "unet-cond", "dit", "pixart"])
@pytest.mark.parametrize("profile", ["tensorrt", "ort-cpu"])
def test_every_bucket_quantizes_exactly_like_torch_and_tracks_it_end_to_end(exports, calibrations, family, profile):
    # random tiny weights amplify the few rounding flips more than a trained model does (digits: 2%)
    check_buckets_against_torch(exports[family, profile], calibrations[family])


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["tensorrt", "ort-cpu"])
def test_digits_exports_in_both_profiles(tmp_path, profile):
    calib = calibrate("digits", CalibConfig.from_bits("W8A8", method="minmax", samples=64, trajectories=8, steps=10),
                      tmp_path / "calib", progress=False)  # fmt: skip
    out = export(calib, ExportConfig(buckets=4, profile=profile, fp32=True), tmp_path / "export")
    check_buckets_against_torch(out, calib, samples_per_bucket=2, end_to_end_rtol=0.02)
    if profile == "tensorrt":
        assert all(lint_tensorrt(onnx.load(str(out / f"bucket_{k}.onnx"))) == [] for k in range(4))
        half = export(calib, ExportConfig(buckets=4, profile=profile), tmp_path / "export-fp16")  # the default: FP16
        assert all(lint_tensorrt(onnx.load(str(half / f"bucket_{k}.onnx"))) == [] for k in range(4))
        data = load_artifact(calib).calibration_data()
        feeds = {"x": data.x[:4].numpy(), "t": data.t[:4].numpy(), "cond": data.labels[:4].numpy()}
        reference = run_bucket(out / "bucket_0.onnx", feeds)
        assert np.linalg.norm(run_bucket(half / "bucket_0.onnx", feeds, np.float16) - reference) / np.linalg.norm(reference) < 0.03
    else:
        report = ort_fusion(out / "bucket_0.onnx")
        assert report["fused_share"] >= 0.95 and report["left_in_float"] == ["conv_out"]  # the prediction stays float
    # disk: 8 bucket graphs (all the same size but for a few scale bytes) beside the shared weights <= 1.1x one graph
    weights, graph_bytes = (out / "weights.bin").stat().st_size, [(out / f"bucket_{k}.onnx").stat().st_size for k in range(4)]
    assert weights + 8 * max(graph_bytes) <= 1.1 * (weights + min(graph_bytes))


def test_tensorrt_profile_structure(exports):
    manifest, models = graphs(exports["unet-cond", "tensorrt"])
    model = models[0]
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            zero_point = initializers[node.input[2]]
            assert zero_point.data_type == onnx.TensorProto.INT8 and not numpy_helper.to_array(zero_point).any()
            (dq,) = consumers[node.output[0]]  # Q feeds exactly one DequantizeLinear
            assert dq.op_type == "DequantizeLinear"
            assert {c.op_type for c in consumers[dq.output[0]]} <= QUANTIZED_OPS  # Q/DQ only on their inputs
    output_producers = [n for n in model.graph.node if set(n.output) & {o.name for o in model.graph.output}]
    assert all(n.op_type != "DequantizeLinear" for n in output_producers)  # no Q/DQ on outputs
    qkv = [consumers[n.output[0]][0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.name.endswith(".attn1.qkv::Q")]
    assert qkv and all(len(consumers[n.output[0]]) == 3 for n in qkv)  # one shared Q/DQ for Q, K and V


def test_weights_are_int8_with_per_output_channel_scales(exports):
    _, (model, *_) = graphs(exports["unet", "tensorrt"])
    initializers = {i.name: i for i in model.graph.initializer}
    weight_dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers]
    assert weight_dqs
    for node in weight_dqs:
        assert not numpy_helper.to_array(initializers[node.input[2]]).any()
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        weight, scale = initializers[node.input[0]], initializers[node.input[1]]
        assert weight.data_type == onnx.TensorProto.INT8 and len(scale.dims) == 1 and weight.dims[axis] == scale.dims[0]


def test_buckets_share_one_weights_file_and_differ_only_in_activation_scales(exports):
    manifest, (first, second) = graphs(exports["unet", "tensorrt"])
    assert manifest["weights_file"] == "weights.bin" and manifest["n_buckets"] == 2
    external = {e.value for m in (first, second) for i in m.graph.initializer for e in i.external_data if e.key == "location"}
    assert external == {"weights.bin"}
    assert [n.SerializeToString() for n in first.graph.node] == [n.SerializeToString() for n in second.graph.node]
    differing = {a.name for a, b in zip(first.graph.initializer, second.graph.initializer) if a.SerializeToString() != b.SerializeToString()}
    assert differing and all(name.startswith(("s:", "z:")) for name in differing)
    props = [{p.key: p.value for p in m.metadata_props} for m in (first, second)]
    assert [p["dilatequant.bucket"] for p in props] == ["0", "1"] and props[0]["dilatequant.profile"] == "tensorrt"
    assert props[0]["dilatequant.timestep_range"].startswith("0-") and props[1]["dilatequant.timestep_range"].endswith("-999")


def toy_model(tensors: dict[str, np.ndarray]):
    """A graph that adds its initializers to its input (each is a [4] float32 or bigger tensor)."""
    from onnx import helper

    nodes, previous = [], "x"
    for index, name in enumerate(tensors):
        nodes.append(helper.make_node("Add", [previous, name], [f"y{index}"]))
        previous = f"y{index}"
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info(previous, onnx.TensorProto.FLOAT, [4])],
                              [numpy_helper.from_array(v, k) for k, v in tensors.items()])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("source", ["in memory", "external, a file per tensor (the exporter over 2 GB)"])
def test_weights_are_written_tensor_by_tensor_as_onnx_would_write_them(tmp_path, source):
    """save_with_shared_weights streams every initializer into weights.bin: from the proto, or copied file to file
    from the exporter's external data without reading it into the proto; the graph reads back as onnx's own
    external-data save writes it (same tensors, same values), scales and tiny tensors embedded."""
    from onnx.external_data_helper import uses_external_data

    from dilatequant.export.flow import save_with_shared_weights

    tensors = {"w0": np.arange(4, dtype=np.float32), "s:0": np.full(4, 0.5, np.float32), "tiny": np.ones(4, np.float32)}
    model, source_dir = toy_model(tensors), None
    model.graph.initializer.append(numpy_helper.from_array(np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32), "big"))
    expected = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    if source.startswith("external"):
        source_dir = tmp_path / "exporter"
        source_dir.mkdir()
        onnx.save_model(model, str(source_dir / "fp.onnx"), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
        model = onnx.load(str(source_dir / "fp.onnx"), load_external_data=False)
        assert all(uses_external_data(i) for i in model.graph.initializer)
    (tmp_path / "out").mkdir()
    save_with_shared_weights(model, tmp_path / "out" / "bucket_0.onnx", source_dir)
    written = onnx.load(str(tmp_path / "out" / "bucket_0.onnx"), load_external_data=False)
    external = {i.name for i in written.graph.initializer if uses_external_data(i)}
    assert external == {"big"}
    reread = onnx.load(str(tmp_path / "out" / "bucket_0.onnx"))
    assert {i.name: numpy_helper.to_array(i).tolist() for i in reread.graph.initializer} == {k: v.tolist() for k, v in expected.items()}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bucket_0.onnx", "weights.bin"]


def test_weight_quantization_reads_external_weights_without_keeping_them(tmp_path):
    """quantize_weights reads each FP weight from the exporter's file and keeps only the integers: onnx-graphsurgeon's
    `.values` would cache every FP weight in its (disconnected) constant, at SD-1.5 size 3.2 GiB."""
    import onnx_graphsurgeon as gs
    from onnx import helper

    from dilatequant.export.graph import attach_external
    from dilatequant.export.qdq import quantize_weights, symmetric_integers

    weight = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    model = helper.make_model(helper.make_graph([conv], "toy", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                                                [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                                                [numpy_helper.from_array(weight, "w")]), opset_imports=[helper.make_opsetid("", 19)])  # fmt: skip
    onnx.save_model(model, str(tmp_path / "fp.onnx"), save_as_external_data=True, location="fp.weights", size_threshold=0)
    graph = gs.import_onnx(onnx.load(str(tmp_path / "fp.onnx"), load_external_data=False))
    assert attach_external(graph, tmp_path) == 1
    node = graph.nodes[0]
    fp_weight, step = node.inputs[1], np.abs(weight).reshape(8, -1).max(1) / 127
    lazy = fp_weight._values
    assert quantize_weights(graph, {"conv": node}, {"conv": step}, {"conv": 8}) == 1
    assert fp_weight._values is lazy  # read, not kept
    dequantize = node.inputs[1].inputs[0]
    assert np.array_equal(dequantize.inputs[0].values, symmetric_integers(weight, step.reshape(-1, 1, 1, 1).astype(np.float32), 8))


def test_ort_profile_gives_each_consumer_its_own_pair(exports):
    _, (model, *_) = graphs(exports["unet", "ort-cpu"])
    quantize_inputs = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            quantize_inputs.setdefault(node.input[0], []).append(node)
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    assert all(len(consumers[q.output[0]]) == 1 for qs in quantize_inputs.values() for q in qs)
    assert any(len(qs) == 3 for qs in quantize_inputs.values())  # Q, K and V: three pairs on one input


def test_four_bit_activations_are_refused(tiny_model_dirs, tmp_path):
    path = calibrate(tiny_model_dirs["dit"], CalibConfig.from_bits("W4A4", method="minmax", **TINY), tmp_path / "a", progress=False)
    with pytest.raises(UserError, match="take 8-bit activations"):
        export(path, ExportConfig(fp32=True), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_requests_are_refused_before_any_work(calibrations, tmp_path):
    with pytest.raises(UserError, match="--buckets 9 is outside 1..5"):
        export(calibrations["dit"], ExportConfig(buckets=9, fp32=True), tmp_path / "out")
    assert ExportConfig(profile="ort-cpu").precision == "fp32" and ExportConfig().precision == "fp16"  # FP16: tensorrt only
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        export(tmp_path, ExportConfig(fp32=True), tmp_path / "out2")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_cli_export_and_inspect(calibrations, tmp_path):
    from click.testing import CliRunner

    from dilatequant.tools.cli import cli

    out = tmp_path / "ex"
    run = CliRunner().invoke(cli, ["export", "--calib", str(calibrations["unet"]), "--buckets", "auto", "--profile", "ort-cpu",
                                   "--fp32", "--out", str(out)], catch_exceptions=False)  # fmt: skip
    assert run.exit_code == 0, run.output
    summary = json.loads(CliRunner().invoke(cli, ["inspect", str(out), "--json"]).stdout)
    assert summary["profile"] == "ort-cpu" and summary["checksums_verified"] and summary["weights_file"] == "weights.bin"
    assert len(summary["ranges"]) == summary["n_buckets"] >= 1 and summary["total_bytes"] > 0
    refused = CliRunner().invoke(cli, ["export", "--calib", str(calibrations["unet"]), "--buckets", "two", "--fp32", "--out", str(out)])
    assert refused.exit_code == 1 and "positive count or 'auto'" in refused.output


def test_a_layer_that_does_not_map_to_one_node_is_a_clear_error():
    from dilatequant.export.graph import compute_node_names, onnx_scope

    assert onnx_scope("down_blocks.0.attentions.0.to_out.0") == "/denoiser/model/down_blocks.0/attentions.0/to_out.0/"
    nodes = [("/denoiser/model/up/conv/Conv", "Conv"), ("/denoiser/model/up/conv/Conv_1", "Conv")]
    with pytest.raises(UserError, match="'up.conv' did not export as exactly one .* not supported by export"):
        compute_node_names(nodes, ["up.conv"])
    with pytest.raises(UserError, match="found none"):
        compute_node_names(nodes, ["down.conv"])


def run_bucket(path, feeds, dtype=np.float32):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.astype(dtype) if v.dtype == np.float32 else v for k, v in feeds.items()})[0]


@pytest.mark.parametrize("family", ["unet", "unet-cond", "dit"])
def test_tensorrt_fp16_graphs_keep_the_timestep_embedding_in_fp32_and_track_their_fp32_variant(exports, fp16_exports, calibrations,
                                                                                               family):  # fmt: skip
    manifest, (model, *_) = graphs(fp16_exports[family])
    assert manifest["precision"] == "fp16" and lint_tensorrt(onnx.load(str(fp16_exports[family] / "bucket_0.onnx"))) == []
    float_types = {i.data_type for i in model.graph.initializer} & {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    scales = [i for i in model.graph.initializer if i.name.startswith("s:")]
    assert float_types == {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16} and all(s.data_type == onnx.TensorProto.FLOAT16 for s in scales)
    producer = {name: n for n in model.graph.node for name in n.output}
    for sin in (n for n in model.graph.node if n.op_type in ("Sin", "Cos")):  # nothing on the way from t rounds to FP16
        pending = [sin.input[0]]
        while pending:
            node = producer.get(pending.pop())
            assert node is None or not (node.op_type == "Cast" and node.attribute[0].i == onnx.TensorProto.FLOAT16)
            pending.extend(node.input if node is not None else [])
    data = load_artifact(calibrations[family]).calibration_data()
    feeds = {"x": data.x[:4].numpy(), "t": data.t[:4].numpy()}
    cond = load_artifact(calibrations[family]).model.denoiser.conditioning(data.labels[:4])
    if cond is not None:
        feeds["cond"] = cond.numpy()
    half = run_bucket(fp16_exports[family] / "bucket_0.onnx", feeds, np.float16).astype(np.float32)
    full = run_bucket(exports[family, "tensorrt"] / "bucket_0.onnx", feeds)
    # tiny random weights amplify rounding flips at Q thresholds (digits: 1.3%); the end-to-end tolerance above
    assert np.linalg.norm(half - full) / np.linalg.norm(full) < 0.1


@pytest.mark.parametrize("family", ["unet-cond", "dit"])
def test_w4a8_stores_gemm_weights_as_int4_for_tensorrt_and_int8_containers_elsewhere(tiny_model_dirs, tmp_path, family):
    calib = calibrate(tiny_model_dirs[family], CalibConfig.from_bits("W4A8", method="minmax", **TINY), tmp_path / "calib", progress=False)
    for profile in ("tensorrt", "ort-cpu"):
        out = export(calib, ExportConfig(buckets=2, profile=profile, fp32=True), tmp_path / profile)
        check_buckets_against_torch(out, calib)
        model = onnx.load(str(out / "bucket_0.onnx"))
        initializers = {i.name: i for i in model.graph.initializer}
        producer = {name: n for n in model.graph.node for name in n.output}
        bits = {row["layer"]: row["weight_bits"] for row in load_artifact(calib).plan["layers"]}
        layers = {n.name: (n.op_type, initializers[producer[n.input[1]].input[0]])
                  for n in model.graph.node if bits.get(n.name) and n.op_type in QUANTIZED_OPS}  # fmt: skip
        int4 = profile == "tensorrt"
        four_bit_gemms = [w for name, (op, w) in layers.items() if op in ("MatMul", "Gemm") and bits[name] == 4]
        assert four_bit_gemms and all((w.data_type == onnx.TensorProto.INT4) == int4 for w in four_bit_gemms)
        for name, (op, w) in layers.items():
            if w.data_type == onnx.TensorProto.INT8:  # 8-bit boundary layers, and 4-bit values in int8 containers
                assert np.abs(numpy_helper.to_array(w).astype(int) + 0.5).max() <= 2 ** (bits[name] - 1)
        assert model.opset_import[0].version == (21 if int4 else 19)


@pytest.mark.parametrize("family", ["unet", "unet-cond", "dit", "pixart"])
def test_the_fp_graph_streams_its_weights_and_computes_what_the_exporters_own_folding_computes(tiny_model_dirs, tmp_path, family):
    """export_fp_graph traces without parameters, writes them to fp.weights and folds what depends only on them,
    node by node: no constant-only node (and no If) is left, every weight of a Conv/Gemm/MatMul is an initializer,
    the graph file holds no weight data, and it computes what the exporter's own folding (export_params=True,
    do_constant_folding=True, weights in memory) computes."""
    import warnings

    from dilatequant.core.denoiser import load_model
    from dilatequant.export.graph import FP_WEIGHTS, INLINE_BYTES, ExportWrapper, export_fp_graph

    denoiser = load_model(tiny_model_dirs[family]).denoiser
    export_fp_graph(denoiser, tmp_path / "fp.onnx", 19)
    graph = onnx.load(str(tmp_path / "fp.onnx"), load_external_data=False)
    constants = {i.name for i in graph.graph.initializer}
    assert not [n.op_type for n in graph.graph.node if n.op_type == "If" or (n.input and all(i in constants for i in n.input if i))]
    assert all(n.input[1] in constants for n in graph.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 1)
    assert all(len(i.raw_data) <= INLINE_BYTES for i in graph.graph.initializer)  # the graph file holds no weights
    assert (tmp_path / FP_WEIGHTS).stat().st_size >= sum(p.numel() * 4 for p in denoiser.parameters() if p.numel() * 4 > INLINE_BYTES)
    x, t = torch.randn(3, *denoiser.sample_shape, generator=torch.Generator().manual_seed(0)), torch.tensor([5, 400, 900])
    cond = denoiser.conditioning(torch.arange(3))
    feeds = {"x": x.numpy(), "t": t.numpy(), **({"cond": cond.numpy()} if cond is not None else {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ExportWrapper(denoiser).eval(), tuple(torch.from_numpy(v) for v in feeds.values()), str(tmp_path / "own.onnx"),
                          input_names=list(feeds), output_names=["eps"], opset_version=19, dynamo=False)  # fmt: skip
    run = lambda path: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]  # noqa: E731
    np.testing.assert_allclose(run(tmp_path / "fp.onnx"), run(tmp_path / "own.onnx"), rtol=1e-5, atol=1e-6)
