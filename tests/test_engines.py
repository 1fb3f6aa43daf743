"""engines/: build, load and run ONNX Runtime engines; the bucketed runtime; profile; error handling."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from dilatequant.calibrate.config import CalibConfig
from dilatequant.calibrate.flow import calibrate
from dilatequant.core.denoiser import load_model
from dilatequant.core.errors import UserError
from dilatequant.core.manifest import SELF_DIGEST, ArtifactError, content_digest
from dilatequant.core.sampling import SamplerConfig, sample
from dilatequant.engines.config import BuildConfig
from dilatequant.engines.engine import build, load
from dilatequant.engines.runtime import EngineDenoiser, load_engine_model
from dilatequant.export.config import ExportConfig
from dilatequant.export.flow import export, export_unquantized
from dilatequant.tools.cli import cli

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
TINY = {"samples": 32, "trajectories": 8, "steps": 5}
FAMILIES = ["unet", "unet-cond", "dit", "pixart"]


@pytest.fixture(scope="module")
def exports(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("engines-export")
    out = {}
    for family in FAMILIES:
        calib = calibrate(tiny_model_dirs[family], CalibConfig.from_bits("W8A8", method="minmax", **TINY), root / f"{family}-cal",
                          progress=False)  # fmt: skip
        out[family] = export(calib, ExportConfig(buckets=2, profile="ort-cpu"), root / family)
    return out


@pytest.fixture(scope="module")
def engines(exports, tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    return {family: build(path, BuildConfig(threads=1), root / family) for family, path in exports.items()}


def inputs(denoiser: EngineDenoiser, t: list[int]):
    x = torch.randn(len(t), *denoiser.sample_shape, generator=torch.Generator().manual_seed(0))
    return x, torch.tensor(t), denoiser.conditioning(torch.arange(len(t)) % (denoiser.num_classes or 10))


@pytest.mark.parametrize("family", FAMILIES)
def test_engines_compute_what_the_exported_graphs_compute(exports, engines, family):
    denoiser = load_engine_model(engines[family]).denoiser
    manifest = json.loads((engines[family] / "manifest.json").read_text())
    assert manifest["backend"] == "onnxruntime" and manifest["provider"] == "CPUExecutionProvider" and len(manifest["engines"]) == 2
    for k, (low, high) in enumerate(manifest["ranges"]):
        t = max(low, manifest["calibrated_range"][0])
        x, tt, cond = inputs(denoiser, [t, t])
        feeds = {"x": x.numpy(), "t": tt.numpy(), **({"cond": cond.numpy()} if cond is not None else {})}
        graph = ort.InferenceSession(str(exports[family] / f"bucket_{k}.onnx"), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(denoiser(x, tt, cond).numpy(), graph.run(None, feeds)[0], rtol=1e-4, atol=1e-5)


def test_a_mixed_timestep_batch_is_split_by_bucket_and_reassembled_in_order(engines):
    denoiser = load_engine_model(engines["unet-cond"]).denoiser
    low, high = denoiser.low, denoiser.high
    t = [high, low, high, low + 1]
    assert len({denoiser.engines.table.bucket_of(v) for v in t}) == 2
    x, tt, cond = inputs(denoiser, t)
    mixed = denoiser(x, tt, cond)
    one_by_one = torch.cat([denoiser(x[i : i + 1], tt[i : i + 1], cond[i : i + 1]) for i in range(len(t))])
    np.testing.assert_allclose(mixed.numpy(), one_by_one.numpy(), rtol=1e-5, atol=1e-6)
    assert denoiser(x, torch.tensor(high), cond).shape == x.shape  # one t for the whole batch


def test_timesteps_outside_the_calibrated_range_need_clamp(engines):
    path = engines["unet"]
    strict, clamped = load_engine_model(path).denoiser, load_engine_model(path, clamp=True).denoiser
    x, _, cond = inputs(strict, [0])
    below = torch.tensor([strict.low - 1])
    with pytest.raises(UserError, match="outside the range .* --clamp"):
        strict(x, below, cond)
    # clamping picks the nearest bucket's scales; the model still sees the true timestep
    nearest = strict.engines.run(strict.engines.table.bucket_of(strict.low), x.numpy(), below.numpy(), cond.numpy())
    np.testing.assert_allclose(clamped(x, below, cond).numpy(), nearest, rtol=1e-6)


def test_bad_inputs_are_refused_with_the_expected_shapes(engines):
    denoiser = load_engine_model(engines["unet"]).denoiser
    x, t, cond = inputs(denoiser, [denoiser.high, denoiser.high])
    with pytest.raises(UserError, match="per sample; the engines .* take"):
        denoiser(x[:, :, :4], t, cond)
    with pytest.raises(UserError, match="Batch mismatch"):
        denoiser(x, t[:1].repeat(3), cond)
    with pytest.raises(ArtifactError, match="cond"):
        denoiser.engines.run(0, x.numpy(), t.numpy(), None)


def test_sampling_through_fp_engines_reproduces_torch_sampling(tiny_model_dirs, tmp_path):
    """The runtime inside diffusers' scheduler loop: exact where the graph is exact (the FP export)."""
    from dilatequant.core.denoiser import load_model

    engines = build(export_unquantized(tiny_model_dirs["unet-cond"], "fp32", tmp_path / "fp"), BuildConfig(threads=1), tmp_path / "e")
    engine_model, torch_model = load_engine_model(engines), load_model(tiny_model_dirs["unet-cond"])
    config, labels = SamplerConfig(steps=5, batch_size=3), torch.arange(4)
    through_engines = sample(engine_model.denoiser, engine_model.scheduler_config, labels, config, progress=False)
    through_torch = sample(torch_model.denoiser, torch_model.scheduler_config, labels, config, progress=False)
    assert (through_engines - through_torch).norm() / through_torch.norm() < 1e-3


