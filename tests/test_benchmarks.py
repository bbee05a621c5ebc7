"""Smoke runs of the benchmark entry points on toy shapes (no timing is asserted), and the
released-code reference layer of the layer benchmark against the library's layer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import budgets as budgets_bench  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks import cpu_kernels as kernels_bench  # noqa: E402
from benchmarks import eval as eval_bench  # noqa: E402
from benchmarks import layer as layer_bench  # noqa: E402
from benchmarks import model as model_bench  # noqa: E402
from camex import list_variants, tracking  # noqa: E402
from camex.merging import curvature, kronecker_apply, merge, nearest_factors  # noqa: E402


@pytest.fixture
def one_thread():
    """The harness sets the thread count of the process; give it back afterwards."""
    threads = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(threads)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def test_layer_benchmark_smoke(tmp_path, one_thread):
    out = tmp_path / "layer.json"
    layer_bench.main(["--tiny", "--repeats", "1", "--warmup", "0", "--out", str(out), *one_thread])
    data = json.loads(out.read_text())
    assert data["environment"]["commit"] == tracking.git_commit() != ""
    assert set(data["shapes"]) == {"t5", "gpt2"}
    for result in data["shapes"].values():
        cases = result["cases"]
        assert list(cases) == layer_bench.ALL_CASES
        for name, row in cases.items():
            assert _positive(row["median_ms"]), (name, row)
            assert _positive(row["peak_mb"]), (name, row)
            assert _positive(row["x_dense_time"]), (name, row)
            assert _positive(row["gflop"]) and _positive(row["gflop_per_s"]), (name, row)
        for name in ("camex_r1", "camex_r8", "released_r1", "released_r8"):
            assert _positive(cases[name]["x_released_time"]) and _positive(cases[name]["x_released_memory"])
        assert {t["target"] for t in result["targets"]} >= {"camex_r1 time × released_r1", "euclid time × dense"}


def test_layer_benchmark_counts_the_matmuls_each_case_executes(monkeypatch):
    """Golden counts on the tiny T5 shape: the dense linear's three products; the curvature pass
    at r = 1, which per entry and expert runs every mode forward, every mode again for ∂τ and for
    the factor gradients, and recomputes all partial products but the last; and the merged
    linear in tiles of one row that does not keep its weights, which rebuilds them in its backward
    pass and otherwise does the same products (every one of them counted). Euclidean merging
    takes `τ = E − E_m` inside the merged linear's tiles, so its score gradient adds one
    `⟨∂Ŵ_u, E_m⟩` product per unit that CAMEx (merging curved domain vectors) does not run."""
    shape = layer_bench.TINY["t5"]
    x, grad_y = layer_bench.make_inputs(shape, torch.device("cpu"), torch.float32, grad=True)

    def gflop(name: str) -> float:
        return common.matmul_gflop(layer_bench.train_step(layer_bench.build_module(name, shape), x, grad_y))

    o, i, n = shape.out_features, shape.in_features, shape.experts
    assert gflop("dense") * 1e9 == pytest.approx(3 * 2 * shape.tokens * i * o)
    dims = [*nearest_factors(o), *nearest_factors(i)]
    per_entry = 4 * sum(dims) - max(dims[0], dims[-1])  # the larger outer mode is not recomputed
    base_dot = 2 * shape.units * o * i
    assert (gflop("camex_r1") - gflop("euclid")) * 1e9 == pytest.approx(2 * n * o * i * per_entry - base_dot)
    kept = gflop("euclid")
    monkeypatch.setattr(merge, "CPU_BLOCK_BYTES", 1)
    monkeypatch.setattr(merge, "CPU_KEEP_BYTES", 0)
    assert (gflop("euclid") - kept) * 1e9 == pytest.approx(2 * shape.units * n * o * i)


def test_eval_benchmark_smoke(tmp_path, one_thread):
    out = tmp_path / "eval.json"
    eval_bench.main(["--tiny", "--repeats", "1", "--shapes", "gpt2", "--out", str(out), *one_thread])
    cases = json.loads(out.read_text())["shapes"]["gpt2"]["cases"]
    assert list(cases) == list(eval_bench.CASES)
    for name, row in cases.items():
        assert _positive(row["median_ms"]) and _positive(row["peak_mb"]) and _positive(row["x_euclid_time"]), name


def test_model_benchmark_smoke(tmp_path, one_thread):
    out = tmp_path / "model.json"
    args = ["--repeats", "1", "--warmup", "0", "--batch", "2", "--length", "16", "--experts", "2", "--out", str(out)]
    model_bench.main([*args, *one_thread])
    models = json.loads(out.read_text())["models"]
    assert set(models) == {"t5", "gpt2"}
    for result in models.values():
        assert list(result["variants"]) == list_variants()
        for name, row in result["variants"].items():
            assert _positive(row["tokens_per_s"]) and _positive(row["counted_flops_per_token"]), name
            assert row["parameters"]["total"] > 0 and row["mfu"] is None  # no MFU on CPU without a peak


def test_model_benchmark_times_a_bert_classifier_against_domain_merging(tmp_path, one_thread):
    """The MiniLM family (tiny here): variants side by side, each step also as a ratio to the
    Domain-specific (Euclidean) variant, the reference of issue 20's whole-model target."""
    out = tmp_path / "model.json"
    args = ["--models", "bert", "--variants", "dense", "domain", "camex", "--repeats", "1", "--warmup", "0"]
    model_bench.main([*args, "--batch", "2", "--length", "16", "--experts", "2", "--out", str(out), *one_thread])
    result = json.loads(out.read_text())["models"]["bert"]
    assert not result["sequential"] and list(result["variants"]) == ["dense", "domain", "camex"]
    rows = result["variants"]
    assert rows["domain"]["x_domain_time"] == 1.0 and _positive(rows["camex"]["x_domain_time"])


