"""TensorRT backend: shape profiles, trtexec scripts, lazy imports and error messages here; engines built, run and
audited where TensorRT is installed (tests marked `tensorrt`, skipped elsewhere)."""

import ctypes
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from dilatequant.calibrate.config import CalibConfig
from dilatequant.calibrate.flow import calibrate
from dilatequant.core.errors import MissingDependencyError, UserError
from dilatequant.core.manifest import ArtifactError
from dilatequant.engines import engine
from dilatequant.engines.config import BuildConfig
from dilatequant.engines.tensorrt_backend import BACKEND, fusion_audit, shape_profile
from dilatequant.engines.trtexec import write_trtexec_scripts
from dilatequant.export.config import ExportConfig
from dilatequant.export.flow import export, export_unquantized

TINY = {"samples": 32, "trajectories": 8, "steps": 5}
# family -> the non-batch dims of each graph input (tests/tiny_models.py): x, t, and labels or encoder states as cond
TOKENS = (1, 77, 512)  # BuildConfig's default token range: (min, opt, max) of cond's free 'tokens' dimension
INPUT_DIMS = {"unet": {"x": (1, 16, 16), "t": (), "cond": ()}, "unet-cond": {"x": (4, 16, 16), "t": (), "cond": ("tokens", 16)},
              "dit": {"x": (4, 8, 8), "t": (), "cond": ()}, "pixart": {"x": (4, 8, 8), "t": (), "cond": ("tokens", 33)}}  # fmt: skip
needs_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="TensorRT is not installed "
                                    "(pip install 'dilatequant[tensorrt]' on a machine with an NVIDIA GPU)")


