"""Timestep buckets: total, monotone, covering tables; exact DP partitions."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dilatequant.calibrate import rebucket
from dilatequant.calibrate.artifact import load_artifact
from dilatequant.calibrate.config import CalibConfig
from dilatequant.calibrate.flow import calibrate
from dilatequant.calibrate.initialise import RowObserver, run_over
from dilatequant.calibrate.quant_model import OUTPUT_SUFFIX
from dilatequant.calibrate.quantizer import ActQuantizer, fake_quantize
from dilatequant.calibrate.rebucket import bucket_candidates, bucket_scales, bucketed_model, observation_batch
from dilatequant.calibrate.timesteps import TimestepIndex
from dilatequant.core.buckets import BucketTable
from dilatequant.core.errors import UserError
from dilatequant.core.sampling import default_batch_size
from dilatequant.export.buckets import choose_buckets, optimal_partitions, segment_costs
from dilatequant.export.config import ExportConfig


@st.composite
def tables(draw):
    grid = sorted(draw(st.sets(st.integers(0, 999), min_size=1, max_size=40)))
    cuts = draw(st.sets(st.integers(1, len(grid) - 1), max_size=8)) if len(grid) > 1 else set()
    return BucketTable(tuple(grid), tuple(sorted({0} | cuts)))


@settings(max_examples=100, deadline=None)
@given(tables())
def test_buckets_are_total_monotone_and_cover_the_range(table):
    ranges = table.ranges()
    assert ranges[0][0] == 0 and ranges[-1][1] == 999
    assert all(lo <= hi for lo, hi in ranges) and all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:]))
    buckets = [table.bucket_of(t) for t in range(1000)]
    assert buckets == sorted(buckets) and set(buckets) == set(range(len(table)))
    halves = torch.arange(0, 1000, 0.5)  # the vectorised lookup agrees everywhere, boundaries (x.5) included
    assert table.buckets_of(halves).tolist() == [table.bucket_of(float(t)) for t in halves]
    for k, (lo, hi) in enumerate(ranges):
        assert table.bucket_of(lo) == k and table.bucket_of(hi) == k
        assert all(lo <= table.grid[r] <= hi for r in table.rows(k))  # calibrated timesteps land in their bucket
    assert BucketTable.from_dict(table.to_dict()) == table


def brute_force(cost: torch.Tensor, k: int) -> float:
    rows = cost.shape[0]
    best = float("inf")
    for cut in itertools.combinations(range(1, rows), k - 1):
        starts = (0, *cut, rows)
        best = min(best, sum(float(cost[a, b - 1]) for a, b in zip(starts, starts[1:])))
    return best


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 7), st.integers(1, 4), st.integers(0, 2**16))
def test_dynamic_programming_is_exact(rows, quantizers, seed):
    steps = torch.rand(quantizers, rows, generator=torch.Generator().manual_seed(seed)) + 0.1
    cost = segment_costs(steps)
    partitions = optimal_partitions(cost, rows)
    for k in range(1, rows + 1):
        assert partitions[k][0] == pytest.approx(brute_force(cost, k))
    assert partitions[rows][0] == pytest.approx(quantizers * rows)  # per-timestep: every ratio is 1


def test_choose_buckets_splits_where_ranges_jump_and_auto_meets_the_tolerance():
    grid = [999, 749, 499, 249, 0]  # sampler order (descending)
    steps = torch.tensor([[1.0, 1.0, 1.0, 0.1, 0.1]])  # small steps at t = 249 and 0
    table, error = choose_buckets(grid, steps, 2)
    assert table.grid == (0, 249, 499, 749, 999) and table.starts == (0, 2)
    assert error[2] == pytest.approx(1.0) and error[1] > 10
    auto, _ = choose_buckets(grid, steps, "auto", tolerance=0.1)
    assert len(auto) == 2


def test_too_many_buckets_is_a_user_error():
    with pytest.raises(UserError, match="--buckets 6 is outside 1..5"):
        choose_buckets([0, 1, 2, 3, 4], torch.ones(1, 5), 6)


@pytest.fixture(scope="module")
def distilled(tiny_model_dirs, tmp_path_factory):
    """A tiny UNet calibrated with MSE initialisation and a short distillation (which moves the steps)."""
    config = CalibConfig.from_bits("W8A8", samples=16, trajectories=4, steps=4, bkd_iters=20)
    return load_artifact(calibrate(tiny_model_dirs["unet"], config, tmp_path_factory.mktemp("distilled") / "c", progress=False))


def input_tables(loaded) -> dict:
    return {name: q for name, q in loaded.denoiser.act_quantizers().items() if not name.endswith(OUTPUT_SUFFIX)}


def test_one_timestep_per_bucket_deploys_exactly_the_calibrated_rows(distilled):
    grid = distilled.record.timesteps
    table = BucketTable(tuple(sorted(grid)), tuple(range(len(grid))))
    calibrated, rederived = input_tables(bucketed_model(distilled, table)), input_tables(bucketed_model(distilled, table, scales="rederived"))
    position = {t: i for i, t in enumerate(grid)}
    for name, quantizer in calibrated.items():
        steps, zeros = distilled.act_table(name)
        rows = [position[t] for t in table.grid]
        assert torch.equal(quantizer.step.detach(), steps[rows]) and torch.equal(quantizer.zero_point.detach(), zeros[rows])
    # what distillation learned is exactly what re-deriving from the data loses
    assert any(not torch.equal(calibrated[n].step.detach(), rederived[n].step.detach()) for n in calibrated)


def test_fewer_buckets_take_the_least_error_candidate_of_their_rows(distilled):
    table = BucketTable(tuple(sorted(distilled.record.timesteps)), (0, 2))
    loaded = bucketed_model(distilled, table)
    quantizers, seen = input_tables(loaded), {}
    hooks = [q.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, []).append((o.detach(), m.index.rows_for(len(o)))))
             for name, q in quantizers.items()]  # fmt: skip
    loaded.denoiser.set_quantization(activations=False, weights=False)
    run_over(loaded.denoiser, distilled.calibration_data(), 16, torch.device("cpu"), "", progress=False)
    for hook in hooks:
        hook.remove()
    for name, quantizer in quantizers.items():
        x, rows = (torch.cat(parts) for parts in zip(*seen[name]))
        for k, (steps, zeros) in enumerate(bucket_candidates(distilled, table, name, quantizer.fmt)):
            assert len(steps) == 3  # the grid covering the bucket's two calibrated rows, and the rows
            flat = x[rows == k].flatten()
            errors = torch.stack([(fake_quantize(flat, s, z, quantizer.fmt) - flat).pow(2).sum() for s, z in zip(steps, zeros)])
            chosen = (steps == quantizer.step[k].detach()) & (zeros == quantizer.zero_point[k].detach())
            assert chosen.any() and errors[chosen].min() <= errors.min() * (1 + 1e-6)


def test_minmax_recipes_deploy_min_max_over_the_bucket_either_way(tiny_model_dirs, tmp_path):
    config = CalibConfig.from_bits("W8A8", method="minmax", samples=16, trajectories=4, steps=4)
    artifact = load_artifact(calibrate(tiny_model_dirs["unet"], config, tmp_path / "c", progress=False))
    table = BucketTable(tuple(sorted(artifact.record.timesteps)), (0, 1))
    calibrated, rederived = input_tables(bucketed_model(artifact, table)), input_tables(bucketed_model(artifact, table, scales="rederived"))
    for name in calibrated:
        torch.testing.assert_close(calibrated[name].step.detach(), rederived[name].step.detach(), rtol=1e-6, atol=0)


def test_an_unknown_scale_source_is_refused():
    with pytest.raises(UserError, match="Unknown --scales 'learned'; choose one of calibrated, rederived"):
        ExportConfig(scales="learned")


@pytest.mark.parametrize("tpq", [True, False])
def test_one_bucket_covers_every_calibrated_row_and_a_shared_row_serves_every_bucket(tiny_model_dirs, tmp_path, tpq):
    config = CalibConfig.from_bits("W8A8", method="minmax", tpq=tpq, samples=16, trajectories=4, steps=4)
    artifact = load_artifact(calibrate(tiny_model_dirs["unet"], config, tmp_path / "c", progress=False))
    grid = tuple(sorted(artifact.record.timesteps))
    for table in (BucketTable(grid, (0,)), BucketTable(grid, (0, 2))):
        scales = bucket_scales(artifact, table)
        for group in artifact.groups():
            steps, deployed = artifact.act_table(group)[0], scales.groups[group].steps
            if not tpq:  # the one shared row, in every bucket
                assert deployed.tolist() == pytest.approx([float(steps[0])] * len(table), rel=1e-6)
            elif len(table) == 1:  # symmetric min-max: the grid covering every calibrated row
                assert deployed.tolist() == pytest.approx([float(steps.max())], rel=1e-6)


def chunks(n: int, sizes: list[int]) -> list[tuple[int, int]]:
    """[0, n) split into consecutive pieces of the given sizes, cycled (the last one cut at n)."""
    pieces, start = [], 0
    for size in itertools.cycle(sizes):
        if start >= n:
            return pieces
        pieces.append((start, min(n, start + size)))
        start += size


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 10), st.lists(st.integers(1, 4), min_size=1, max_size=10), st.booleans(), st.integers(0, 2**16))
def test_min_max_observed_a_few_samples_at_a_time_is_bit_identical_to_one_batch(n, sizes, symmetric, seed):
    """What lets export observe large latents a few at a time: per-row min/max (the min-max tables export
    re-derives) and channel maxima reduce exactly over any split of the samples into forwards."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.tensor([0, 250, 500, 999])
    x = torch.randn(n, 3, 4, 4, generator=generator) * torch.rand(n, 1, 1, 1, generator=generator) * 10 + torch.randn(n, 1, 1, 1, generator=generator)
    t = grid[torch.randint(0, len(grid), (n,), generator=generator)]

    def observed(pieces):
        index = TimestepIndex(grid)
        observer = RowObserver(ActQuantizer(index, len(grid), 8, symmetric, channel_dim=1), None)
        for start, stop in pieces:
            index.set_timesteps(t[start:stop])
            observer.start_batch()
            observer.observe(x[start:stop])
        observer.finish("minmax")
        return observer

    whole, chunked = observed([(0, n)]), observed(chunks(n, sizes))
    for statistic in ("lo", "hi", "count", "channel_amax"):
        assert torch.equal(getattr(chunked, statistic), getattr(whole, statistic)), statistic
    assert torch.equal(chunked.quantizer.step, whole.quantizer.step) and torch.equal(chunked.quantizer.zero_point, whole.quantizer.zero_point)


