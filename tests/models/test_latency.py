"""Latency: the per-part decomposition covers every layer, a table predicts the sum of its entries plus its
overhead, a saved table is refused under another identity, and measurements are sane (no timing thresholds:
the machine running the tests may be busy)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from models import build_subnet, load_search_space
from models.families import family_of
from models.flops import subnet_cost
from models.latency import (
    LatencyTable,
    Settings,
    TableMismatch,
    identity,
    main,
    measure,
    open_table,
    prediction_metrics,
    random_archs,
    table_path,
)
from models.mbconv.subnet_plan import plan_subnet

NUM_CLASSES = 10
FAST = {"runs": 3, "warmup": 1, "threads": 1}


@pytest.fixture(scope="module")
def archs(tiny_space):
    return [tiny_space.smallest(), tiny_space.largest(), *random_archs(tiny_space, 6, seed=3)]


def parts_of(space, arch):
    return family_of(space).latency_parts(space, arch, NUM_CLASSES)


def counted_macs(module: nn.Module, example: torch.Tensor) -> int:
    """Multiply-adds of every convolution and linear layer ``module`` runs on ``example`` (one sample), read
    from the shapes the layers see, not from any cost formula."""
    total = 0

    def hook(layer, inputs, output):
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            total += output.numel() * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)
        else:
            total += layer.in_features * layer.out_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        with torch.no_grad():
            module.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
    return total


def test_parts_cover_every_layer(tiny_space, archs):
    """The parts' multiply-adds and parameters add up to models.flops' count of the whole sub-network; each
    part's output is the next part's input; one part per block plus the stem and the head."""
    for arch in archs:
        parts = parts_of(tiny_space, arch)
        assert len(parts) == len(plan_subnet(tiny_space, arch).blocks) + 2
        macs = params = 0
        for part, following in zip(parts, [*parts[1:], None]):
            module = part.build()
            example = torch.randn(1, *part.input_shape).contiguous(memory_format=torch.channels_last)
            macs += counted_macs(module, example)
            params += sum(p.numel() for p in module.parameters())
            with torch.no_grad():
                out = module(example)
            if following is not None:
                assert tuple(out.shape[1:]) == following.input_shape, part.key
            else:
                assert tuple(out.shape) == (1, NUM_CLASSES)
        cost = subnet_cost(tiny_space, arch, NUM_CLASSES)
        assert (macs, params) == (cost.macs, cost.params), arch


def test_parts_compute_the_model(tiny_space):
    """The parts, given the standalone model's weights and run in order, give its logits: they run its operators."""
    arch = tiny_space.largest()
    torch.manual_seed(0)
    model = build_subnet(tiny_space, arch, NUM_CLASSES).eval()
    with torch.no_grad():  # BN away from identity, so that a part skipping one would show
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
    state = model.state_dict()
    parts = parts_of(tiny_space, arch)
    modules = [part.build().eval() for part in parts]
    modules[0].load_state_dict({k: state[f"stem_{k}"] for k in modules[0].state_dict()})
    for i, module in enumerate(modules[1:-1]):
        module.load_state_dict({k: state[f"blocks.{i}.{k}"] for k in module.state_dict()})
    modules[-1].load_state_dict({k: state[k] for k in modules[-1].state_dict()})
    x = torch.randn(2, 3, arch.resolution, arch.resolution)
    with torch.no_grad():
        expected = model(x)
        h = x.contiguous(memory_format=torch.channels_last)
        for module in modules:
            h = module(h)
    torch.testing.assert_close(h, expected, rtol=1e-4, atol=1e-5)


def test_all_parts_hold_every_part_of_any_arch(tiny_space, archs):
    every = family_of(tiny_space).all_latency_parts(tiny_space, NUM_CLASSES)
    keys = [part.key for part in every]
    assert len(keys) == len(set(keys))
    for arch in [*archs, *random_archs(tiny_space, 40, seed=11)]:
        assert {part.key for part in parts_of(tiny_space, arch)} <= set(keys)


def dyadic_table(space, parts, overhead: float) -> LatencyTable:
    """Entries that are multiples of 1/1024, so that any order of summing them is exact."""
    table = LatencyTable(identity=identity(space, Settings(**FAST), NUM_CLASSES), overhead_ms=overhead)
    for i, part in enumerate(sorted({p.key for p in parts})):
        table.entries[part] = (37 * i % 101 + 1) / 1024
    return table


def test_prediction_is_the_sum_of_entries_plus_the_overhead(tiny_space, archs):
    every = family_of(tiny_space).all_latency_parts(tiny_space, NUM_CLASSES)
    table = dyadic_table(tiny_space, every, overhead=0.125)
    largest = parts_of(tiny_space, tiny_space.largest())
    assert len({p.key for p in largest}) < len(largest)  # a repeated block: counted once per run
    for arch in archs:
        expected = 0.125
        for part in parts_of(tiny_space, arch):
            expected += table.entries[part.key]
        assert table.predict(tiny_space, arch) == expected
    table.correction = (2.0, 0.5)  # a fitted correction replaces the overhead
    parts = parts_of(tiny_space, archs[1])
    assert table.predict(tiny_space, archs[1]) == 2.0 * sum(table.entries[p.key] for p in parts) + 0.5


