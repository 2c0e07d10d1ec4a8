"""The one prepared GPU command: every kernel checked on the device, the headline
ratios timed on the device, and a variant sweep with the time left.

    python -m benchmarks.gpu_proof              # on an H100/H200: < 9 minutes
    python -m benchmarks.gpu_proof --optional   # second command, < 5 minutes
    python -m benchmarks.gpu_proof --dry-run    # CPU: same steps, tiny shapes (CI)

Through the device tool, from the repository root (jax 0.11.2 is preinstalled
there; nothing to install):

    PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_proof

Everything goes to ``$OUT`` (default ``benchmarks/logs/proof``) as well as
stdout: ``proof.log`` (every step's output, ptxas reports included),
``results.json`` (all rows), ``summary.txt`` (the compact table, also the
last lines printed) and ``<device kind>.json`` (the sweep's winners, to copy
into ``pallax/pallas_kernels/tuned/``). Each step runs as its own process
with its own deadline, so a hang costs that step only; a killed step keeps
the rows it had written.

Steps, most decisive first, with the budget on an H100 (estimate = process
start ~8 s + compiles x ~3 s each (Pallas lowering + ptxas; the lowering alone
took 0.5-3 s per kernel on this project's shared, loaded 2-core CPU, see
``lower_for_cuda``) + runs; the timeout is what a step may take at most). The
orchestrator also holds a 540 s deadline for the whole command (device tool:
``timeout_s=600``), so a late step is shortened or skipped, never the summary:

    step             compiles  estimate  timeout
    env                     0      15 s     30 s   device, driver, jax, date, L2 (CUDA runtime)
    check_quant             3      25 s     45 s   W4A16, W8A16 (M=16), W8A8 (M=4096) vs XLA
    check_decode            2      20 s     35 s   decode: window; ring + soft cap 50
    check_attention        12      70 s     90 s   fwd+bwd: causal, window 1024, + soft cap; hd 256
    check_sparse            2      20 s     40 s   SpMM 80%, both decodes, + the self-check
    time_attention         15      80 s    105 s   causal 8k, window 4k @ 32k (+ soft cap)
    time_quant              6      35 s     55 s   4096x14336 M=1,16 (W4/W8A16), M=4096 (W8A8)
    time_spmm               3      25 s     45 s   N=16 at 50/80/90% sparsity
    sweep              ~1 each   the rest  <=  85 s   SWEEP table, winners -> tuned json
    total                        ~290 s + sweep; timeouts 30+45+35+90+40+105+55+45+85 = 530 s

The soft-capped cases are the Gemma 2-like configuration (local layers with a
window, ``logits_soft_cap=50``): checked forward, backward and in a ring-cache
decode, and timed forward against the same window uncapped (the extra tanh per
logit is predicted to cost between nothing and ~2x at head_dim 128, README).

Every check and timing step runs with ``MOSAIC_GPU_DUMP_PTXAS=1`` (jax 0.11.2's
Mosaic GPU prints ``ptxas -v``: registers, spills, stack, static shared memory
of each kernel as it compiles) and records each kernel's dynamic shared memory
from the Mosaic lowering, so the resource report of every kernel comes from
the compiles the checks need anyway, and is printed first in the summary.

Times: CUPTI kernel time per call (``jax.experimental.mosaic.gpu.profiler.measure``)
with the calls inside one jitted dispatch, end-to-end (wall clock of the
dispatch / calls) beside it; weights rotate over copies that move >= 2x the
L2 of the device present, sized from each format's own bytes
(``benchmarks/timing.py``). A pallax op that asked for Mosaic and traced XLA
fails its row. The sweep measures each problem's default config first and
keeps a variant only if CUPTI timed it more than 3% faster.

``--optional`` (second command, budget 290 s): ``benchmarks.generation``
(decode tokens/s and bandwidth of dense, W4, W8 and 50% sparse 1B models,
170 s) and ``benchmarks.train`` (the 1b preset's step time and MFU at seq 4k,
120 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK_ENV = "PALLAX_PROOF_WORK"  # directory of the steps' JSON rows
OUT_ENV = "PALLAX_PROOF_OUT"
DRY_ENV = "PALLAX_PROOF_DRY"
INTERPRET_ENV = "PALLAX_PROOF_INTERPRET"
DRY_MAX_COPIES = 3  # a dry run rotates over few copies: it checks plumbing, not L2
BUDGET_S = 540  # the whole command: 9 minutes
SUMMARY_RESERVE_S = 8  # kept for writing the summary


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    timeout_s: int
    compiles: int
    estimate_s: int
    what: str


STEPS = (
    Step("env", 30, 0, 15, "device, driver, jax, date, L2"),
    Step("check_quant", 45, 3, 25, "quantized matmul vs XLA"),
    Step("check_decode", 35, 2, 20, "decode attention vs XLA"),
    Step("check_attention", 90, 12, 70, "attention fwd+bwd vs XLA"),
    Step("check_sparse", 40, 2, 20, "SpMM, both decodes, vs XLA"),
    Step("time_attention", 105, 15, 80, "attention vs cuDNN and jax's Mosaic kernel"),
    Step("time_quant", 55, 6, 35, "quantized matmul vs XLA bf16"),
    Step("time_spmm", 45, 3, 25, "SpMM vs dense bf16"),
    Step("sweep", 85, 0, 0, "config variants with the time left"),
)
OPTIONAL_STEPS = (
    Step("generation", 170, 0, 150, "decode tokens/s and bandwidth"),
    Step("train", 120, 0, 100, "1b train step time and MFU"),
)
DRY_TIMEOUT_S = 120  # per step on a loaded CI CPU


# ----------------------------------------------------------------------------
# Shapes


@dataclasses.dataclass(frozen=True)
class Shapes:
    quant_kn: tuple[int, int]
    quant_ms: tuple[int, ...]
    w8a8_m: int
    heads: int
    kv_heads: int
    head_dim: int
    check_seq: int
    check_window: int
    decode_batch: int
    decode_cache: int
    decode_window: int
    ring_window: int
    spmm_kn: tuple[int, int]
    spmm_tokens: int
    sparsities: tuple[float, ...]
    attention_problems: tuple[tuple[str, int, int | None], ...]  # (label, seq, window)
    timing_repeats: int


GPU_SHAPES = Shapes(
    quant_kn=(4096, 14336),
    quant_ms=(1, 16),
    w8a8_m=4096,
    heads=32,
    kv_heads=8,
    head_dim=128,
    check_seq=4096,
    check_window=1024,
    decode_batch=8,
    decode_cache=8192,
    decode_window=4096,
    ring_window=1024,
    spmm_kn=(4096, 14336),
    spmm_tokens=16,
    sparsities=(0.5, 0.8, 0.9),
    attention_problems=(("causal 8k", 8192, None), ("window 4096 @ 32k", 32768, 4096)),
    timing_repeats=5,
)
DRY_SHAPES = Shapes(
    quant_kn=(256, 384),
    quant_ms=(1, 16),
    w8a8_m=64,
    heads=4,
    kv_heads=2,
    head_dim=64,
    check_seq=128,
    check_window=32,
    decode_batch=2,
    decode_cache=256,
    decode_window=128,
    ring_window=64,
    spmm_kn=(256, 192),
    spmm_tokens=16,
    sparsities=(0.5, 0.9),
    attention_problems=(("causal 128", 128, None), ("window 32 @ 256", 256, 32)),
    timing_repeats=2,
)


def dry_run() -> bool:
    return os.environ.get(DRY_ENV) == "1"


def shapes() -> Shapes:
    return DRY_SHAPES if dry_run() else GPU_SHAPES


# ----------------------------------------------------------------------------
# Step side: rows written as they come, kernel resources recorded at lowering


class Recorder:
    """Appends rows to ``$PALLAX_PROOF_WORK/<step>.json`` (rewritten after each
    row, so a step killed at its deadline keeps what it had)."""

    def __init__(self, step: str):
        self.step = step
        self.rows: list[dict] = []
        work = os.environ.get(WORK_ENV)
        self.path = Path(work) / f"{step}.json" if work else None

    def add(self, **row) -> dict:
        self.rows.append(row)
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.rows, default=str))
            tmp.replace(self.path)
        return row


_LOWERED: list[dict] = []


def install_smem_hook():
    """Records grid, block and dynamic shared memory of every Mosaic GPU kernel
    lowered in this process (jax 0.11.2: Pallas lowers through
    ``mosaic.gpu.core._lower_as_gpu_kernel``, passing most arguments by keyword;
    ptxas only sees static smem). Returns a function that removes the hook."""
    try:
        from jax.experimental.mosaic.gpu import core as mgpu_core
    except Exception:  # noqa: BLE001 - no Mosaic GPU: nothing to record
        return lambda: None
    original = mgpu_core._lower_as_gpu_kernel
    if getattr(original, "_pallax_hook", False):
        return lambda: None
    signature = inspect.signature(original)

    @functools.wraps(original)
    def hooked(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs).arguments
            smem_bytes = mgpu_core._smem_tree_size(bound["smem_scratch_shape"])
            _LOWERED.append(
                {
                    "grid": list(bound["grid"]),
                    "block": list(bound["block"]),
                    "smem_dynamic": smem_bytes,
                }
            )
        except Exception:  # noqa: BLE001 - recording must never break a lowering
            _LOWERED.append({"grid": None, "block": None, "smem_dynamic": None})
        return original(*args, **kwargs)

    hooked._pallax_hook = True
    mgpu_core._lower_as_gpu_kernel = hooked

    def uninstall():
        mgpu_core._lower_as_gpu_kernel = original

    return uninstall


@dataclasses.dataclass
class Case:
    """Markers around one case's compile + first run, so the orchestrator can
    attribute the ptxas lines printed in between to it. With ``rec``, an
    exception inside becomes a failed row and the step goes on to its next
    case (a compile error in one mode must not hide the others)."""

    name: str
    rec: Recorder | None = None

    def __enter__(self):
        self.start = len(_LOWERED)
        print(f"## case-begin {self.name}", flush=True)
        return self

    def kernels(self) -> list[dict]:
        return _LOWERED[self.start :]

    def __exit__(self, exc_type, exc, tb):
        sys.stdout.flush()
        print(f"## case-end {self.name}", flush=True)
        if exc is None or self.rec is None or not isinstance(exc, Exception):
            return False
        traceback.print_exception(exc_type, exc, tb)
        message = f"{exc_type.__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        self.rec.add(case=self.name, ok=False, error=message, kernels=self.kernels())
        print(f"check {self.name}: FAIL ({message})", flush=True)
        return True


def on_gpu() -> bool:
    from pallax.pallas_kernels._dispatch import on_hopper

    return on_hopper()


def kernel_impl() -> str:
    """The implementation under test: ``"mosaic"`` on Hopper; in a dry run
    ``"xla"`` (fast), or ``"mosaic"`` in GPU interpret mode with
    ``PALLAX_PROOF_INTERPRET=1`` (minutes on a CPU)."""
    if on_gpu() or os.environ.get(INTERPRET_ENV) == "1":
        return "mosaic"
    return "xla"


def mosaic_context():
    """On Hopper or for XLA: nothing; Mosaic on a CPU: GPU interpret mode."""
    import contextlib

    if on_gpu() or kernel_impl() == "xla":
        return contextlib.nullcontext()
    from pallax.testing import gpu_interpret

    return gpu_interpret()


def relative_error(got, expected) -> float:
    import numpy as np

    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30))


def _check(rec: Recorder, case: Case, errors: dict, tol: float, impl: str, t0: float):
    worst = max(errors.values())
    ok = worst <= tol
    row = rec.add(
        case=case.name,
        implementation=impl,
        errors=errors,
        tol=tol,
        ok=ok,
        seconds=round(time.perf_counter() - t0, 2),
        kernels=case.kernels(),
    )
    detail = " ".join(f"{k}={v:.2e}" for k, v in errors.items())
    print(
        f"check {case.name}: {'OK' if ok else 'FAIL'} ({detail}, tol {tol:g}, {impl})", flush=True
    )
    return row


# ----------------------------------------------------------------------------
# Steps


def step_env(rec: Recorder):
    import jax

    from benchmarks import timing

    info = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    try:
        smi = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=15,
        )
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"unavailable ({type(e).__name__})"
    l2_runtime = None
    if not dry_run():
        try:  # The CUDA runtime's own figure (cupy is on the device image).
            import cupy

            l2_runtime = int(cupy.cuda.runtime.getDeviceProperties(0)["l2CacheSize"])
        except Exception as e:  # noqa: BLE001 - fall back to the table
            info["l2_query"] = f"cupy failed: {type(e).__name__}: {e}"
    device = jax.devices()[0]
    if l2_runtime:
        os.environ[timing.L2_ENV] = str(l2_runtime)
    info.update(
        jax=jax.__version__,
        backend=jax.default_backend(),
        device_kind=device.device_kind,
        devices=len(jax.devices()),
        compute_capability=str(getattr(device, "compute_capability", "-")),
        l2_runtime_bytes=l2_runtime,
        l2_bytes=timing.l2_bytes(),
        cupti=timing._cupti_measure() is not None,
        python=sys.version.split()[0],
    )
    try:
        from jax._src.lib import cuda_versions

        info["cuda_runtime"] = cuda_versions.cuda_runtime_get_version() if cuda_versions else None
    except Exception:  # noqa: BLE001 - informative only
        pass
    for key, value in info.items():
        print(f"{key}: {value}")
    rec.add(**info)


def step_check_quant(rec: Recorder):
    import jax
    import jax.numpy as jnp

    from benchmarks.timing import require_implementation
    from benchmarks.weights import random_quantized_weight
    from pallax.pallas_kernels import quantized_matmul

    s = shapes()
    k, n = s.quant_kn
    cases = [("w4a16", 4, None, 16), ("w8a16", 8, None, 16), ("w8a8", 8, 8, s.w8a8_m)]
    for mode, bits, act_bits, m in cases:
        t0 = time.perf_counter()
        with Case(f"{mode} M={m} {k}x{n}", rec) as case:
            keys = jax.random.split(jax.random.key(bits * 10 + m), 2)
            w = random_quantized_weight(keys[0], k, n, bits)
            x = jax.random.normal(keys[1], (m, k), jnp.bfloat16)

            def run(x, w, impl, act_bits=act_bits):
                return quantized_matmul(x, w, act_bits=act_bits, implementation=impl)

            with mosaic_context():
                impl = require_implementation(
                    kernel_impl(), functools.partial(run, impl=kernel_impl()), x, w, what=case.name
                )
                got = jax.jit(run, static_argnums=2)(x, w, kernel_impl())
                jax.block_until_ready(got)
            expected = jax.jit(run, static_argnums=2)(x.astype(jnp.float32), w, "xla")
            _check(rec, case, {"out": relative_error(got, expected)}, 1e-2, impl, t0)


def step_check_decode(rec: Recorder):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.timing import require_implementation
    from pallax.pallas_kernels import decode_attention

    s = shapes()
    b, hq, hk, d = s.decode_batch, s.heads, s.kv_heads, s.head_dim
    ring = s.ring_window + 16
    cases = [
        (
            f"window {s.decode_window} cache {s.decode_cache}",
            1,
            s.decode_window,
            False,
            s.decode_cache,
            None,
        ),
        # Gemma 2-like local layer: ring cache and soft-capped logits.
        (f"rolling ring {s.ring_window}+4 new soft cap 50", 4, s.ring_window, True, ring, 50.0),
    ]
    for label, num_new, window, rolling, cache_len, cap in cases:
        t0 = time.perf_counter()
        with Case(f"decode {label} GQA {hq}/{hk} d{d}", rec) as case:
            keys = jax.random.split(jax.random.key(num_new), 3)
            q = jax.random.normal(keys[0], (b, num_new, hq, d), jnp.bfloat16)
            kc = jax.random.normal(keys[1], (b, cache_len, hk, d), jnp.bfloat16)
            vc = jax.random.normal(keys[2], (b, cache_len, hk, d), jnp.bfloat16)
            # Short, mid and full sequences; a ring also holds longer ones.
            top = 3 * cache_len if rolling else cache_len
            lengths = jnp.asarray(np.linspace(num_new, top, b).astype(np.int32))

            def run(q, kc, vc, lengths, impl, window=window, rolling=rolling, cap=cap):
                return decode_attention(
                    q,
                    kc,
                    vc,
                    lengths,
                    local_window_size=window,
                    rolling=rolling,
                    logits_soft_cap=cap,
                    implementation=impl,
                )

            with mosaic_context():
                impl = require_implementation(
                    kernel_impl(),
                    functools.partial(run, impl=kernel_impl()),
                    q,
                    kc,
                    vc,
                    lengths,
                    what=case.name,
                )
                got = jax.jit(run, static_argnums=4)(q, kc, vc, lengths, kernel_impl())
                jax.block_until_ready(got)
            f32 = [a.astype(jnp.float32) for a in (q, kc, vc)]
            expected = jax.jit(run, static_argnums=4)(*f32, lengths, "xla")
            _check(rec, case, {"out": relative_error(got, expected)}, 1e-2, impl, t0)


def step_check_attention(rec: Recorder):
    import jax
    import jax.numpy as jnp

    from benchmarks.timing import require_implementation
    from pallax.pallas_kernels import dot_product_attention

    s = shapes()
    window = (s.check_window, 0)
    # (label, window, cap, (q heads, kv heads, head_dim, seq))
    model = (s.heads, s.kv_heads, s.head_dim, s.check_seq)
    cases = (
        ("causal", None, None, model),
        (f"window {s.check_window}", window, None, model),
        (f"window {s.check_window} soft cap 50", window, 50.0, model),  # Gemma 2-like local layer
        # Gemma 2 9B's local layer at head_dim 256 (16/8 heads): the head-dim-split
        # backward kernels (issue 13); last, so a slow compile cannot cost the others.
        (
            f"window {s.check_window} soft cap 50",
            window,
            50.0,
            (s.heads // 2, s.kv_heads, 256, s.check_seq // 2),
        ),
    )
    for label, window, cap, (hq, hk, d, seq) in cases:
        t0 = time.perf_counter()
        with Case(f"attention fwd+bwd {label} seq {seq} GQA {hq}/{hk} d{d}", rec) as case:
            keys = jax.random.split(jax.random.key(seq), 4)
            q = jax.random.normal(keys[0], (1, seq, hq, d), jnp.bfloat16)
            k = jax.random.normal(keys[1], (1, seq, hk, d), jnp.bfloat16)
            v = jax.random.normal(keys[2], (1, seq, hk, d), jnp.bfloat16)
            do = jax.random.normal(keys[3], (1, seq, hq, d), jnp.float32)

            def loss(q, k, v, impl, window=window, cap=cap, do=do):
                out = dot_product_attention(
                    q,
                    k,
                    v,
                    is_causal=True,
                    local_window_size=window,
                    logits_soft_cap=cap,
                    implementation=impl,
                )
                return jnp.sum(out.astype(jnp.float32) * do), out

            grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
            with mosaic_context():
                impl = require_implementation(
                    kernel_impl(),
                    functools.partial(grad, impl=kernel_impl()),
                    q,
                    k,
                    v,
                    what=case.name,
                )
                got = grad(q, k, v, kernel_impl())
                jax.block_until_ready(got)
            expected = grad(*[a.astype(jnp.float32) for a in (q, k, v)], "xla")
            (dq, dk, dv), out = got
            (rq, rk, rv), rout = expected
            errors = {
                "out": relative_error(out, rout),
                "dq": relative_error(dq, rq),
                "dk": relative_error(dk, rk),
                "dv": relative_error(dv, rv),
            }
            _check(rec, case, errors, 2e-2, impl, t0)


def step_check_sparse(rec: Recorder):
    import jax
    import jax.numpy as jnp

    from benchmarks.timing import require_implementation
    from benchmarks.weights import random_sparse_weight
    from pallax.pallas_kernels import sparse_matmul
    from pallax.pallas_kernels.sparse_matmul_mgpu import DECODES, SpmmConfig

    s = shapes()
    k, n = s.spmm_kn
    keys = jax.random.split(jax.random.key(7), 2)
    w = random_sparse_weight(keys[0], k, n, 0.8)
    x = jax.random.normal(keys[1], (s.spmm_tokens, k), jnp.bfloat16)

    def run(x, w, impl, config=None):
        return sparse_matmul(x, w, implementation=impl, config=config)

    expected = jax.jit(run, static_argnums=2)(x.astype(jnp.float32), w, "xla")
    for decode in DECODES:
        t0 = time.perf_counter()
        with Case(f"spmm {decode} decode 80% {k}x{n} N={s.spmm_tokens}", rec) as case:
            config = SpmmConfig(decode=decode)
            fn = functools.partial(run, impl=kernel_impl(), config=config)
            with mosaic_context():
                impl = require_implementation(kernel_impl(), fn, x, w, what=case.name)
                got = jax.jit(fn)(x, w)
                jax.block_until_ready(got)
            _check(rec, case, {"out": relative_error(got, expected)}, 1e-2, impl, t0)
    if on_gpu():  # What implementation=None relies on before it picks the kernel.
        from pallax.pallas_kernels import sparse

        t0 = time.perf_counter()
        with Case("spmm self-check (dispatch)", rec) as case:
            passed = sparse._mosaic_self_check()
        rec.add(case=case.name, implementation="mosaic", ok=bool(passed), errors={}, tol=None)
        print(f"check {case.name}: {'OK' if passed else 'FAIL'} ({time.perf_counter() - t0:.1f} s)")


# Timing ---------------------------------------------------------------------


def copies_for(bytes_per_copy: int, l2: int) -> int:
    """Weight copies that move >= 2x L2 per pass (capped in a dry run)."""
    from benchmarks.timing import rotation_copies

    return rotation_copies(bytes_per_copy, l2, max_copies=DRY_MAX_COPIES if dry_run() else None)


def _expected_impl() -> str:
    """What ``implementation=None`` must resolve to here."""
    return "mosaic" if on_gpu() else "xla"


def _timing_entry(timing, impl=None, **extra) -> dict:
    return {**timing.as_dict(), "implementation": impl, **extra}


def _timed(rec_times, name, fn, arg_sets, *, repeats, impl=None, case=None, **extra):
    """Times ``fn`` into ``rec_times[name]``; ``case`` labels its compiles
    (ptxas lines, lowered kernels) in the resource report."""
    from benchmarks.timing import time_calls

    label = f"{case}: {name}" if case else name
    with Case(label) as marker:
        try:
            timing = time_calls(fn, arg_sets, repeats=repeats)
        except Exception as e:  # noqa: BLE001 - report and go on
            message = (str(e).splitlines() or [""])[0][:160]
            rec_times[name] = {"error": f"{type(e).__name__}: {message}", "case": label}
            print(f"  {name}: FAILED {rec_times[name]['error']}", flush=True)
            return None
    rec_times[name] = _timing_entry(timing, impl, case=label, kernels=marker.kernels(), **extra)
    kernel = f"{timing.kernel_s * 1e6:9.1f}" if timing.kernel_s is not None else "        -"
    print(
        f"  {name:<28} kernel {kernel} us  e2e {timing.e2e_s * 1e6:9.1f} us  "
        f"({timing.calls} calls/dispatch, {timing.method}{', ' + impl if impl else ''})",
        flush=True,
    )
    return timing


def step_time_quant(rec: Recorder):
    import jax
    import jax.numpy as jnp

    from benchmarks import timing
    from benchmarks.quant_matmul import jax_mixed_matmul
    from benchmarks.weights import random_dense, random_quantized_weight, weight_copies
    from pallax.pallas_kernels import quantized_matmul

    s = shapes()
    k, n = s.quant_kn
    l2 = timing.l2_bytes()
    expected = _expected_impl()
    key = jax.random.key(0)

    def copies_of(build, example_bytes):
        return weight_copies(build, key, copies_for(example_bytes, l2))

    dense_bytes = k * n * 2
    dense = copies_of(lambda kk: random_dense(kk, k, n), dense_bytes)
    formats = {}
    for bits in (8, 4):
        shape = jax.eval_shape(lambda kk, b=bits: random_quantized_weight(kk, k, n, b), key)
        formats[bits] = copies_of(
            lambda kk, b=bits: random_quantized_weight(kk, k, n, b), timing.tree_nbytes(shape)
        )
    mixed = jax_mixed_matmul() if on_gpu() else None
    int8_t = [q.values[:n, :k] for q in formats[8]]  # [N, K] int8, no scales

    def bf16(x, w):
        return x @ w

    def pallax(x, w, act_bits=None):
        return quantized_matmul(x, w, act_bits=act_bits)

    def int8dot(xq, w_t):
        return jax.lax.dot_general(
            xq, w_t, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32
        )

    problems = [(m, ("bf16", "w8a16", "w4a16", "jax_mixed_int8")) for m in s.quant_ms]
    problems.append((s.w8a8_m, ("bf16", "int8dot", "w8a8")))
    for m, names in problems:
        print(f"quant {k}x{n} M={m} (L2 {l2 / 2**20:.0f} MiB)", flush=True)
        calls = max(len(dense), len(formats[8]), len(formats[4]))
        xs = [jax.random.normal(kk, (m, k), jnp.bfloat16) for kk in jax.random.split(key, calls)]
        times, extra = {}, {}
        for name in names:
            weights, fn, inputs, impl = {
                "bf16": (dense, bf16, xs, None),
                "w8a16": (formats[8], pallax, xs, "pallax"),
                "w4a16": (formats[4], pallax, xs, "pallax"),
                "w8a8": (formats[8], functools.partial(pallax, act_bits=8), xs, "pallax"),
                "int8dot": (int8_t, int8dot, [x.astype(jnp.int8) for x in xs], None),
                "jax_mixed_int8": (int8_t, mixed, xs, None),
            }[name]
            if fn is None:
                times[name] = {"absent": "jax's mixed-type kernel needs a Hopper GPU"}
                continue
            arg_sets = timing.rotating_arg_sets(inputs, weights)
            got = None
            if impl == "pallax":
                try:
                    got = timing.require_implementation(expected, fn, *arg_sets[0], what=name)
                except timing.ImplementationMismatch as e:
                    times[name] = {"error": str(e)}
                    print(f"  {name}: FAILED {e}", flush=True)
                    continue
            _timed(
                times,
                name,
                fn,
                arg_sets,
                repeats=s.timing_repeats,
                impl=got,
                case=f"quant M={m}",
                weight_bytes=timing.tree_nbytes(weights[0]),
                copies=len(weights),
            )
        rec.add(problem=f"quant {k}x{n} M={m}", m=m, k=k, n=n, times=times, l2_bytes=l2, **extra)


def step_time_spmm(rec: Recorder):
    import jax
    import jax.numpy as jnp

    from benchmarks import timing
    from benchmarks.weights import random_dense, random_sparse_weight, weight_copies
    from pallax.pallas_kernels import sparse_matmul

    s = shapes()
    k, n = s.spmm_kn
    l2 = timing.l2_bytes()
    expected = _expected_impl()
    key = jax.random.key(1)
    dense = weight_copies(lambda kk: random_dense(kk, k, n), key, copies_for(k * n * 2, l2))

    def bf16(x, w):
        return x @ w

    def pallax(x, w):
        return sparse_matmul(x, w)

    for sparsity in s.sparsities:
        shape = jax.eval_shape(lambda kk, sp=sparsity: random_sparse_weight(kk, k, n, sp), key)
        sparse = weight_copies(
            lambda kk, sp=sparsity: random_sparse_weight(kk, k, n, sp),
            key,
            copies_for(timing.tree_nbytes(shape), l2),
        )
        calls = max(len(dense), len(sparse))
        xs = [
            jax.random.normal(kk, (s.spmm_tokens, k), jnp.bfloat16)
            for kk in jax.random.split(key, calls)
        ]
        print(f"spmm {k}x{n} N={s.spmm_tokens} {sparsity:.0%} sparse", flush=True)
        times = {}
        _timed(
            times,
            "dense_bf16",
            bf16,
            timing.rotating_arg_sets(xs, dense),
            repeats=s.timing_repeats,
            case=f"spmm {sparsity:.0%}",
            weight_bytes=k * n * 2,
            copies=len(dense),
        )
        arg_sets = timing.rotating_arg_sets(xs, sparse)
        try:
            impl = timing.require_implementation(expected, pallax, *arg_sets[0], what="spmm")
            _timed(
                times,
                "pallax",
                pallax,
                arg_sets,
                repeats=s.timing_repeats,
                impl=impl,
                case=f"spmm {sparsity:.0%}",
                weight_bytes=timing.tree_nbytes(sparse[0]),
                copies=len(sparse),
            )
        except timing.ImplementationMismatch as e:
            times["pallax"] = {"error": str(e)}
            print(f"  pallax: FAILED {e}", flush=True)
        bound = 2 / (2 * (1 - sparsity) + 1 / 8 + 1 / 256)
        rec.add(
            problem=f"spmm {k}x{n} N={s.spmm_tokens} {sparsity:.0%}",
            sparsity=sparsity,
            times=times,
            bitmap_bound=bound,
            l2_bytes=l2,
        )


def step_time_attention(rec: Recorder):
    import jax
    import jax.numpy as jnp

    from benchmarks import timing
    from benchmarks.attention import visible_pairs
    from pallax.pallas_kernels import dot_product_attention

    s = shapes()
    hq, hk, d = s.heads, s.kv_heads, s.head_dim
    expected = _expected_impl()
    gpu = on_gpu()
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as jax_mgpu
    except ImportError:
        jax_mgpu = None

    def pallax(q, k, v, window):
        return dot_product_attention(q, k, v, is_causal=True, local_window_size=window)

    def pallax_soft_cap(q, k, v, window):  # Gemma 2's local layers: same window, cap 50
        return dot_product_attention(
            q, k, v, is_causal=True, local_window_size=window, logits_soft_cap=50.0
        )

    def cudnn(q, k, v, window):
        lw = None if window is None else (window, 0)
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=lw, implementation="cudnn"
        )

    def xla(q, k, v, window):
        lw = None if window is None else (window, 0)
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=lw, implementation="xla"
        )

    def jax_mosaic(q, k, v, window):  # fp16, causal, no window: what jax ships
        del window
        config = jax_mgpu.TuningConfig(
            block_q=64, block_kv=128, max_concurrent_steps=2, causal=True
        )
        return jax_mgpu.attention(q, k, v, config)

    def fwd_bwd(fn):
        def run(q, k, v, window):
            def loss(q, k, v):
                return fn(q, k, v, window).astype(jnp.float32).sum()

            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

        return run

    impls = {"pallax": pallax, "pallax_softcap50": pallax_soft_cap}
    if gpu:
        impls["cudnn"] = cudnn
        if jax_mgpu is not None:
            impls["jax_mosaic_fp16_causal"] = jax_mosaic
    else:
        impls["xla"] = xla
    calls = 2 if dry_run() else 3  # distinct q per call; attention is compute bound
    for label, seq, window in s.attention_problems:
        # Every call gets its own q, k and v (XLA may merge dots sharing an operand).
        keys = jax.random.split(jax.random.key(seq), (calls, 3))
        qkvs = [
            tuple(
                jax.random.normal(kk, (1, seq, heads, d), jnp.bfloat16)
                for kk, heads in zip(call_keys, (hq, hk, hk), strict=True)
            )
            for call_keys in keys
        ]
        pairs = visible_pairs(seq, seq if window is None else window, 0)
        for mode in ("fwd", "fwd+bwd"):
            flops = 4 * d * hq * pairs * (3.5 if mode == "fwd+bwd" else 1.0)
            print(f"attention {label} {mode} GQA {hq}/{hk} d{d} ({flops / 1e12:.2f} TFLOP)")
            times = {}
            for name, base in impls.items():
                fn = base if mode == "fwd" else fwd_bwd(base)
                run = functools.partial(fn, window=window)
                if name == "pallax_softcap50" and (mode != "fwd" or window is None):
                    continue  # one extra compile: the windowed forward, vs uncapped
                if name.startswith("jax_mosaic"):
                    if mode != "fwd":
                        times[name] = {"absent": "jax's Mosaic attention has no causal backward"}
                        continue
                    arg_sets = [tuple(a.astype(jnp.float16) for a in qkv) for qkv in qkvs]
                else:
                    arg_sets = qkvs
                impl = None
                if name.startswith("pallax"):
                    try:
                        impl = timing.require_implementation(expected, run, *arg_sets[0], what=name)
                    except timing.ImplementationMismatch as e:
                        times[name] = {"error": str(e)}
                        print(f"  {name}: FAILED {e}", flush=True)
                        continue
                t = _timed(
                    times,
                    name,
                    run,
                    arg_sets,
                    repeats=s.timing_repeats,
                    impl=impl,
                    case=f"attention {label} {mode}",
                )
                if t is not None:
                    times[name]["tflops"] = flops / t.seconds / 1e12
            rec.add(
                problem=f"attention {label} {mode}",
                seq=seq,
                window=window,
                mode=mode,
                flops=flops,
                times=times,
            )


# Sweep ----------------------------------------------------------------------

# Problems the sweep tunes: the headline shapes (GPU) or tiny ones (dry run).
SWEEP_PROBLEMS = {
    "w4a16_m16": dict(kernel="quantized_matmul", bits=4, act_bits=None, m=16),
    "w4a16_m1": dict(kernel="quantized_matmul", bits=4, act_bits=None, m=1),
    "w8a16_m16": dict(kernel="quantized_matmul", bits=8, act_bits=None, m=16),
    "w8a8_m4096": dict(kernel="quantized_matmul", bits=8, act_bits=8, m="w8a8"),
    "spmm90_n16": dict(kernel="sparse_matmul", sparsity=0.9),
    "spmm80_n16": dict(kernel="sparse_matmul", sparsity=0.8),
    "spmm50_n16": dict(kernel="sparse_matmul", sparsity=0.5),
    "attn_causal_fwd": dict(kernel="attention", problem=0),
    "attn_window_fwd": dict(kernel="attention", problem=1),
    # Forward + backward (A/B of backward knobs; not tuned: the key is the forward's).
    "attn_causal_bwd": dict(kernel="attention", problem=0, backward=True),
    "attn_window_bwd": dict(kernel="attention", problem=1, backward=True),
}

# (kernel, problem, config kwargs): one line per variant, most promising first.
# A knob a config class does not have (yet) is reported and skipped. Every
# entry lowers for CUDA at the GPU shapes (checked on a CPU with
# pallax.testing.lower_for_cuda, 2026-11-26): no variant is spent on a shared
# memory overflow (block_n=256, or 3+ stages of 128-row KV tiles, overflow).
SWEEP = [
    # Split-K reduced in the kernel (TMA reduce-add into one fp32 accumulator,
    # the default) against fp32 partials summed by XLA (issue 13's epilogue).
    ("quantized_matmul", "w4a16_m1", {"split_k_reduction": "partials"}),
    ("quantized_matmul", "w4a16_m16", {"split_k_reduction": "partials"}),
    ("sparse_matmul", "spmm90_n16", {"split_k_reduction": "partials"}),
    # Old against new (issue 13): the legacy kernel, then the swap kernel's knobs.
    ("quantized_matmul", "w4a16_m16", {"variant": "legacy"}),
    ("quantized_matmul", "w4a16_m16", {"k_splits": 1}),
    ("quantized_matmul", "w4a16_m16", {"k_splits": 4}),
    ("quantized_matmul", "w4a16_m16", {"max_concurrent_steps": 2}),
    ("quantized_matmul", "w4a16_m16", {"block_m": 8}),
    # Old against new (issue 13): one decoding warpgroup, 256-value chunks, 16 KiB ring.
    (
        "sparse_matmul",
        "spmm90_n16",
        {"compute_warpgroups": 1, "value_chunk": 256, "ring_values": 8192},
    ),
    (
        "sparse_matmul",
        "spmm80_n16",
        {"compute_warpgroups": 1, "value_chunk": 256, "ring_values": 8192},
    ),
    (
        "sparse_matmul",
        "spmm50_n16",
        {"compute_warpgroups": 1, "value_chunk": 256, "ring_values": 8192},
    ),
    # Old against new (issue 13): the separate dQ kernel (S and dP recomputed, 7 GEMMs
    # per block pair) against dQ fused into dK/dV with TMA adds (5), fwd+bwd timed.
    ("attention", "attn_causal_bwd", {"dq_mode": "separate"}),
    ("sparse_matmul", "spmm90_n16", {"compute_warpgroups": 1}),
    ("sparse_matmul", "spmm90_n16", {"decode": "dense"}),
    ("sparse_matmul", "spmm90_n16", {"max_concurrent_steps": 6}),
    ("sparse_matmul", "spmm90_n16", {"k_splits": 2}),
    ("sparse_matmul", "spmm80_n16", {"decode": "bits"}),
    ("sparse_matmul", "spmm80_n16", {"decode": "dense"}),
    ("sparse_matmul", "spmm80_n16", {"max_concurrent_steps": 6}),
    ("quantized_matmul", "w8a16_m16", {"variant": "legacy"}),
    ("quantized_matmul", "w8a16_m16", {"k_splits": 1}),
    ("quantized_matmul", "w8a16_m16", {"k_splits": 4}),
    ("quantized_matmul", "w4a16_m1", {"variant": "legacy"}),
    ("quantized_matmul", "w4a16_m1", {"k_splits": 1}),
    ("quantized_matmul", "w8a8_m4096", {"variant": "legacy"}),
    ("quantized_matmul", "w8a8_m4096", {"block_n": 64}),
    ("quantized_matmul", "w8a8_m4096", {"k_splits": 2}),
    ("sparse_matmul", "spmm50_n16", {"decode": "bits"}),
    ("sparse_matmul", "spmm50_n16", {"max_concurrent_steps": 6}),
    # P from registers (FA3, the default on a GPU) against P staged through SMEM.
    ("attention", "attn_causal_fwd", {"p_operand": "smem"}),
    ("attention", "attn_window_fwd", {"p_operand": "smem"}),
    ("attention", "attn_causal_fwd", {"block_kv": 64}),
    ("attention", "attn_causal_fwd", {"block_kv": 64, "max_concurrent_steps": 3}),
    ("attention", "attn_window_fwd", {"block_kv": 64}),
    ("attention", "attn_window_fwd", {"block_kv": 64, "max_concurrent_steps": 3}),
    ("attention", "attn_window_bwd", {"dq_mode": "separate"}),
    ("sparse_matmul", "spmm90_n16", {"k_splits": 4}),
    ("sparse_matmul", "spmm80_n16", {"k_splits": 2}),
]
DRY_SWEEP_LIMIT = 3  # variants a dry run times (each problem's default too)
TUNED_MIN_GAIN = 0.03  # a winner must beat the default by more than this (noise)


class SweepProblem:
    """Builds the default config, inputs, the op and its tuned-config key for one problem."""

    def __init__(self, name: str):
        import jax
        import jax.numpy as jnp

        from benchmarks import timing
        from benchmarks.weights import random_quantized_weight, random_sparse_weight, weight_copies
        from pallax.pallas_kernels import _tuning

        s = shapes()
        spec = dict(SWEEP_PROBLEMS[name])
        self.name, self.kernel = name, spec.pop("kernel")
        self.tunes = True  # whether a winner goes to the tuned-config file
        key = jax.random.key(3)
        l2 = timing.l2_bytes()
        if self.kernel == "quantized_matmul":
            from pallax.pallas_kernels import quantized_matmul
            from pallax.pallas_kernels.quantized_matmul_mgpu import QuantMatmulConfig

            k, n = s.quant_kn
            m = s.w8a8_m if spec["m"] == "w8a8" else spec["m"]
            bits, act_bits = spec["bits"], spec["act_bits"]
            build = functools.partial(
                random_quantized_weight, in_features=k, out_features=n, bits=bits
            )
            nbytes = timing.tree_nbytes(jax.eval_shape(build, key))
            weights = weight_copies(build, key, copies_for(nbytes, l2))
            self.cls, self.default = QuantMatmulConfig, QuantMatmulConfig()
            self.key = _tuning.quantized_key(m, k, n, bits, act_bits)
            self.op = lambda x, w, config: quantized_matmul(
                x, w, act_bits=act_bits, implementation=kernel_impl(), config=config
            )
            xs = [
                jax.random.normal(kk, (m, k), jnp.bfloat16)
                for kk in jax.random.split(key, len(weights))
            ]
            self.arg_sets = timing.rotating_arg_sets(xs, weights)
        elif self.kernel == "sparse_matmul":
            from pallax.pallas_kernels import sparse_matmul
            from pallax.pallas_kernels.sparse_matmul_mgpu import SpmmConfig

            k, n = s.spmm_kn
            sp = spec["sparsity"]
            build = functools.partial(
                random_sparse_weight, in_features=k, out_features=n, sparsity=sp
            )
            nbytes = timing.tree_nbytes(jax.eval_shape(build, key))
            weights = weight_copies(build, key, copies_for(nbytes, l2))
            self.cls, self.default = SpmmConfig, SpmmConfig()
            self.key = _tuning.sparse_key(s.spmm_tokens, k, n, 1.0 - weights[0].sparsity)
            self.op = lambda x, w, config: sparse_matmul(
                x, w, implementation=kernel_impl(), config=config
            )
            xs = [
                jax.random.normal(kk, (s.spmm_tokens, k), jnp.bfloat16)
                for kk in jax.random.split(key, len(weights))
            ]
            self.arg_sets = timing.rotating_arg_sets(xs, weights)
        elif self.kernel == "attention":
            from pallax.pallas_kernels import AttentionConfig, dot_product_attention
            from pallax.pallas_kernels.attention import normalize_window

            _, seq, window = s.attention_problems[spec["problem"]]
            d = s.head_dim
            self.cls, self.default = AttentionConfig, AttentionConfig.for_head_dim(d)
            left, right = normalize_window(True, window, seq, seq)
            self.key = _tuning.attention_key(d, seq, seq, left, right)

            def attend(q, k, v, config):
                return dot_product_attention(
                    q,
                    k,
                    v,
                    is_causal=True,
                    local_window_size=window,
                    implementation=kernel_impl(),
                    config=config,
                )

            def forward_and_backward(q, k, v, config):
                def loss(q, k, v):
                    return attend(q, k, v, config).astype(jnp.float32).sum()

                return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

            # A backward problem shares the forward's tuned-config key, so it is an
            # A/B only: timed and reported, never written to the tuned file.
            self.tunes = not spec.get("backward", False)
            self.op = attend if self.tunes else forward_and_backward
            keys = jax.random.split(key, 4)
            k_ = jax.random.normal(keys[0], (1, seq, s.kv_heads, d), jnp.bfloat16)
            v_ = jax.random.normal(keys[1], (1, seq, s.kv_heads, d), jnp.bfloat16)
            self.arg_sets = [
                (jax.random.normal(kk, (1, seq, s.heads, d), jnp.bfloat16), k_, v_)
                for kk in keys[2:]
            ]
        else:
            raise ValueError(f"unknown sweep kernel {self.kernel!r} in problem {name!r}")

    def config(self, kwargs: dict):
        fields = {f.name for f in dataclasses.fields(self.cls)}
        unknown = set(kwargs) - fields
        if unknown:
            raise KeyError(f"{self.cls.__name__} has no {sorted(unknown)}")
        return dataclasses.replace(self.default, **kwargs)

    def time(self, config, repeats):
        from benchmarks.timing import time_calls

        fn = lambda *args: self.op(*args, config=config)  # noqa: E731
        with mosaic_context():
            return time_calls(fn, self.arg_sets, repeats=repeats)


def step_sweep(rec: Recorder):
    from pallax.pallas_kernels import _tuning

    s = shapes()
    deadline = float(os.environ.get("PALLAX_PROOF_DEADLINE", "inf"))
    entries = SWEEP[:DRY_SWEEP_LIMIT] if dry_run() else SWEEP
    problems: dict[str, SweepProblem] = {}
    defaults: dict[str, float] = {}
    best: dict[str, tuple[float, dict]] = {}
    out = os.environ.get(OUT_ENV)
    kind = _device_kind()
    tuned_path = Path(out) / _tuning.device_file_name(kind) if out else None
    for kernel, problem, kwargs in entries:
        if time.time() > deadline - 15:
            print(f"sweep: out of time before {kernel} {problem} {kwargs}", flush=True)
            break
        spec = SWEEP_PROBLEMS.get(problem)
        if spec is None or spec["kernel"] != kernel:
            rec.add(problem=problem, kernel=kernel, config=kwargs, error="unknown problem/kernel")
            continue
        try:
            if problem not in problems:
                problems[problem] = SweepProblem(problem)
                base = problems[problem]
                with Case(f"sweep {problem} default"):
                    t = base.time(base.default, s.timing_repeats)
                defaults[problem] = t.seconds
                rec.add(
                    problem=problem,
                    kernel=kernel,
                    config="default",
                    seconds=t.seconds,
                    timing=t.as_dict(),
                    key=base.key,
                )
                print(f"sweep {problem:<16} default          {t.seconds * 1e6:9.1f} us", flush=True)
            sp = problems[problem]
            config = sp.config(kwargs)
            with Case(f"sweep {problem} {kwargs}"):
                t = sp.time(config, s.timing_repeats)
        except Exception as e:  # noqa: BLE001 - one variant failing must not stop the sweep
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            rec.add(problem=problem, kernel=kernel, config=kwargs, error=msg)
            print(f"sweep {problem:<16} {kwargs}: FAILED {msg}", flush=True)
            continue
        ratio = defaults[problem] / t.seconds
        rec.add(
            problem=problem,
            kernel=kernel,
            config=kwargs,
            seconds=t.seconds,
            timing=t.as_dict(),
            vs_default=ratio,
        )
        print(
            f"sweep {problem:<16} {json.dumps(kwargs):<34} {t.seconds * 1e6:9.1f} us "
            f"({ratio:.2f}x default)",
            flush=True,
        )
        device_timed = t.method == "cupti" or dry_run()  # never tune on host noise
        if (
            device_timed
            and sp.tunes
            and t.seconds < defaults[problem] * (1 - TUNED_MIN_GAIN)
            and (problem not in best or t.seconds < best[problem][0])
        ):
            best[problem] = (t.seconds, dataclasses.asdict(config))
            if tuned_path is not None:
                write_tuned(tuned_path, kind, problems, defaults, best)


def _device_kind() -> str:
    import jax

    return jax.devices()[0].device_kind


def write_tuned(path: Path, kind: str, problems, defaults, best) -> None:
    import jax

    entries = [
        {
            "kernel": problems[name].kernel,
            "key": problems[name].key,
            "config": config,
            "seconds": seconds,
            "default_seconds": defaults[name],
        }
        for name, (seconds, config) in best.items()
    ]
    data = {
        "device_kind": kind,
        "jax": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": "benchmarks/gpu_proof.py sweep (CUPTI kernel time, rotating weights)",
        "entries": entries,
    }
    path.write_text(json.dumps(data, indent=1) + "\n")


# Optional command -------------------------------------------------------------


def step_generation(rec: Recorder):
    from benchmarks import generation

    # Dense first (the baseline), then the formats; sparse70 left out for time
    # (host pruning of a 1B model takes ~30 s per variant).
    variants = ["--variants", "dense", "w4", "w8", "sparse50"]
    rows = generation.main((["--quick"] if dry_run() else ["--new", "64"]) + variants)
    for name, batch, rate in rows:
        rec.add(variant=name, batch=batch, tokens_per_s=rate)


def step_train(rec: Recorder):
    from benchmarks import train

    # One run: the 1b preset at seq 4k with pallax attention (compile ~1 min).
    rows = train.main(["--quick", "--steps", "1", "--runs", "1"] if dry_run() else ["--runs", "1"])
    for row in rows:
        rec.add(row=list(row))


STEP_FUNCTIONS = {
    "env": step_env,
    "check_quant": step_check_quant,
    "check_decode": step_check_decode,
    "check_attention": step_check_attention,
    "check_sparse": step_check_sparse,
    "time_attention": step_time_attention,
    "time_quant": step_time_quant,
    "time_spmm": step_time_spmm,
    "sweep": step_sweep,
    "generation": step_generation,
    "train": step_train,
}


def run_step(name: str) -> int:
    """Runs one step in this process; rows go to ``$PALLAX_PROOF_WORK``."""
    install_smem_hook()
    if name == "sweep":  # Defaults must be the kernels' own, not an installed tuned file.
        os.environ.setdefault("PALLAX_TUNED_DIR", tempfile.mkdtemp(prefix="pallax-untuned-"))
    rec = Recorder(name)
    try:
        STEP_FUNCTIONS[name](rec)
    except Exception:  # noqa: BLE001 - the orchestrator reports the exit status
        traceback.print_exc()
        return 1
    return 0


# ----------------------------------------------------------------------------
# Orchestrator


NO_PTXAS_LOG = "Expected a compilation log"  # Mosaic's error when ptxas -v gave none
PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
PTXAS_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log: str) -> list[dict]:
    """Per case (between the step's ``## case-begin/end`` markers): the kernels
    ptxas reported, with registers, stack frame, spills and static smem."""
    found, case, current = [], None, None
    for line in log.splitlines():
        if line.startswith("## case-begin "):
            case = line[len("## case-begin ") :].strip()
            continue
        if line.startswith("## case-end "):
            case = None
            continue
        if m := PTXAS_ENTRY.search(line):
            current = {"case": case, "function": m.group(1)}
            found.append(current)
        elif current is not None and (m := PTXAS_FRAME.search(line)):
            current.update(
                stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3))
            )
        elif current is not None and (m := PTXAS_USED.search(line)):
            current["registers"] = int(m.group(1))
            if m.group(2):
                current["smem_static"] = int(m.group(2))
    return found


def _stream(proc, sinks, lines):
    for raw in iter(proc.stdout.readline, ""):
        lines.append(raw)
        for sink in sinks:
            sink.write(raw)
            sink.flush()


def run_step_process(step: Step, timeout: float, env: dict, log_file, cmd=None) -> dict:
    """Runs ``--step NAME`` (or ``cmd``) as a child with its own deadline; its
    output is tee'd to stdout and the log. Returns status, seconds and output."""
    cmd = cmd or [sys.executable, "-u", "-m", "benchmarks.gpu_proof", "--step", step.name]
    header = f"\n===== step {step.name}: {step.what} (timeout {timeout:.0f} s) =====\n"
    for sink in (sys.stdout, log_file):
        sink.write(header)
        sink.flush()
    start = time.time()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a timeout ends all of it
    )
    lines: list[str] = []
    reader = threading.Thread(target=_stream, args=(proc, [sys.stdout, log_file], lines))
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
        status = "ok" if code == 0 else f"exit {code}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = f"TIMEOUT {timeout:.0f}s"
    reader.join(timeout=10)
    seconds = time.time() - start
    note = f"===== step {step.name}: {status} in {seconds:.1f} s =====\n"
    for sink in (sys.stdout, log_file):
        sink.write(note)
        sink.flush()
    return {"status": status, "seconds": round(seconds, 1), "output": "".join(lines)}


