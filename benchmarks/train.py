"""Training step time and MFU: the 1b preset with pallax attention vs XLA attention,
and the windowed model at 16k tokens vs full causal attention, in one run.

    python -m benchmarks.train            # GPU: 1b preset (Llama-3.2-1B body, bytes vocab)
    python -m benchmarks.train --quick    # tiny config, any backend (CI smoke test)

MFU = training FLOPs per token (6 x dense matmul params + attention inside the
window, no remat recomputation) x tokens/s / (peak x devices); the peak is known
for H100/H200 (989 dense bf16 TFLOP/s) or given with --peak-tflops.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from pallax import sharding as ps
from pallax.train import Trainer, preset_config
from pallax.train.metrics import device_peak_tflops, training_flops_per_token

# (label, seq_len, batch, sliding_window, attention_implementation)
GPU_RUNS = (
    ("1b seq4k full, pallax", 4096, 8, None, None),
    ("1b seq4k full, xla", 4096, 8, None, "xla"),
    ("1b seq16k window4k, pallax", 16384, 2, 4096, None),
    ("1b seq16k full, pallax", 16384, 2, None, None),
    ("1b seq16k window4k, xla", 16384, 2, 4096, "xla"),
)
QUICK_RUNS = (
    ("tiny seq256 full, default", 256, 4, None, None),
    ("tiny seq256 window64, default", 256, 4, 64, None),
    ("tiny seq256 window64, xla", 256, 4, 64, "xla"),
)


def time_steps(trainer: Trainer, steps: int) -> float:
    """Median seconds per optimizer step (after a compile + warm-up step)."""
    batches = [trainer.batch(i) for i in range(steps + 1)]
    params, opt_state, out = trainer._run(
        trainer._train_step, trainer.params, trainer.opt_state, batches[0]
    )
    jax.block_until_ready(out)
    samples = []
    for tokens in batches[1:]:
        start = time.perf_counter()
        params, opt_state, out = trainer._run(trainer._train_step, params, opt_state, tokens)
        jax.block_until_ready(out)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny config (CPU smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--runs", type=int, default=None, help="only the first N runs")
    args = parser.parse_args(argv)
    quick = args.quick or jax.default_backend() != "gpu"
    preset = "tiny" if quick else "1b"
    runs = (QUICK_RUNS if quick else GPU_RUNS)[: args.runs]
    steps = args.steps or (2 if quick else 5)
    peak = args.peak_tflops or device_peak_tflops()
    tokens = np.random.default_rng(0).integers(0, 256, 2_000_000, dtype=np.int32)
    print(
        f"device {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
        f"preset {preset}, peak {peak or 'unknown'} TFLOP/s per device"
    )
    header = f"{'run':<30}{'step s':>9}{'tok/s':>11}{'TFLOP/s':>9}{'MFU':>7}"
    print(header + "\n" + "-" * len(header))
    rows = []
    for label, seq_len, batch, window, implementation in runs:
        config = preset_config(preset).replace(
            seq_len=seq_len, batch_size=batch, steps=steps + 1, eval_every=0,
            model=dict(sliding_window=window, attention_implementation=implementation),
        )  # fmt: skip
        try:
            # The quick smoke test stays on one device even with fake CPU devices.
            mesh = ps.make_mesh(devices=jax.devices()[:1]) if quick else None
            trainer = Trainer(config, tokens=tokens, mesh=mesh, progress=False, log=lambda *_: None)
            step_time = time_steps(trainer, steps)
        except Exception as e:  # e.g. XLA attention running out of memory at 16k
            print(f"{label:<30}  failed: {type(e).__name__}: {str(e)[:80]}")
            rows.append((label, None, None, None))
            continue
        tokens_per_s = batch * seq_len / step_time
        tflops = training_flops_per_token(config.model, seq_len) * tokens_per_s / 1e12
        mfu = tflops / (peak * jax.device_count()) if peak else None
        rows.append((label, step_time, tokens_per_s, mfu))
        mfu_text = f"{mfu:>7.1%}" if mfu is not None else f"{'-':>7}"
        print(f"{label:<30}{step_time:>9.4f}{tokens_per_s:>11,.0f}{tflops:>9.1f}{mfu_text}")
        del trainer
    return rows


if __name__ == "__main__":
    main()