def test_the_observation_batch_bounds_the_latent_values_per_forward():
    assert observation_batch(4 * 64 * 64, "cpu") == 1  # SD-1.5 size: one latent per forward
    assert observation_batch(4 * 128 * 128, "cpu") == 1  # SDXL size: one, however large
    assert observation_batch(4 * 16 * 16, "cpu") == 16  # the tests' tiny models: 16
    assert observation_batch(1 * 8 * 8, "cpu") == default_batch_size("cpu")  # small latents: the device's batch


def test_observing_a_few_samples_at_a_time_gives_the_tables_of_one_batch(tiny_model_dirs, tmp_path, monkeypatch):
    config = CalibConfig.from_bits("W8A8", method="minmax", samples=16, trajectories=4, steps=4)
    artifact = load_artifact(calibrate(tiny_model_dirs["unet"], config, tmp_path / "c", progress=False))
    table = BucketTable(tuple(sorted(artifact.record.timesteps)), (0, 2))
    outputs = frozenset(row["layer"] for row in artifact.quantized_layers())
    samples = len(artifact.calibration_data())
    batches = []  # the batch each observation pass ran at: the chunking is really exercised
    observe = rebucket.initialise_activations
    monkeypatch.setattr(rebucket, "initialise_activations", lambda *args, **kwargs: batches.append(args[4]) or observe(*args, **kwargs))
    one = bucket_scales(artifact, table, outputs, scales="rederived", batch_size=samples)
    chunked = bucket_scales(artifact, table, outputs, scales="rederived", batch_size=3)
    assert batches == [samples, 3] and samples % 3  # several forwards, the last one short
    assert list(chunked.groups) == list(one.groups) and any(group.output for group in one.groups.values())
    for name, group in one.groups.items():
        # min/max reduce exactly (above); the forward itself may round differently at another batch on some CPU kernels
        np.testing.assert_allclose(chunked.groups[name].steps, group.steps, rtol=1e-6, atol=0, err_msg=name)
        assert np.array_equal(chunked.groups[name].zero_points, group.zero_points), name