def orchestrate_in_process(steps, out: Path, dry: bool) -> dict:
    """All steps in this process, no deadlines (the test suite's dry run: it
    saves a process start per step; the subprocess path has its own test)."""
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update({OUT_ENV: str(out), DRY_ENV: "1" if dry else "0"})
    os.environ.pop(WORK_ENV, None)
    uninstall_hook = install_smem_hook()
    try:
        return _orchestrate_in_process(steps, out, dry)
    finally:
        uninstall_hook()  # the test process goes on lowering kernels of its own


def _orchestrate_in_process(steps, out: Path, dry: bool) -> dict:
    results = {"dry_run": dry, "budget_s": None, "steps": {}}
    for step in steps:
        print(f"\n===== step {step.name}: {step.what} (in process) =====", flush=True)
        rec, start, status = Recorder(step.name), time.time(), "ok"
        try:
            STEP_FUNCTIONS[step.name](rec)
        except Exception as e:  # noqa: BLE001 - report it in the summary
            traceback.print_exc()
            status = f"error {type(e).__name__}"
        seconds = round(time.time() - start, 1)
        results["steps"][step.name] = {"status": status, "seconds": seconds, "rows": rec.rows}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    summary = summarize(results)
    (out / "summary.txt").write_text(summary + "\n")
    print("\n" + summary, flush=True)
    return results


