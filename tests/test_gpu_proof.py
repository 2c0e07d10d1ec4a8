"""The measuring instrument (benchmarks/timing.py), the one-command GPU proof
(benchmarks/gpu_proof.py) and the tuned-config lookup the ops use."""

import dataclasses
import io
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import gpu_proof, timing
from benchmarks.weights import random_sparse_weight
from pallax.pallas_kernels import (
    QuantMatmulConfig,
    SparseWeight,
    _tuning,
    quantize,
    quantized_matmul,
    sparse,
    sparse_matmul,
)
from pallax.pallas_kernels import quantization as quantization_op
from pallax.pallas_kernels.sparse_matmul_mgpu import SpmmConfig
from pallax.testing import gpu_interpret

H100, H200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # [in, out]


def _formats(k, n):
    """Shape-only weights (no compute) of every format a benchmark rotates."""
    key = jax.random.key(0)
    w = jax.ShapeDtypeStruct((k, n), jnp.float32)
    formats = {
        "bf16": jax.ShapeDtypeStruct((k, n), jnp.bfloat16),
        "w8": jax.eval_shape(lambda w: quantize(w, bits=8), w),
        "w4": jax.eval_shape(lambda w: quantize(w, bits=4), w),
    }
    for sp in (0.5, 0.8, 0.9):
        formats[f"sparse{sp:.0%}"] = jax.eval_shape(
            lambda key, sp=sp: random_sparse_weight(key, k, n, sp), key
        )
    return formats


@pytest.mark.parametrize("kind", [H100, H200])
@pytest.mark.parametrize("k, n", SHAPES)
def test_rotation_moves_twice_the_l2_for_every_format(kind, k, n):
    l2 = timing.l2_bytes(kind)
    formats = _formats(k, n)
    # The formats really differ in size: sizing by dense bytes was the bug.
    assert timing.tree_nbytes(formats["w4"]) < 0.3 * timing.tree_nbytes(formats["bf16"])
    assert timing.tree_nbytes(formats["sparse90%"]) < 0.2 * timing.tree_nbytes(formats["bf16"])
    for name, weight in formats.items():
        nbytes = timing.tree_nbytes(weight)
        copies = timing.rotation_copies(nbytes, l2)
        assert copies * nbytes >= 2 * l2, (name, copies, nbytes)
        assert (copies - 1) * nbytes < 2 * l2 or copies == 2, name  # not more than needed


def test_l2_of_the_device_present(monkeypatch):
    assert timing.l2_bytes(H100) == 50 * 2**20
    assert timing.l2_bytes(H200) == 60 * 2**20
    assert timing.l2_bytes("NVIDIA B200") == timing.UNKNOWN_GPU_L2_BYTES
    # The CUDA runtime's figure (gpu_proof's env step) wins when larger.
    monkeypatch.setattr(timing, "device_kind", lambda: H100)
    monkeypatch.setenv(timing.L2_ENV, str(52 * 2**20))
    assert timing.l2_bytes() == 52 * 2**20
    monkeypatch.setenv(timing.L2_ENV, str(40 * 2**20))
    assert timing.l2_bytes() == 50 * 2**20


def test_timer_runs_many_calls_inside_one_dispatch():
    executed = []

    def fn(x, w):
        jax.debug.callback(lambda: executed.append(1))
        return x @ w

    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.standard_normal((4, 32)), jnp.float32) for _ in range(6)]
    ws = [jnp.asarray(rng.standard_normal((32, 16)), jnp.float32) for _ in range(6)]
    arg_sets = timing.rotating_arg_sets(xs, ws)
    # One program holds every call (6 dots), each on its own pair of buffers.
    text = timing.calls_program(fn).lower(arg_sets).as_text()
    assert len(re.findall(r"stablehlo.dot_general", text)) == 6
    # No operand is shared between calls (XLA would merge such dots).
    assert len({id(x) for x, _ in arg_sets}) == len({id(w) for _, w in arg_sets}) == 6
    result = timing.time_calls(fn, arg_sets, repeats=3)
    assert result.calls == 6 and result.method == "wall" and result.kernel_s is None
    assert result.dispatches == 4  # warm-up + 3 timed
    assert len(executed) == result.calls * result.dispatches
    assert 0 < result.seconds == result.e2e_s
    with pytest.raises(ValueError, match="distinct inputs"):
        timing.rotating_arg_sets(xs[:2], ws)


