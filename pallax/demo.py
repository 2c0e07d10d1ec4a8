"""``pallax demo``: train a windowed-attention model on the embedded corpus, then
prune and quantize it and compare the variants.

On a 2-core CPU it takes a few minutes (``tiny`` preset at batch 8 x 128 bytes,
XLA kernels); on a Hopper GPU it trains the ``small`` preset with the Pallas
kernels. Writes ``metrics.jsonl`` and ``loss.png`` to ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallax.models import generate, model_nbytes, quantize_model, sparsify_model
from pallax.train import Trainer, preset_config
from pallax.train.data import validation_batches
from pallax.train.trainer import cross_entropy

PROMPT = "The for statement"


def validation_loss(model, batches) -> float:
    """Mean next-token loss of ``model`` over host batches ``[B, T + 1]``."""
    loss = nnx.jit(lambda m, t: cross_entropy(m(t[:, :-1]), t[:, 1:]))
    return float(np.mean([float(loss(model, jnp.asarray(b))) for b in batches]))


def generation_speed(model, tokenizer, new_tokens: int) -> tuple[float, str]:
    """(tokens/s after compilation, a sampled continuation of the prompt)."""
    prompt = tokenizer.encode(PROMPT)[None]
    sample = lambda: generate(model, prompt, new_tokens, temperature=0.7, seed=1)  # noqa: E731
    text = PROMPT + tokenizer.decode(np.asarray(sample())[0])  # the first call compiles
    start = time.perf_counter()
    jax.block_until_ready(sample())
    return new_tokens / (time.perf_counter() - start), text


def plot(history, finetune, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for records, label, offset in (
        (history, "dense", 0),
        (finetune, "70% sparse fine-tune", history[-1]["step"]),
    ):
        train = [(r["step"] + offset, r["loss"]) for r in records if "loss" in r]
        val = [(r["step"] + offset, r["val_loss"]) for r in records if "val_loss" in r]
        if train:
            ax.plot(*zip(*train, strict=True), label=f"{label} train")
        if val:
            ax.plot(*zip(*val, strict=True), "o--", label=f"{label} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title("pallax demo: windowed transformer on pydoc topics")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(steps: int | None = None, out: str | Path = "runs/demo", preset: str | None = None):
    on_gpu = jax.default_backend() == "gpu"
    preset = preset or ("small" if on_gpu else "tiny")
    config = preset_config(preset)
    if not on_gpu:  # sized for ~2 minutes of training on 2 CPU cores
        config = config.replace(batch_size=8, seq_len=128, steps=300, warmup_steps=30)
    steps = config.steps if steps is None else steps  # 0 is an error, not "default"
    config = config.replace(
        steps=steps,
        warmup_steps=min(config.warmup_steps, max(1, steps // 10)),
        eval_every=max(1, steps // 6),
        log_every=max(1, steps // 12),
        checkpoint_every=0,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = config.model
    print(
        f"pallax demo on {jax.devices()[0].device_kind} ({jax.default_backend()}): preset "
        f"{preset!r}, {m.num_layers} layers x {m.embed_dim}, {m.num_heads} heads / "
        f"{m.num_kv_heads} KV, sliding window {m.sliding_window}, seq {config.seq_len}, "
        f"batch {config.batch_size}, {steps} steps on the embedded corpus (pydoc topics, bytes)"
    )

    trainer = Trainer(config)
    start = time.perf_counter()
    history = trainer.fit()
    train_time = time.perf_counter() - start
    dense = trainer.model
    tokenizer = trainer.tokenizer
    batches = validation_batches(trainer.dataset, config.batch_size, config.seq_len, 4)

    # Prune 70% of every block projection by magnitude, then fine-tune the
    # surviving weights briefly (the mask stays fixed; only nonzeros train).
    sparse = sparsify_model(nnx.clone(dense), 0.7)
    pruned_loss = validation_loss(sparse, batches)
    finetune_steps = max(2, steps // 6)
    finetune = Trainer(
        config.replace(
            steps=finetune_steps,
            learning_rate=config.learning_rate / 3,
            warmup_steps=max(1, finetune_steps // 10),
            eval_every=finetune_steps,
            log_every=max(1, finetune_steps // 3),
        ),
        model=sparse,
        progress=False,
    )
    print(f"fine-tuning the 70% sparse model for {finetune_steps} steps (mask fixed)")
    finetune_history = finetune.fit()
    variants = {
        "dense (fp32 master, bf16 compute)": dense,
        "70% sparse, pruned": sparsify_model(nnx.clone(dense), 0.7),
        "70% sparse + fine-tune": finetune.model,
        "W8A8 (int8 x int8)": quantize_model(nnx.clone(dense), 8, act_bits=8),
        "W4A16 (group 128)": quantize_model(nnx.clone(dense), 4),
    }
    new_tokens = 64 if not on_gpu else 256
    rows, samples = [], {}
    for name, model in variants.items():
        loss = pruned_loss if name == "70% sparse, pruned" else validation_loss(model, batches)
        speed, samples[name] = generation_speed(model, tokenizer, new_tokens)
        rows.append((name, loss, float(np.exp(loss)), model_nbytes(model), speed))

    print(f"\ntrained {steps} steps in {train_time:.0f} s; validation on {len(batches)} batches")
    header = f"{'model':<36}{'val loss':>9}{'ppl':>7}{'bytes':>12}{'gen tok/s':>11}"
    print(header + "\n" + "-" * len(header))
    for name, loss, ppl, nbytes, speed in rows:
        print(f"{name:<36}{loss:>9.3f}{ppl:>7.2f}{nbytes:>12,}{speed:>11.1f}")
    print("\n(bytes: all parameters as stored; sparse = bitmap format, 2.1 bits/elem + values)")
    for name, text in samples.items():
        print(f"\n--- {name} ---\n{text!r}")

    with (out / "metrics.jsonl").open("w") as f:
        for record in history:
            f.write(json.dumps(record) + "\n")
        for record in finetune_history:
            f.write(json.dumps({**record, "phase": "sparse_finetune"}) + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "config": dataclasses.asdict(config),
                "rows": [
                    dict(
                        zip(
                            ("model", "val_loss", "perplexity", "bytes", "gen_tokens_per_s"),
                            row,
                            strict=True,
                        )
                    )
                    for row in rows
                ],
                "samples": samples,
            },
            indent=2,
        )
    )
    plotted = plot(history, finetune_history, out / "loss.png")
    print(
        f"\nwrote {out}/metrics.jsonl, {out}/results.json"
        + (f", {out}/loss.png" if plotted else " (pip install matplotlib for loss.png)")
    )
    return rows