@pytest.fixture(scope="module")
def unquantized_exports(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("trt-unquantized")
    return {family: export_unquantized(path, "fp16", root / family) for family, path in tiny_model_dirs.items()}


@pytest.fixture(scope="module")
def bucketed_export(tiny_model_dirs, tmp_path_factory):
    """A two-bucket tensorrt-profile export of the tiny DiT (the cheapest to calibrate)."""
    root = tmp_path_factory.mktemp("trt-bucketed")
    calib = calibrate(tiny_model_dirs["dit"], CalibConfig.from_bits("W8A8", method="minmax", **TINY), root / "c", progress=False)
    return export(calib, ExportConfig(buckets=2, profile="tensorrt"), root / "export")


@pytest.mark.parametrize(
    ("options", "message"),
    [({"min_batch": 4, "opt_batch": 2}, "1 <= min <= opt <= max"), ({"optimization_level": 6}, "must be 0..5"),
     ({"dynamic_resolution": True, "min_size": 64, "max_size": 32}, "1 <= min <= max"),
     ({"backend": "tensorrt-llm"}, "Unknown backend"), ({"backend": "onnxruntime", "strip_weights": True}, "a TensorRT option")],
)  # fmt: skip
def test_build_config_refuses_inconsistent_options(options, message):
    with pytest.raises(UserError, match=message):
        BuildConfig(**{"backend": "tensorrt", **options})


def test_build_config_round_trips_through_the_manifest():
    config = BuildConfig(backend="tensorrt", min_batch=2, opt_batch=2, max_batch=4, optimization_level=5, refittable=True,
                         strip_weights=True)  # fmt: skip
    assert BuildConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("family", sorted(INPUT_DIMS))
def test_shape_profile_ranges_the_batch_and_keeps_every_other_dim_of_the_graph(unquantized_exports, family):
    config = BuildConfig(backend="tensorrt", min_batch=2, opt_batch=4, max_batch=16)
    profile = shape_profile(unquantized_exports[family] / "bucket_0.onnx", config)
    assert profile == {name: tuple((batch, *(tokens if d == "tokens" else d for d in dims)) for batch, tokens in zip((2, 4, 16), TOKENS))
                       for name, dims in INPUT_DIMS[family].items()}  # fmt: skip


def free_height_and_width(graph_path, out):
    """A copy of a graph's structure whose x has a free height and width (shape_profile reads no weights)."""
    model = onnx.load(str(graph_path), load_external_data=False)
    x = next(tensor for tensor in model.graph.input if tensor.name == "x")
    for dim, name in zip(x.type.tensor_type.shape.dim[2:], ("height", "width")):
        dim.dim_param = name
    onnx.save(model, str(out))
    return out


def test_dynamic_resolution_frees_height_and_width_only_where_the_graph_does(unquantized_exports, tmp_path):
    graph = unquantized_exports["unet-cond"] / "bucket_0.onnx"
    dynamic = BuildConfig(backend="tensorrt", dynamic_resolution=True, min_size=8, max_size=64)
    with pytest.raises(UserError, match="fixes x's dimension 2 at 16. Build without --dynamic-resolution"):
        shape_profile(graph, dynamic)
    free = free_height_and_width(graph, tmp_path / "free.onnx")
    assert shape_profile(free, dynamic) == {"x": ((1, 4, 8, 8), (8, 4, 64, 64), (32, 4, 64, 64)), "t": ((1,), (8,), (32,)),
                                            "cond": ((1, 1, 16), (8, 77, 16), (32, 512, 16))}  # fmt: skip
    with pytest.raises(UserError, match="input x has a free dimension 2 \\('height'\\)"):
        shape_profile(free, BuildConfig(backend="tensorrt"))


def parse_shapes(spec):
    """trtexec's 'x:1x4x8x8,t:1' -> {'x': (1, 4, 8, 8), 't': (1,)}."""
    return {name: tuple(int(d) for d in dims.split("x")) for name, dims in (item.split(":") for item in spec.split(","))}


def run_with_recording_trtexec(script, tmp_path):
    """Run a script with TRTEXEC set to a stub that records its working directory and arguments (one call per file)."""
    calls, stub = tmp_path / "calls", tmp_path / "trtexec-stub"
    calls.mkdir()
    stub.write_text('#!/usr/bin/env bash\n{ pwd; printf "%s\\n" "$@"; } > "$CALLS/$(ls "$CALLS" | wc -l)"\n')
    stub.chmod(0o755)
    environment = {**os.environ, "TRTEXEC": str(stub), "CALLS": str(calls)}
    result = subprocess.run(["bash", str(script), "--verbose"], cwd=tmp_path, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    recorded = [(calls / str(i)).read_text().splitlines() for i in range(len(list(calls.iterdir())))]
    return [(lines[0], lines[1:]) for lines in recorded]


@pytest.mark.parametrize("options", [{}, {"optimization_level": 5, "refittable": True, "strip_weights": True}])
def test_trtexec_scripts_build_every_bucket_like_the_backend(bucketed_export, tmp_path, options):
    config = BuildConfig(backend="tensorrt", min_batch=1, opt_batch=4, max_batch=8, **options)
    out = tmp_path / "trtexec scripts"  # a space: arguments are quoted
    paths = write_trtexec_scripts(bucketed_export, config, out)
    assert [p.name for p in paths] == ["build_bucket_0.sh", "build_bucket_1.sh", "build_all.sh"]
    for path in paths:
        assert os.access(path, os.X_OK) and subprocess.run(["bash", "-n", str(path)]).returncode == 0
    calls = run_with_recording_trtexec(out / "build_all.sh", tmp_path)
    assert len(calls) == 2
    for k, (cwd, arguments) in enumerate(calls):
        assert cwd == str(out.resolve()) and arguments[-1] == "--verbose"  # runs from its own directory, passes arguments on
        flags = dict(a.split("=", 1) if "=" in a else (a, None) for a in arguments[:-1])
        graph = (out / flags["--onnx"]).resolve()
        assert graph == (bucketed_export / f"bucket_{k}.onnx").resolve() and (graph.parent / "weights.bin").is_file()
        profile = shape_profile(graph, config)
        assert [parse_shapes(flags[f"--{point}Shapes"]) for point in ("min", "opt", "max")] == [
            {name: ranges[i] for name, ranges in profile.items()} for i in range(3)]  # fmt: skip
        assert flags["--saveEngine"] == f"bucket_{k}.plan" and flags["--exportLayerInfo"] == f"bucket_{k}.layers.json"
        assert flags["--timingCacheFile"] == "timing.cache" and flags["--profilingVerbosity"] == "detailed"
        assert flags["--builderOptimizationLevel"] == str(config.optimization_level)
        assert {"--stronglyTyped", "--noTF32"} <= set(flags)
        assert ("--refit" in flags, "--stripWeights" in flags) == (config.refittable, config.strip_weights)


def test_trtexec_scripts_are_all_or_nothing(bucketed_export, tmp_path):
    with pytest.raises(UserError, match="--dynamic-resolution needs graphs whose input x has a free height and width"):
        write_trtexec_scripts(bucketed_export, BuildConfig(backend="tensorrt", dynamic_resolution=True), tmp_path / "scripts")
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        write_trtexec_scripts(tmp_path, BuildConfig(backend="tensorrt"), tmp_path / "scripts")
    assert not (tmp_path / "scripts").exists()


def test_importing_the_backend_imports_neither_tensorrt_nor_polygraphy():
    code = ("import sys; import dilatequant.engines.tensorrt_backend as trt_backend, dilatequant.engines.trtexec; "
            "from dilatequant.engines.backend import get_backend; assert get_backend('tensorrt') is trt_backend.BACKEND; "
            "print(sorted(m for m in ('tensorrt', 'polygraphy', 'onnx') if m in sys.modules))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_without_tensorrt_every_use_names_the_extra(unquantized_exports, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt now fails, as where it is not installed
    missing = r"TensorRT engines needs the package 'tensorrt'.*pip install 'dilatequant\[tensorrt\]'"
    with pytest.raises(MissingDependencyError, match=missing):
        engine.build(unquantized_exports["dit"], BuildConfig(backend="tensorrt"), tmp_path / "engines")
    assert not (tmp_path / "engines").exists()
    with pytest.raises(MissingDependencyError, match=missing):
        BACKEND.load(tmp_path, {"device": BACKEND.device(BuildConfig()), "engines": {"bucket_0": "bucket_0.plan"}}, "bucket_0")


def test_device_names_the_gpu_and_engines_refuse_another(monkeypatch, tmp_path):
    config = BuildConfig(backend="tensorrt")
    assert isinstance(BACKEND.device(config), str) and BACKEND.device(config)

    def no_driver(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_driver)
    assert BACKEND.device(config) == "unknown GPU"
    with pytest.raises(ArtifactError, match="was built on NVIDIA H100 80GB HBM3; this machine has unknown GPU"):
        BACKEND.load(tmp_path, {"device": "NVIDIA H100 80GB HBM3", "engines": {"bucket_0": "bucket_0.plan"}}, "bucket_0")


def test_fusion_audit_reads_the_inspector_schemas_of_tensorrt_10_and_11():
    """Parser check on hand-written records in the documented report schemas (TensorRT 10: 'Format/Datatype'; 11: a
    separate data type field); what TensorRT really fuses is checked on built engines below."""
    op_types = {"conv::Q": "QuantizeLinear", "conv::DQ": "DequantizeLinear", "conv": "Conv", "attn::DQ": "DequantizeLinear",
                "attn/MatMul": "MatMul"}  # fmt: skip
    layers = [
        {"Name": "conv::Q", "LayerType": "Reformat", "Inputs": [{"Name": "h", "Format/Datatype": "Row major linear FP16 format"}]},
        {"Name": "conv::DQ + conv", "LayerType": "CaskConvolution", "Metadata": "[ONNX Layer: conv::DQ]\x1e[ONNX Layer: conv]",
         "Inputs": [{"Name": "hq", "Format/Datatype": "Channel major INT8 format where channel % 32 == 0"}]},
        {"Name": "Reformatting CopyNode for Input Tensor 0 to conv", "LayerType": "Reformat",
         "Inputs": [{"Name": "u", "Format/Datatype": "Row major linear UInt8 format"}]},
        {"Name": "attn::DQ", "LayerType": "Scale", "Inputs": [{"Name": "aq", "Datatype": "Int8", "Format": "Row major linear"}]},
        {"Name": "__myl_MatMul", "LayerType": "kgen", "Metadata": "[ONNX Layer: attn/MatMul]",
         "Inputs": [{"Name": "k", "DataType": "Int8"}]},
        {"Name": "q_1", "LayerType": "Reformat", "ParameterType": "Dequantize", "Inputs": [{"Name": "z", "Datatype": "Int8"}]},
    ]  # fmt: skip
    audit = fusion_audit({"Layers": layers}, op_types)
    assert audit == {"layers": 6, "int8_layers": 2, "unfused_qdq": 3, "int8_layer_names": ["conv::DQ + conv", "__myl_MatMul"],
                     "unfused_qdq_layer_names": ["conv::Q", "attn::DQ", "q_1"]}  # fmt: skip


# ------------------------------------------------------------------------------------- needs TensorRT and an NVIDIA GPU


@pytest.fixture(scope="module")
def unet_exports(tiny_model_dirs, tmp_path_factory):
    """W8A8 tensorrt-profile exports of the tiny class-conditional UNet (convolutions: INT8 kernels), FP16 and FP32."""
    root = tmp_path_factory.mktemp("trt-unet")
    calib = calibrate(tiny_model_dirs["unet"], CalibConfig.from_bits("W8A8", method="minmax", **TINY), root / "c", progress=False)
    return {precision: export(calib, ExportConfig(buckets=2, profile="tensorrt", fp32=precision == "fp32"), root / precision)
            for precision in ("fp16", "fp32")}  # fmt: skip


@pytest.fixture(scope="module")
def unet_engines(unet_exports, tmp_path_factory):
    config = BuildConfig(backend="tensorrt", min_batch=1, opt_batch=2, max_batch=4)
    return engine.build(unet_exports["fp16"], config, tmp_path_factory.mktemp("trt-engines") / "engines")


def assert_tracks_onnx_runtime_fp32(engines, fp32_export):
    """Every bucket's engine, at a batch inside the profile, against ONNX Runtime on the FP32 variant of its graph
    (tiny random weights amplify FP16 rounding flips at the Q thresholds: test_export allows 0.1 as well)."""
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(0)
    x, t, cond = rng.standard_normal((3, 1, 16, 16)).astype(np.float32), rng.integers(0, 1000, 3), rng.integers(0, 10, 3)
    for k in range(len(engines)):
        eps = engines.run(k, x, t, cond)
        session = ort.InferenceSession(str(fp32_export / f"bucket_{k}.onnx"), providers=["CPUExecutionProvider"])
        (reference,) = session.run(["eps"], {"x": x, "t": t, "cond": cond})
        assert eps.dtype == np.float32 and eps.shape == reference.shape
        assert np.linalg.norm(eps - reference) / np.linalg.norm(reference) < 0.1


@pytest.mark.tensorrt
@needs_tensorrt
def test_engines_load_and_track_onnx_runtime_on_the_fp32_variant(unet_engines, unet_exports):
    manifest = json.loads((unet_engines / "manifest.json").read_text())
    assert manifest["backend"] == "tensorrt" and manifest["engines"] == {f"bucket_{k}": f"bucket_{k}.plan" for k in range(2)}
    suffixes = (".plan", ".layers.json", ".fusion.json")
    assert set(manifest["files"]) == {"timing.cache", *(f"bucket_{k}{suffix}" for k in range(2) for suffix in suffixes)}
    assert manifest["timing_cache"] == "timing.cache"
    assert manifest["tensorrt_build"]["shapes"]["bucket_0"]["x"] == [[1, 1, 16, 16], [2, 1, 16, 16], [4, 1, 16, 16]]
    engines = engine.load(unet_engines)
    assert engines.engines[0].input_dtypes == {"x": np.dtype(np.float16), "t": np.dtype(np.int64), "cond": np.dtype(np.int64)}
    assert_tracks_onnx_runtime_fp32(engines, unet_exports["fp32"])


@pytest.mark.tensorrt
@needs_tensorrt
def test_fusion_audit_finds_the_int8_layers(unet_engines):
    manifest = json.loads((unet_engines / "manifest.json").read_text())
    for k in range(2):
        entry = manifest["layer_reports"][f"bucket_{k}"]
        audit = json.loads((unet_engines / entry["fusion_audit"]).read_text())
        layers = json.loads((unet_engines / entry["layers"]).read_text())["Layers"]
        assert entry["int8_layers"] == audit["int8_layers"] == len(audit["int8_layer_names"]) > 0
        assert entry["unfused_qdq"] == audit["unfused_qdq"] == len(audit["unfused_qdq_layer_names"])
        assert audit["layers"] == len(layers) and all("Inputs" in layer for layer in layers)  # detailed verbosity


@pytest.mark.tensorrt
@needs_tensorrt
def test_weight_stripped_engines_are_refitted_from_their_unchanged_export(unet_exports, unet_engines, tmp_path):
    source = shutil.copytree(unet_exports["fp16"], tmp_path / "export")
    config = BuildConfig(backend="tensorrt", min_batch=1, opt_batch=2, max_batch=4, strip_weights=True)
    out = engine.build(source, config, tmp_path / "stripped")
    assert (out / "bucket_0.plan").stat().st_size < (unet_engines / "bucket_0.plan").stat().st_size
    assert_tracks_onnx_runtime_fp32(engine.load(out), unet_exports["fp32"])
    weights = bytearray((source / "weights.bin").read_bytes())
    weights[0] ^= 1
    (source / "weights.bin").write_bytes(bytes(weights))
    with pytest.raises(ArtifactError, match="take their weights from the export they were built from"):
        engine.load(out)