def test_benchmark_asking_for_mosaic_and_getting_xla_fails(monkeypatch):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 128)), jnp.bfloat16)
    qw = quantize(jnp.asarray(rng.standard_normal((128, 128)), jnp.float32), bits=8)

    def auto(x, w):
        return quantized_matmul(x, w)  # implementation=None: XLA on a CPU

    with pytest.raises(timing.ImplementationMismatch, match="asked for implementation='mosaic'"):
        timing.require_implementation("mosaic", auto, x, qw)
    assert timing.require_implementation("xla", auto, x, qw) == "xla"
    with gpu_interpret():
        forced = lambda x, w: quantized_matmul(x, w, implementation="mosaic")  # noqa: E731
        assert timing.require_implementation("mosaic", forced, x, qw) == "mosaic"

    # The silent fallback the issue names: on "Hopper", a failed sparse
    # self-check makes implementation=None trace XLA; the benchmark must fail.
    from pallax.pallas_kernels import _dispatch

    monkeypatch.setattr(_dispatch, "on_hopper", lambda: True)
    monkeypatch.setattr(sparse, "_mosaic_self_check", lambda: False)
    w = random_sparse_weight(jax.random.key(0), 128, 64, 0.8)
    with pytest.raises(timing.ImplementationMismatch):
        timing.require_implementation("mosaic", lambda x, w: sparse_matmul(x, w), x, w)


def test_random_sparse_weight_is_the_packed_format():
    w = random_sparse_weight(jax.random.key(1), 192, 128, 0.9)
    w.validate()
    repacked = SparseWeight.from_dense(np.asarray(w.todense()), mask=np.asarray(w.mask()))
    for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(repacked), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert abs(w.sparsity - 0.9) < 0.001 and w.values.dtype == jnp.bfloat16
    other = random_sparse_weight(jax.random.key(2), 192, 128, 0.9)
    assert not np.array_equal(np.asarray(w.bitmap), np.asarray(other.bitmap))
    with pytest.raises(ValueError, match="multiples of 64"):
        random_sparse_weight(jax.random.key(1), 100, 128, 0.9)


# ----------------------------------------------------------------------------
# Tuned configs