@pytest.mark.parametrize("shape", ["t5", "gpt2", "minilm"])
@pytest.mark.parametrize("rank", [1, 3])
def test_released_reference_computes_the_same_layer(shape, rank):
    """The benchmark's released-code formulation is the same maths as `MergedExpertLinear`."""
    torch.manual_seed(0)
    spec = layer_bench.TINY[shape]
    ours = layer_bench.build_merged(spec, "none", rank).double()
    ref = layer_bench.ReleasedMergedLinear(layer_bench.build_merged(spec, "none", rank).double())
    ref.layer.load_state_dict(ours.state_dict())
    for m in (ours, ref):
        m.eval()  # noiseless routing: both see the same scores
    x = torch.randn(spec.batch, spec.length, spec.in_features, dtype=torch.float64)
    y_ours, y_ref = ours(x), ref(x)
    torch.testing.assert_close(y_ours, y_ref, rtol=0, atol=1e-10)
    upstream = torch.randn_like(y_ours)
    g_ours = torch.autograd.grad(y_ours, list(ours.parameters()), upstream, allow_unused=True)
    g_ref = torch.autograd.grad(y_ref, list(ref.layer.parameters()), upstream, allow_unused=True)
    for a, b in zip(g_ours, g_ref):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_gpu_check_summary_reads_what_the_benchmarks_write(tmp_path, one_thread):
    """The pieces of scripts/gpu_check.sh that run without a GPU: its shell syntax, the layer
    benchmark under bf16 autocast, and the summary JSON built from what the steps wrote."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    assert subprocess.run(["bash", "-n", str(root / "scripts" / "gpu_check.sh")]).returncode == 0
    sys.path.insert(0, str(root / "scripts"))
    import gpu_check_summary

    args = ["--tiny", "--repeats", "1", "--warmup", "0", "--shapes", "t5", "--no-memory"]
    cases = ["--cases", "dense", "euclid", "camex_r1", "camex_r8"]
    layer_bench.main(
        [*args, *cases, "--dtype", "bfloat16", "--autocast", "--out", str(tmp_path / "layer_bf16.json"), *one_thread]
    )
    (tmp_path / "steps.tsv").write_text("layer_bf16\t0\t3\ntrain_bert\tskipped\t0\n")
    assert gpu_check_summary.main([str(tmp_path)]) == 0
    layer = json.loads((tmp_path / "layer_bf16.json").read_text())
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert layer["settings"]["autocast"] is True and layer["settings"]["dtype"] == "bfloat16"
    got = summary["layer"]["t5/bf16"]
    for name, row in layer["shapes"]["t5"]["cases"].items():
        assert got["cases"][name] == {"ms": row["median_ms"], "x_dense": row["x_dense_time"]}
    assert {t["target"] for t in got["targets"]} >= {"camex_r1 time × dense", "camex_r8 time × dense"}
    assert summary["steps"] == {
        "layer_bf16": {"exit": 0, "seconds": 3},
        "train_bert": {"exit": "skipped", "seconds": 0},
    }
    assert summary["commit"] == tracking.git_commit()
    assert gpu_check_summary.main([str(tmp_path / "missing")]) == 2


def test_cpu_clock_times_one_thread_and_refuses_several(tmp_path, one_thread, capsys):
    """`--clock cpu` (process CPU time, blind to waiting for a shared core) is recorded with the
    results; with several threads it would sum them, so it is refused in one line, exit status 2,
    before anything is written."""
    out = tmp_path / "layer.json"
    args = ["--tiny", "--repeats", "1", "--shapes", "t5", "--cases", "dense", "euclid", "--no-memory"]
    try:
        data = layer_bench.main([*args, "--clock", "cpu", "--out", str(out), *one_thread])
        assert data["settings"]["clock"] == "cpu" and _positive(data["shapes"]["t5"]["cases"]["euclid"]["median_ms"])
        refused = tmp_path / "refused.json"
        with pytest.raises(SystemExit) as exit_info:
            layer_bench.main([*args, "--clock", "cpu", "--threads", "2", "--out", str(refused)])
        assert exit_info.value.code == 2 and not refused.exists()
        assert capsys.readouterr().err.strip().startswith("--clock cpu:")
    finally:
        common.set_clock("wall")


@pytest.mark.parametrize("mode", ["reuse", "system"])
def test_the_layer_benchmark_allocates_as_asked_and_records_it(tmp_path, one_thread, monkeypatch, mode):
    asked = []
    monkeypatch.setattr(common, "reuse_freed_memory", lambda enabled: asked.append(enabled) or True)
    out = tmp_path / "layer.json"
    data = layer_bench.main(["--tiny", "--repeats", "1", "--warmup", "0", "--cases", "dense", "--shapes", "t5",
                             "--no-memory", "--host-memory", mode, "--out", str(out), *one_thread])  # fmt: skip
    assert asked == [mode == "reuse"]  # reuse is what training does (trainer.reuse_host_memory)
    assert data["settings"]["host_memory"] == mode == json.loads(out.read_text())["settings"]["host_memory"]


def test_the_budgets_benchmark_runs_each_case_under_each_budget_and_restores_them(tmp_path, one_thread, monkeypatch):
    seen = []
    build = budgets_bench.layer.build_module

    def spy(name, shape):  # record the budgets each merged case's forward runs under
        module = build(name, shape)
        if name != "dense":
            module.register_forward_pre_hook(lambda *_: seen.append(budgets()))
        return module

    def budgets():  # the cache-sized cap too: a block is at most the budget given, whatever the expert's size
        return merge.CPU_BLOCK_BYTES, curvature.CPU_BLOCK_BYTES, curvature.CPU_CACHE_BLOCK_BYTES

    monkeypatch.setattr(budgets_bench.layer, "build_module", spy)
    kept = budgets()
    out = tmp_path / "budgets.json"
    budgets_bench.main(["--tiny", "--repeats", "1", "--warmup", "0", "--budgets", "1,2", "3,4", "--out", str(out),
                        *one_thread])  # fmt: skip
    cases = json.loads(out.read_text())["cases"]
    assert list(cases) == ["dense", "euclid 1,2", "euclid 3,4", "camex_r1 1,2", "camex_r1 3,4"]
    assert all(_positive(row["median_ms"]) and _positive(row["x_dense_time"]) for row in cases.values())
    mib = 2**20
    assert seen == [(1 * mib, 2 * mib, 2 * mib), (3 * mib, 4 * mib, 4 * mib)] * 2  # one forward per (case, budget)
    assert budgets() == kept


def test_the_budgets_benchmark_times_cpu_kernels_on_and_off_and_restores_them(tmp_path, one_thread, monkeypatch):
    seen = []
    build = budgets_bench.layer.build_module

    def spy(name, shape):  # record the kernel setting each merged case's forward runs under
        module = build(name, shape)
        if name != "dense":
            module.register_forward_pre_hook(lambda *_: seen.append((curvature.CPU_KERNELS, merge.CPU_KERNELS)))
        return module

    monkeypatch.setattr(budgets_bench.layer, "build_module", spy)
    out = tmp_path / "budgets.json"
    budgets_bench.main(["--tiny", "--repeats", "1", "--warmup", "0", "--budgets", "1,2", "--cases", "camex_r1",
                        "--cpu-kernels", "auto", "curvature", "off", "--threads", "1", "--out", str(out)])  # fmt: skip
    cases = json.loads(out.read_text())["cases"]
    assert list(cases) == ["dense", "camex_r1 1,2", "camex_r1 1,2 kernels curvature", "camex_r1 1,2 kernels off"]
    assert [cases[k]["cpu_kernels"] for k in list(cases)[1:]] == ["auto", "curvature", "off"]
    assert seen == [(None, None), (None, False), (False, False)]  # (curvature's, the merge's)
    assert curvature.CPU_KERNELS is None and merge.CPU_KERNELS is None


def test_the_cpu_kernels_benchmark_times_every_pass_both_ways(tmp_path, one_thread):
    from camex.kernels import cpu_kron

    if not cpu_kron.available():
        pytest.skip("no compiled CPU kernel here")
    out = tmp_path / "kernels.json"
    kernels_bench.main(["--tiny", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["settings"]["dims"] == [4, 5, 3, 4]  # nearest_factors(20), nearest_factors(12)
    assert len(data["passes"]) == 3 * 4  # per mode: product, transposed product, contraction
    for row in data["passes"].values():
        assert _positive(row["kernel_ms"]) and _positive(row["pytorch_ms"]) and _positive(row["speedup"])
    assert curvature.CPU_KERNELS is None


def test_flop_counts_see_the_products_the_cpu_kernel_runs(one_thread):
    """The compiled kernel runs outside PyTorch's dispatcher; the count takes PyTorch's GEMMs."""
    from camex.kernels import cpu_kron

    if not cpu_kron.available():
        pytest.skip("no compiled CPU kernel here")
    torch.set_num_threads(1)  # where the kernel runs
    tau = torch.randn(2, 12, 6, requires_grad=True)
    factors = [torch.eye(d).expand(1, 2, d, d).clone() for d in (3, 4, 2, 3)]
    gflop = common.matmul_gflop(lambda: kronecker_apply(tau, factors).sum().backward())
    assert gflop * 1e9 == pytest.approx(2 * 2 * 12 * 6 * (3 + 4 + 2 + 3) * 2)  # forward + ∂τ: 4 modes each


def test_the_budgets_benchmark_refuses_a_malformed_budget_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        budgets_bench.main(["--budgets", "8"])
    assert exit_.value.code == 2
    assert "budget '8': two whole MiB counts: merge,curvature" in capsys.readouterr().err