def test_corrupt_or_foreign_engine_directories_are_refused(engines, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(engines["dit"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())

    def written_with(**fields):  # as another version or machine would have written it: its own digest matches
        changed = {**manifest, **fields}
        (copy / "manifest.json").write_text(json.dumps({**changed, SELF_DIGEST: content_digest(changed)}))

    written_with(backend_version="0.1")
    with pytest.raises(ArtifactError, match="built with onnxruntime 0.1.*Rebuild"):
        load(copy)
    written_with(format_version="1.0")  # a weights file per bucket, before they shared one
    with pytest.raises(ArtifactError, match="format version 1.0.*Re-create"):
        load(copy)
    written_with(device="cpu (another CPU)")
    with pytest.raises(ArtifactError, match="built on cpu \\(another CPU\\).*rebuild"):
        load(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "device": "cpu (edited by hand)"}))
    with pytest.raises(ArtifactError, match="modified after it was written"):
        load(copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with open(copy / "bucket_1.onnx", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\0\0\0\0")
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        load(copy)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        build(tmp_path, BuildConfig(), tmp_path / "never")
    assert not (tmp_path / "never").exists()
    with pytest.raises(UserError, match="strip-weights is a TensorRT option"):
        BuildConfig(strip_weights=True)


def test_every_bucket_engine_reads_one_shared_weights_file_whatever_k(tiny_model_dirs, exports, engines, tmp_path):
    """The buckets' optimized graphs differ only where activation scales reach (scales, folded biases): one weights
    file holds each distinct tensor once, whatever K."""
    calib = exports["unet"].parent / "unet-cal"
    sizes = {}
    for k in (1, 4):
        built = build(export(calib, ExportConfig(buckets=k, profile="ort-cpu"), tmp_path / f"export-{k}"), BuildConfig(threads=1),
                      tmp_path / f"engines-{k}")  # fmt: skip
        assert sorted(p.name for p in built.iterdir()) == sorted(["manifest.json", "weights.bin", *(f"bucket_{i}.onnx" for i in range(k))])
        for graph in built.glob("bucket_*.onnx"):
            model = onnx.load(str(graph), load_external_data=False)
            locations = {e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"}
            assert locations == {"weights.bin"}
        shared = json.loads((built / "manifest.json").read_text())["weights_shared"]
        assert shared["referenced_bytes"] >= k * shared["stored_bytes"] / 1.1
        sizes[k] = (built / "weights.bin").stat().st_size
    assert sizes[4] < 1.1 * sizes[1]  # only the scale-dependent tensors repeat


def test_unquantized_export_is_one_bucket_over_every_timestep(tiny_model_dirs, tmp_path):
    out = export_unquantized(tiny_model_dirs["dit"], "fp16", tmp_path / "fp")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["profile"] == "unquantized" and manifest["precision"] == "fp16" and manifest["n_buckets"] == 1
    assert manifest["calibrated_range"] == [0, 999] and manifest["buckets"]["grid"] == [0]
    graph = onnx.load(str(out / "bucket_0.onnx"), load_external_data=False)  # layer nodes named after their layers
    layers = {name for name, m in load_model(tiny_model_dirs["dit"]).denoiser.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {n.name for n in graph.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.name} == layers
    with pytest.raises(UserError, match="not an unquantized precision"):
        export_unquantized(tiny_model_dirs["dit"], "int8", tmp_path / "int8")


def test_cli_build_profile_and_the_latency_gate(exports, tmp_path, tiny_model_dirs):
    runner = CliRunner()
    quantized, baseline = tmp_path / "q", tmp_path / "fp"
    assert runner.invoke(cli, ["build", "--export", str(exports["unet"]), "--threads", "1", "--out", str(quantized)]).exit_code == 0
    fp_export = export_unquantized(tiny_model_dirs["unet"], "fp32", tmp_path / "fp-export")
    assert runner.invoke(cli, ["build", "--export", str(fp_export), "--out", str(baseline)]).exit_code == 0
    summary = json.loads(runner.invoke(cli, ["inspect", str(quantized), "--json"]).stdout)
    assert summary["kind"] == "engines" and summary["checksums_verified"] and len(summary["engines"]) == 2
    args = ["profile", "--engines", str(quantized), "--compare", str(baseline), "--batch", "1,2", "--sampling-steps", "2",
            "--warmup", "1", "--out", str(tmp_path / "profile.json"), "--chart", str(tmp_path / "profile.png")]  # fmt: skip
    run = runner.invoke(cli, args)
    assert run.exit_code == 0, run.output
    report = json.loads((tmp_path / "profile.json").read_text())
    assert set(report["comparisons"][0]["ratio_p50"]) == {"1", "2"} and (tmp_path / "profile.png").stat().st_size > 1000
    for entry in report["engines"].values():
        assert entry["memory"]["peak_rss_mb"] > 0 and all(len(b["per_bucket"]) == entry["n_buckets"] for b in entry["batches"].values())
        assert all(b["p95_ms"] >= b["p50_ms"] > 0 for b in entry["batches"].values())
    assert "| q | onnxruntime |" in run.output
    gate = runner.invoke(cli, [*args, "--max-ratio", "2=0.000001"])
    assert gate.exit_code == 1 and "ABOVE the limit" in gate.output
    refused = runner.invoke(cli, ["profile", "--engines", str(quantized), "--max-ratio", "8=1"])
    assert refused.exit_code == 1 and "add --compare" in refused.output


def test_streams_split_the_batch_and_give_the_same_result(exports, engines, tmp_path):
    streamed = load_engine_model(build(exports["dit"], BuildConfig(threads=1, streams=2), tmp_path / "streams")).denoiser
    single = load_engine_model(engines["dit"]).denoiser
    assert len(streamed.engines.engines[0].sessions) == 2
    x, t, cond = inputs(single, [single.high] * 5)  # an uneven split: 2 + 3
    np.testing.assert_allclose(streamed(x, t, cond).numpy(), single(x, t, cond).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="--streams must be >= 1"):
        BuildConfig(streams=0)


def test_engine_lifecycle_activate_infer_close_releases_sessions_and_threads(exports, tmp_path):
    engines = load(build(exports["dit"], BuildConfig(threads=1, streams=2), tmp_path / "life"))
    denoiser = EngineDenoiser(engines)
    x, t, cond = inputs(denoiser, [denoiser.high] * 4)
    before = denoiser(x, t, cond)
    pool = engines.engines[0].pool
    engines.close()
    assert all(not e.active and e.sessions == [] and e.pool is None for e in engines.engines) and pool._shutdown
    with pytest.raises(UserError, match="is not active.*activate"):
        denoiser(x, t, cond)
    with engines:  # activate again; closed on exit
        np.testing.assert_array_equal(denoiser(x, t, cond).numpy(), before.numpy())
    assert not any(e.active for e in engines.engines)


def test_load_variant_reads_each_kind_and_refuses_the_wrong_one(exports, engines, tiny_model_dirs):
    from dilatequant.tools.variants import load_variant, variant_kind

    calib = json.loads((exports["unet"] / "manifest.json").read_text())["source"]["calibration"]
    assert [variant_kind(p) for p in (tiny_model_dirs["unet"], calib, engines["unet"])] == ["model", "calibration", "engines"]
    model, calibrated = load_variant(tiny_model_dirs["unet"]), load_variant(calib, source=tiny_model_dirs["unet"])
    assert model.artifact is None and calibrated.artifact.path.name == "unet-cal"
    assert type(calibrated.loaded.denoiser).__name__ == "QuantizedDenoiser"
    with load_variant(engines["unet"]) as deployed:
        assert isinstance(deployed.loaded.denoiser, EngineDenoiser) and deployed.loaded.denoiser.engines.engines[0].active
    assert not deployed.loaded.denoiser.engines.engines[0].active  # closed on exit
    with pytest.raises(ArtifactError, match="holds a 'export' artifact; a 'engines' directory is expected"):
        load_variant(exports["unet"], kind="engines")
    with pytest.raises(ArtifactError, match="is not the model"):
        load_variant(calib, source=tiny_model_dirs["dit"])


def test_engines_without_prepacking_compute_the_same_and_record_it(exports, engines, tmp_path):
    """--no-prepack (one copy of the integer weights instead of one per session): same outputs, recorded; refused
    for a backend that has no such option."""
    plain = build(exports["unet-cond"], BuildConfig(threads=1, prepack=False), tmp_path / "no-prepack")
    assert json.loads((plain / "manifest.json").read_text())["build"]["prepack"] is False
    packed, unpacked = load_engine_model(engines["unet-cond"]).denoiser, load_engine_model(plain).denoiser
    x, t, cond = inputs(packed, [packed.high, packed.low])
    np.testing.assert_allclose(unpacked(x, t, cond).numpy(), packed(x, t, cond).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="--no-prepack is an onnxruntime option"):
        BuildConfig(backend="torch", prepack=False)