def orchestrate(steps, out: Path, budget_s: float, dry: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pallax-proof-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{WORK_ENV: str(work), OUT_ENV: str(out)})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if dry:
        env[DRY_ENV] = "1"
        env.setdefault("JAX_PLATFORMS", "cpu")
    else:
        env.setdefault("MOSAIC_GPU_DUMP_PTXAS", "1")
    deadline = time.time() + budget_s
    results = {"dry_run": dry, "budget_s": budget_s, "steps": {}}
    with open(out / "proof.log", "a") as log_file:
        for step in steps:
            left = deadline - time.time() - SUMMARY_RESERVE_S
            timeout = min(DRY_TIMEOUT_S if dry else step.timeout_s, left)
            if timeout < 10:
                results["steps"][step.name] = {"status": "skipped (out of time)", "seconds": 0}
                continue
            env["PALLAX_PROOF_DEADLINE"] = str(time.time() + timeout)
            info = run_step_process(step, timeout, env, log_file)
            if NO_PTXAS_LOG in info["output"] and env.pop("MOSAIC_GPU_DUMP_PTXAS", None):
                # This jaxlib's assembler gave no log: go on without the
                # resource report rather than without the kernels.
                timeout = min(timeout, deadline - time.time() - SUMMARY_RESERVE_S)
                if timeout >= 10:
                    info = run_step_process(step, timeout, env, log_file)
                info["note"] = "ptxas gave no log: resource report off from here"
            rows_path = work / f"{step.name}.json"
            info["rows"] = json.loads(rows_path.read_text()) if rows_path.exists() else []
            info["ptxas"] = parse_ptxas(info.pop("output"))
            results["steps"][step.name] = info
            if step.name == "env" and info["rows"] and info["rows"][0].get("l2_runtime_bytes"):
                env["PALLAX_L2_BYTES"] = str(info["rows"][0]["l2_runtime_bytes"])
            (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    summary = summarize(results)
    (out / "summary.txt").write_text(summary + "\n")
    with open(out / "proof.log", "a") as log_file:
        log_file.write("\n" + summary + "\n")
    print("\n" + summary, flush=True)
    return results


# Summary ----------------------------------------------------------------------


PALLAX_COLUMNS = ("pallax", "w4a16", "w8a16", "w8a8")
BASELINE_COLUMNS = (
    "cudnn",
    "jax_mosaic_fp16_causal",
    "xla",
    "bf16",
    "dense_bf16",
    "jax_mixed_int8",
    "int8dot",
)


def _has_time(entry) -> bool:
    return isinstance(entry, dict) and "seconds" in entry


def _us(entry) -> str:
    """``kernel/e2e`` microseconds (kernel = CUPTI, or the wall clock without
    it), TFLOP/s where counted, and the implementation a pallax op traced."""
    if not isinstance(entry, dict):
        return "-"
    if "seconds" not in entry:
        return "n/a" if "absent" in entry else "FAIL"
    text = f"{entry['seconds'] * 1e6:.1f}"
    if entry.get("kernel_s") is not None:
        text += f"/{entry['e2e_s'] * 1e6:.1f}"
    if entry.get("tflops"):
        text += f" ({entry['tflops']:.0f} TF/s)"
    if entry.get("implementation"):
        text += f" [{entry['implementation']}]"
    return text


def _case_kernels(rows):
    """(case, lowered kernels) from check rows and from timing rows' entries."""
    for r in rows:
        if "case" in r:
            yield r["case"], r.get("kernels", [])
        for entry in (r.get("times") or {}).values():
            if isinstance(entry, dict) and "case" in entry:
                yield entry["case"], entry.get("kernels", [])


def summarize(results: dict) -> str:
    steps = results["steps"]
    lines = []
    env_rows = steps.get("env", {}).get("rows") or [{}]
    e = env_rows[0]
    lines.append(
        f"== pallax GPU proof{' (DRY RUN, CPU)' if results['dry_run'] else ''}: "
        f"{e.get('device_kind', '?')} | {e.get('nvidia_smi', '?')} | jax {e.get('jax', '?')} | "
        f"{e.get('date', '?')} | L2 {e.get('l2_bytes', 0) / 2**20:.0f} MiB | "
        f"cupti {e.get('cupti', '?')} =="
    )
    lines.append(
        "steps: " + ", ".join(f"{n} {s['status']} {s['seconds']:.0f}s" for n, s in steps.items())
    )
    lines.append(
        "-- resources per case: ptxas -v (regs, spill stores/loads, stack) in compile order; "
        "dynamic smem bytes from the Mosaic lowering, in lowering order"
    )
    for info in steps.values():
        ptxas_by_case: dict = {}
        for p in info.get("ptxas", []):
            ptxas_by_case.setdefault(p.get("case"), []).append(p)
        smem_by_case = dict(_case_kernels(info.get("rows", [])))
        for case in dict.fromkeys([*smem_by_case, *ptxas_by_case]):
            if case is None or case.startswith("sweep"):
                continue
            kernels = ptxas_by_case.get(case, [])
            smem = [k.get("smem_dynamic") for k in smem_by_case.get(case, [])]
            if not kernels and not smem:
                continue
            regs = ",".join(str(k.get("registers", "?")) for k in kernels) or "-"
            spill = ",".join(
                f"{k.get('spill_stores', '?')}/{k.get('spill_loads', '?')}" for k in kernels
            )
            stack = ",".join(str(k.get("stack", "?")) for k in kernels)
            lines.append(
                f"{case[:56]:<57} regs {regs} spill {spill or '-'} stack {stack or '-'} "
                f"smem {','.join(str(x) for x in smem) or '-'}"
            )
    lines.append("-- correctness vs XLA (relative Frobenius error)")
    for name in ("check_quant", "check_decode", "check_attention", "check_sparse"):
        info = steps.get(name)
        if info is None:
            continue
        if not info.get("rows"):
            lines.append(f"{name}: no result ({info['status']})")
        for r in info.get("rows", []):
            if "error" in r:
                lines.append(f"FAIL {r['case'][:60]:<61} {r['error'][:100]}")
                continue
            worst = max(r["errors"].values()) if r.get("errors") else float("nan")
            lines.append(
                f"{'OK  ' if r.get('ok') else 'FAIL'} {r['case'][:60]:<61} err {worst:9.2e} "
                f"tol {r.get('tol') or '-'} {r.get('implementation') or ''}"
            )
        if info["status"] != "ok" and info.get("rows"):
            lines.append(f"{name}: {info['status']} after {len(info['rows'])} case(s)")
    lines.append(
        "-- timings, us per call: kernel (CUPTI) / end-to-end (wall of a dispatch / calls;"
        " alone without CUPTI); ratios = baseline / pallax kernel time"
    )
    for name in ("time_attention", "time_quant", "time_spmm"):
        info = steps.get(name)
        if info is None:
            continue
        if info["status"] != "ok":
            lines.append(f"{name}: {info['status']}")
        for r in info.get("rows", []):
            times = r["times"]
            cells = " ".join(f"{k}={_us(v)}" for k, v in times.items())
            ratios = []
            for p_name in [k for k in PALLAX_COLUMNS if k in times]:
                p = times[p_name]
                for base in BASELINE_COLUMNS:
                    b = times.get(base)
                    if _has_time(p) and _has_time(b):
                        ratios.append(f"{p_name}/{base} {b['seconds'] / p['seconds']:.2f}x")
            lines.append(f"{r['problem']}: {cells}")
            if ratios:
                lines.append("    " + ", ".join(ratios))
    sweep = steps.get("sweep")
    if sweep is not None:
        lines.append(f"-- sweep ({sweep['status']}): best per problem vs default")
        by_problem: dict = {}
        for r in sweep.get("rows", []):
            by_problem.setdefault(r["problem"], []).append(r)
        for problem, rows in by_problem.items():
            default = next((r for r in rows if r.get("config") == "default"), None)
            timed = [r for r in rows if r.get("config") != "default" and "seconds" in r]
            failed = sum(1 for r in rows if "error" in r)
            if default is None:
                lines.append(f"{problem}: no default ({failed} failed)")
                continue
            winner = min(timed, key=lambda r: r["seconds"], default=None)
            w = (
                f"best {json.dumps(winner['config'])} {winner['seconds'] * 1e6:.1f} us "
                f"({default['seconds'] / winner['seconds']:.2f}x)"
                if winner
                else "no variant timed"
            )
            lines.append(
                f"{problem}: default {default['seconds'] * 1e6:.1f} us, {w}, "
                f"{len(timed)} timed, {failed} failed"
            )
    for name in ("generation", "train"):
        info = steps.get(name)
        if info is not None:
            lines.append(
                f"{name}: {info['status']}, {len(info.get('rows', []))} rows (see proof.log)"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU: tiny shapes, interpret mode")
    parser.add_argument("--optional", action="store_true", help="the second command")
    parser.add_argument("--step", choices=sorted(STEP_FUNCTIONS), help="run one step here")
    parser.add_argument("--steps", nargs="*", help="only these steps (orchestrator)")
    parser.add_argument("--out", default=None, help="output folder (default $OUT)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for everything")
    parser.add_argument(
        "--in-process", action="store_true", help="no subprocesses or deadlines (tests)"
    )
    args = parser.parse_args(argv)
    if args.step:
        return run_step(args.step)
    steps = OPTIONAL_STEPS if args.optional else STEPS
    if args.steps:
        unknown = set(args.steps) - {s.name for s in steps}
        if unknown:
            parser.error(
                f"unknown step(s) {sorted(unknown)}; choose from {[s.name for s in steps]}"
            )
        steps = tuple(s for s in steps if s.name in args.steps)
    out = Path(args.out or os.environ.get("OUT") or ROOT / "benchmarks" / "logs" / "proof")
    budget = args.budget or (290 if args.optional else BUDGET_S)
    if args.in_process:
        results = orchestrate_in_process(steps, out, args.dry_run)
    else:
        results = orchestrate(steps, out, budget, args.dry_run)
    failed = [n for n, s in results["steps"].items() if s["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
