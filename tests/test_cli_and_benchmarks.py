"""The README's main job and the benchmark script stay runnable."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_attention_benchmark_quick():
    from benchmarks import attention

    rows = attention.main(["--quick", "--modes", "fwd"])
    assert rows and all("pallax" in r[3] and r[3]["pallax"] > 0 for r in rows)
    # The windowed runs count fewer FLOPs than full causal at the same length.
    by_window = {r[2]: r[4] for r in rows if r[1] == 2048}
    assert by_window["w128"] < by_window["w1024"] < by_window["causal"]


def test_cli_rejects_unknown_command():
    result = subprocess.run(
        [sys.executable, "-m", "pallax", "train-everything"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_quant_matmul_benchmark_quick():
    from benchmarks import quant_matmul

    rows = quant_matmul.main(["--quick"])
    assert [r[0] for r in rows] == [1, 16]
    for _, _, _, times in rows:
        assert {"bf16", "int8dot", "w8a16", "w4a16", "w8a8"} <= set(times)


def test_spmm_benchmark_quick():
    from benchmarks import spmm

    rows = spmm.main(["--quick"])
    assert len(rows) == 4 and all(r[4] > 0 and r[5]["xla"] > 0 for r in rows)


def test_generation_benchmark_quick():
    from benchmarks import generation

    rows = generation.main(["--quick"])
    assert {r[0] for r in rows} == {"dense", "w8", "w4", "sparse50", "sparse70"}
    assert all(r[2] > 0 for r in rows)


def test_generation_benchmark_gemma_like_quick():
    """The Gemma-like configuration (local/global layers, soft caps) decodes past its window."""
    from benchmarks import generation

    rows = generation.main(["--quick", "--model", "gemma", "--variants", "dense,w4"])
    assert [r[0] for r in rows] == ["dense", "w4"] and all(r[2] > 0 for r in rows)


def test_train_benchmark_quick():
    from benchmarks import train

    rows = train.main(["--quick", "--steps", "1"])
    assert len(rows) == 3 and all(r[1] > 0 and r[2] > 0 for r in rows)


def test_generation_prunes_the_bf16_model():
    """Sparse variants store bf16 nonzeros (pruned after the cast), so they read
    fewer bytes than dense bf16, as they do in a served model."""
    from benchmarks import generation
    from pallax.models.convert import linears
    from pallax.pallas_kernels import SparseWeight

    dense = generation.build_variant("dense", generation.TINY)
    sparse = generation.build_variant("sparse50", generation.TINY)
    kernels = [layer.kernel.get_value() for _, layer in linears(sparse)]
    kernels = [w for w in kernels if isinstance(w, SparseWeight)]
    assert kernels and {str(w.values.dtype) for w in kernels} == {"bfloat16"}
    assert generation.weight_bytes(sparse) < generation.weight_bytes(dense)