def _write_tuned(directory, kind, entries):
    path = directory / _tuning.device_file_name(kind)
    path.write_text(json.dumps({"device_kind": kind, "entries": entries}))
    _tuning.load.cache_clear()
    return path


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv(_tuning.TUNED_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(_tuning, "current_device_kind", lambda: "Fake GPU 9000")
    yield tmp_path
    _tuning.load.cache_clear()


def test_dispatch_reads_the_tuned_config_when_none_is_given(fake_gpu, monkeypatch):
    assert _tuning.device_file_name(H100) == "NVIDIA_H100_80GB_HBM3.json"
    key = _tuning.quantized_key(16, 256, 128, 4, None)
    assert key == {"mode": "w4a16", "in": 256, "out": 128, "tokens": 16}
    _write_tuned(
        fake_gpu,
        "Fake GPU 9000",
        [
            {"kernel": "quantized_matmul", "key": key, "config": {"block_n": 64, "k_splits": 2}},
            {
                "kernel": "sparse_matmul",
                "key": _tuning.sparse_key(8, 128, 64, 0.2),
                "config": {"decode": "dense", "max_concurrent_steps": 3},
            },
        ],
    )
    seen = []

    def spy(x, w, act_bits, config):  # stands in for the Mosaic kernels' dispatch
        seen.append(config)
        return jnp.zeros((*x.shape[:-1], w.out_features), x.dtype)

    monkeypatch.setattr(quantization_op, "_mosaic_matmul", spy)
    rng = np.random.default_rng(0)
    qw = quantize(jnp.asarray(rng.standard_normal((256, 128)), jnp.float32), bits=4)
    x = jnp.asarray(rng.standard_normal((16, 256)), jnp.bfloat16)
    quantized_matmul(x, qw, implementation="mosaic")
    assert seen[-1] == QuantMatmulConfig(block_n=64, k_splits=2)
    quantized_matmul(x[:9], qw, implementation="mosaic")  # 9 tokens: same bucket (16)
    assert seen[-1] == QuantMatmulConfig(block_n=64, k_splits=2)
    quantized_matmul(x[:1], qw, implementation="mosaic")  # no entry: kernel defaults
    assert seen[-1] is None
    given = QuantMatmulConfig(block_n=256)
    quantized_matmul(x, qw, implementation="mosaic", config=given)  # explicit wins
    assert seen[-1] is given

    sparse_seen = []
    monkeypatch.setattr(
        sparse.sparse_mgpu,
        "matmul",
        lambda x, w, config=None: sparse_seen.append(config) or jnp.zeros((x.shape[0], 64)),
    )
    w = random_sparse_weight(jax.random.key(0), 128, 64, 0.8)
    sparse_matmul(jnp.ones((8, 128), jnp.bfloat16), w, implementation="mosaic")
    assert sparse_seen[-1] == SpmmConfig(decode="dense", max_concurrent_steps=3)


def test_tuned_file_errors_name_the_file(fake_gpu, monkeypatch):
    key = _tuning.quantized_key(16, 256, 128, 4, None)
    path = _write_tuned(
        fake_gpu,
        "Fake GPU 9000",
        [{"kernel": "quantized_matmul", "key": key, "config": {"tile": 3}}],
    )
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*tile"):
        _tuning.lookup("quantized_matmul", QuantMatmulConfig, key)
    path.write_text("{not json")
    _tuning.load.cache_clear()
    with pytest.raises(ValueError, match="cannot be read as JSON"):
        _tuning.lookup("quantized_matmul", QuantMatmulConfig, key)
    _write_tuned(fake_gpu, "Fake GPU 9000", [{"kernel": "gemm", "key": {}, "config": {}}])
    with pytest.raises(ValueError, match="unknown kernel 'gemm'"):
        _tuning.lookup("quantized_matmul", QuantMatmulConfig, key)
    # A CPU (no GPU kind) never reads a file.
    monkeypatch.setattr(_tuning, "current_device_kind", lambda: None)
    assert _tuning.lookup("quantized_matmul", QuantMatmulConfig, key) is None


# ----------------------------------------------------------------------------
# The proof script


def test_budget_adds_up_to_under_nine_minutes():
    total = sum(step.timeout_s for step in gpu_proof.STEPS)
    assert total + gpu_proof.SUMMARY_RESERVE_S <= gpu_proof.BUDGET_S <= 9 * 60
    assert sum(s.timeout_s for s in gpu_proof.OPTIONAL_STEPS) <= 5 * 60
    # The docstring's table states the same timeouts and total.
    doc = gpu_proof.__doc__
    for step in gpu_proof.STEPS:
        row = re.search(rf"^\s+{step.name}\s.*?(\d+) s\s+(\S.*)?$", doc, re.M)
        assert row and f"{step.timeout_s} s" in row.group(0), step.name
    assert f"= {total} s" in doc
    assert [s.name for s in gpu_proof.STEPS][-2:] == ["time_spmm", "sweep"]
    assert gpu_proof.STEPS[0].name == "env"


def test_sweep_table_names_real_problems_and_knobs():
    from pallax.pallas_kernels import AttentionConfig

    classes = {
        "quantized_matmul": QuantMatmulConfig,
        "sparse_matmul": SpmmConfig,
        "attention": AttentionConfig,
    }
    for kernel, problem, kwargs in gpu_proof.SWEEP:
        assert gpu_proof.SWEEP_PROBLEMS[problem]["kernel"] == kernel
        config = dataclasses.replace(classes[kernel](), **kwargs)  # validates the values
        assert config != classes[kernel]() or kernel == "sparse_matmul"
    problems = {problem for _, problem, _ in gpu_proof.SWEEP}
    assert problems == set(gpu_proof.SWEEP_PROBLEMS)


PTXAS_LOG = """\
## case-begin w4a16 M=16 4096x14336
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'anonymous_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for anonymous_mosaic_gpu_kernel
    0 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 64 bytes smem, 400 bytes cmem[0]
## case-end w4a16 M=16 4096x14336
check w4a16 M=16 4096x14336: OK
"""


def test_ptxas_report_is_parsed_per_case():
    (kernel,) = gpu_proof.parse_ptxas(PTXAS_LOG)
    assert kernel == {
        "case": "w4a16 M=16 4096x14336",
        "function": "anonymous_mosaic_gpu_kernel",
        "stack": 0,
        "spill_stores": 8,
        "spill_loads": 12,
        "registers": 168,
        "smem_static": 64,
    }
    row = {"case": kernel["case"], "ok": True, "errors": {"out": 1e-3}, "tol": 1e-2}
    row["kernels"] = [{"grid": [1, 3, 112], "block": [256, 1, 1], "smem_dynamic": 169160}]
    step = {"status": "ok", "seconds": 9, "rows": [row], "ptxas": [kernel]}
    summary = gpu_proof.summarize({"dry_run": False, "steps": {"check_quant": step}})
    assert "regs 168 spill 8/12 stack 0 smem 169160" in summary
    assert "OK   w4a16 M=16 4096x14336" in summary


def test_a_hung_step_is_killed_at_its_deadline_and_keeps_its_output(tmp_path):
    step = gpu_proof.Step("hang", 2, 0, 1, "sleeps past its deadline")
    cmd = [sys.executable, "-u", "-c", "print('row 1', flush=True); import time; time.sleep(60)"]
    log = io.StringIO()
    info = gpu_proof.run_step_process(step, 2, None, log, cmd=cmd)
    assert info["status"].startswith("TIMEOUT") and info["seconds"] < 20
    assert "row 1" in info["output"] and "row 1" in log.getvalue()
    # Rows are on disk as they come, so a killed step keeps them.
    import os

    os.environ[gpu_proof.WORK_ENV] = str(tmp_path)
    try:
        rec = gpu_proof.Recorder("hang")
        rec.add(case="a", ok=True)
        assert json.loads((tmp_path / "hang.json").read_text()) == [{"case": "a", "ok": True}]
    finally:
        del os.environ[gpu_proof.WORK_ENV]


def test_dry_run_runs_every_step_on_the_cpu(tmp_path, monkeypatch, capsys):
    for name in (gpu_proof.OUT_ENV, gpu_proof.DRY_ENV):  # restored after the test
        monkeypatch.setenv(name, "")
    monkeypatch.setenv(_tuning.TUNED_DIR_ENV, str(tmp_path / "untuned"))
    code = gpu_proof.main(["--dry-run", "--in-process", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert code == 0, {n: s["status"] for n, s in results["steps"].items()}
    assert list(results["steps"]) == [s.name for s in gpu_proof.STEPS]
    checks = [
        r for n in results["steps"] if n.startswith("check_") for r in results["steps"][n]["rows"]
    ]
    assert len(checks) == 11 and all(r["ok"] for r in checks)  # 3 quant, 2 decode, 4 attn, 2 spmm
    assert any(" d256" in r["case"] for r in results["steps"]["check_attention"]["rows"])
    times = results["steps"]["time_quant"]["rows"]
    assert [r["m"] for r in times] == [1, 16, 64]
    assert all(
        v["implementation"] == "xla"
        for v in times[0]["times"].values()
        if "implementation" in v and v["implementation"]
    )
    # The compact table is the last thing printed, and is saved.
    summary = (tmp_path / "summary.txt").read_text()
    assert capsys.readouterr().out.rstrip().endswith(summary.rstrip())
    assert "-- correctness vs XLA" in summary and "FAIL" not in summary
    tuned = tmp_path / _tuning.device_file_name("cpu")
    if tuned.exists():  # winners (from noise, on a CPU) still form a valid file
        assert _tuning.load.__wrapped__(str(tuned))


def test_a_failing_case_is_recorded_and_the_step_goes_on():
    rec = gpu_proof.Recorder("check_x")
    done = []
    for name in ("breaks", "works"):
        with gpu_proof.Case(name, rec):
            if name == "breaks":
                raise RuntimeError("Mosaic GPU kernel exceeds available shared memory")
            done.append(name)
    assert done == ["works"]
    assert rec.rows[0]["case"] == "breaks" and not rec.rows[0]["ok"]
    assert "shared memory" in rec.rows[0]["error"]
    summary = gpu_proof.summarize(
        {
            "dry_run": True,
            "steps": {"check_quant": {"status": "ok", "seconds": 1, "rows": rec.rows}},
        }
    )
    assert "FAIL breaks" in summary


def test_optional_command_steps_call_the_benchmarks_with_valid_flags(monkeypatch):
    from benchmarks import generation, train

    assert {s.name for s in gpu_proof.OPTIONAL_STEPS} <= set(gpu_proof.STEP_FUNCTIONS)
    seen = {}
    monkeypatch.setattr(generation, "run", lambda *a: seen.setdefault("generation", a) and [])
    monkeypatch.setattr(train, "GPU_RUNS", ())  # parse the flags, run nothing
    monkeypatch.setattr(train, "QUICK_RUNS", ())
    monkeypatch.setenv(gpu_proof.DRY_ENV, "0")
    gpu_proof.step_generation(gpu_proof.Recorder("generation"))
    config, batches, prompt, new, variants = seen["generation"]
    assert config is generation.ONE_B and new == 64 and variants[0] == "dense"
    gpu_proof.step_train(gpu_proof.Recorder("train"))
    assert timing.rotation_copies(1000, 10**6, max_copies=3) == 3


def test_smem_hook_records_a_real_lowering_and_comes_off():
    """The resource report's hook wraps Mosaic GPU's lowering, which jax 0.11.2
    calls with keyword arguments: it must record grid / block / dynamic smem and
    still lower (a positional-only wrapper broke every later kernel lowering)."""
    from jax.experimental.mosaic.gpu import core as mgpu_core

    from pallax.pallas_kernels import quantized_matmul
    from pallax.testing import lower_for_cuda

    original = mgpu_core._lower_as_gpu_kernel
    before = len(gpu_proof._LOWERED)
    uninstall = gpu_proof.install_smem_hook()
    try:
        qw = jax.eval_shape(lambda w: quantize(w, bits=4), jnp.zeros((256, 256), jnp.float32))
        x = jax.ShapeDtypeStruct((16, 256), jnp.bfloat16)
        lower_for_cuda(lambda x, w: quantized_matmul(x, w, implementation="mosaic"), x, qw)
        (row,) = gpu_proof._LOWERED[before:]
        assert row["smem_dynamic"] > 0 and len(row["grid"]) == 3 and row["block"][0] % 128 == 0
    finally:
        uninstall()
    assert mgpu_core._lower_as_gpu_kernel is original