def test_prediction_needs_every_entry_and_an_overhead(tiny_space):
    parts = parts_of(tiny_space, tiny_space.smallest())
    table = dyadic_table(tiny_space, parts[1:], overhead=0.0)
    with pytest.raises(KeyError, match="not in the table"):
        table.predict(tiny_space, tiny_space.smallest())
    table = dyadic_table(tiny_space, parts, overhead=0.0)
    table.overhead_ms = None
    with pytest.raises(ValueError, match="no overhead"):
        table.predict(tiny_space, tiny_space.smallest())


def test_table_reloads_and_is_refused_under_another_identity(tiny_space, tmp_path):
    parts = family_of(tiny_space).all_latency_parts(tiny_space, NUM_CLASSES)
    table = dyadic_table(tiny_space, parts, overhead=0.25)
    table.correction = (1.5, -0.25)
    path = table_path(tmp_path, table.identity)
    assert path.name.endswith(f"-eager-1t-b1-{tiny_space.name}.json")
    table.save(path)

    again = LatencyTable.load(path, dict(table.identity))
    assert again == table
    assert open_table(path, dict(table.identity)) == table
    for key, value in [("threads", 2), ("backend", "onnx"), ("batch", 8), ("torch", "0.0"), ("space_sha256", "x")]:
        other = {**table.identity, key: value}
        with pytest.raises(TableMismatch, match=key):
            LatencyTable.load(path, other)
        with pytest.raises(TableMismatch):
            open_table(path, other)
        assert open_table(path, other, rebuild=True).entries == {}
    other_space = identity(load_search_space("alphanet"), Settings(**FAST), NUM_CLASSES)
    with pytest.raises(TableMismatch, match="space"):
        LatencyTable.load(path, other_space)


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_measurement_is_sane(tiny_space, backend):
    threads_before = torch.get_num_threads()
    settings = Settings(backend=backend, batch=3, **FAST)
    arch = tiny_space.smallest()
    whole = measure(build_subnet(tiny_space, arch, NUM_CLASSES), (3, arch.resolution, arch.resolution), settings)
    part = parts_of(tiny_space, arch)[1]
    alone = measure(part.build(), part.input_shape, settings, channels_last_input=True)
    for timing in (whole, alone):
        assert (timing.backend, timing.batch, timing.threads, timing.runs) == (backend, 3, 1, 3)
        assert timing.median_ms > 0 and math.isfinite(timing.median_ms)
        assert timing.iqr_ms >= 0
    assert torch.get_num_threads() == threads_before


def test_calibration_sets_the_median_gap(tiny_space, tmp_path):
    settings = Settings(**FAST)
    table = LatencyTable(identity=identity(tiny_space, settings, NUM_CLASSES))
    archs = [tiny_space.smallest(), tiny_space.largest(), random_archs(tiny_space, 1, seed=5)[0]]
    path = tmp_path / "table.json"
    table.calibrate(tiny_space, archs, settings, save_to=path)
    gaps = sorted(c["measured_ms"] - c["sum_ms"] for c in table.calibration)
    assert table.overhead_ms == gaps[1]
    for record, arch in zip(table.calibration, archs):
        assert record["sum_ms"] == table.sum_ms(parts_of(tiny_space, arch)) and record["measured_ms"] > 0
    assert LatencyTable.load(path, table.identity).entries == table.entries  # saved as it was filled


def test_prediction_metrics():
    m = prediction_metrics([1.0, 2.1, 3.6], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0])
    assert m["count"] == 3
    assert m["mape_pct"] == pytest.approx(100 * (0 + 0.05 + 0.2) / 3)
    assert m["within_10pct"] == pytest.approx(2 / 3)
    assert m["kendall_tau"] == pytest.approx(1.0)
    assert m["flops_kendall_tau"] == pytest.approx(-1.0)


def test_cli_measures_builds_and_evaluates(repo, tmp_path):
    out = tmp_path / "measure.json"
    fast = ["--runs", "2", "--warmup", "0", "--threads", "1", "--num-classes", str(NUM_CLASSES)]
    assert (
        main(
            [
                "measure",
                str(repo / "configs/tiny_models.yaml"),
                "--backends",
                "eager",
                "--batches",
                "2",
                "--json",
                str(out),
                *fast,
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())["models"]
    assert [r["name"] for r in rows] == ["tiny_s", "tiny_m", "tiny_l"]
    assert all(r["latency"]["eager@b2"]["batch"] == 2 and r["latency"]["eager@b2"]["median_ms"] > 0 for r in rows)

    table = tmp_path / "tiny.json"
    common = ["--space", "tiny", "--table", str(table), "--calibration", "2", *fast]
    assert main(["table", *common]) == 0
    report = tmp_path / "eval.json"
    assert main(["evaluate", *common, "--held-out", "2", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["metrics"]["count"] == 2 and len(result["archs"]) == 2
    calibrated = [r["arch"] for r in json.loads(table.read_text())["calibration"]]
    assert not any(row["arch"] in calibrated for row in result["archs"])  # held out
    with pytest.raises(SystemExit, match="another identity"):
        main(["evaluate", *common, "--threads", "2", "--held-out", "2"])


def test_a_family_without_a_decomposition_says_so():
    space = load_search_space("tiny_slim_mbv2")
    with pytest.raises(NotImplementedError, match="no per-block latency"):
        family_of(space).latency_parts(space, space.largest(), NUM_CLASSES)
