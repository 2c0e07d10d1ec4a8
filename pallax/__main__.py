"""Command line: ``pallax {demo,train,generate,convert,eval,bench}`` (or ``python -m pallax``).

``generate``, ``convert`` and ``eval`` take a pallax checkpoint or a Hugging Face
model directory (``config.json``, ``*.safetensors``, ``tokenizer.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# What a user can cause (bad flags, values, files): reported in one line, exit
# status 2. Library code raises ValueError for bad values (UnicodeDecodeError and
# JSONDecodeError are ValueErrors too), OSError for files. Anything else is a bug
# and keeps its traceback. PALLAX_TRACEBACK=1 shows the traceback for these too.
USER_ERRORS = (ValueError, OSError, ImportError)

BENCHMARKS = (
    "attention",
    "quant_matmul",
    "spmm",
    "generation",
    "sequence_parallel",
    "train",
    "comm_quant",
)
SOURCE_HELP = "pallax run / checkpoints directory, or a Hugging Face model directory"
DTYPE_HELP = "compute dtype of a Hugging Face model (default: float32 on CPU, else bfloat16)"

# `pallax convert --method NAME`: NAME -> (operation, needs calibration tokens). A new
# one-shot method adds an entry here and, if it needs one, a branch in _compress.
CONVERT_METHODS = {
    "magnitude": ("prune", False),
    "wanda": ("prune", True),
    "rtn": ("quantize", False),
    "lkd": ("quantize", True),
    "sparsegpt": ("prune", True),
    "gptq": ("quantize", True),
}


def _setting(text: str) -> tuple[str, object]:
    """``key=value`` (``model.key=value`` for model fields); values parse as JSON if they can."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pallax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train, prune, quantize and compare a small model")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: preset)")
    demo.add_argument("--out", default="runs/demo", help="output directory (plot, metrics)")
    demo.add_argument("--preset", default=None, help="tiny (CPU default) or small (GPU default)")

    train = commands.add_parser("train", help="train a model (resumes from --out)")
    source = train.add_mutually_exclusive_group()
    source.add_argument("--config", help="TOML or JSON config file")
    source.add_argument("--preset", choices=("tiny", "small", "1b"), help="default: tiny")
    source.add_argument("--init-from", help="checkpoint to fine-tune (e.g. from `pallax convert`)")
    train.add_argument("--out", default=None, help="run directory (default runs/<preset>)")
    train.add_argument("--steps", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--seq-len", type=int)
    train.add_argument("--learning-rate", "--lr", type=float)
    train.add_argument("--grad-accum", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--data", help="text file, directory of *.txt or .npy token ids")
    train.add_argument("--tokenizer", help="Hugging Face tokenizers JSON (default: bytes)")
    train.add_argument("--mesh", help="e.g. data=2,tensor=2 (default: all devices on data)")
    train.add_argument("--peak-tflops", type=float, help="per-device peak for MFU")
    train.add_argument(
        "--set",
        type=_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config field, e.g. --set model.sliding_window=128 --set eval_every=50",
    )
    train.add_argument(
        "--comm-quant",
        metavar="MODE[,GRADS]",
        help="quantize the fsdp weight gathers and gradient reduction: none|int8|int4, "
        "or WEIGHTS,GRADS (e.g. int4,int8); needs an fsdp mesh axis > 1",
    )
    train.add_argument(
        "--hpz", action="store_true", help="backward weight gathers stay within the host"
    )
    train.add_argument(
        "--comm-hadamard", action="store_true", help="Hadamard-rotate gradients before quantizing"
    )
    train.add_argument(
        "--comm-weight-diff",
        action="store_true",
        help="SDP4Bit: gather quantized weight changes into a replicated copy",
    )
    train.add_argument("--coordinator", help="multi-host: coordinator host:port")
    train.add_argument("--num-processes", type=int)
    train.add_argument("--process-id", type=int)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    gen = commands.add_parser("generate", help="sample text from a checkpoint")
    gen.add_argument("--checkpoint", required=True, help=SOURCE_HELP)
    gen.add_argument("--dtype", choices=("float32", "bfloat16"), help=DTYPE_HELP)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--step", type=int, default=None, help="default: latest")

    convert = commands.add_parser("convert", help="sparsify or quantize a checkpoint")
    convert.add_argument("--checkpoint", required=True, help=SOURCE_HELP)
    convert.add_argument("--out", required=True, help="new checkpoint directory")
    convert.add_argument(
        "--format",
        choices=("pallax", "compressed-tensors"),
        default="pallax",
        help="pallax checkpoint, or a Hugging Face directory in compressed-tensors format",
    )
    convert.add_argument(
        "--method",
        choices=tuple(CONVERT_METHODS),
        help="pruning or quantization method (default: --prune-method / --quant-method)",
    )
    convert.add_argument("--sparsity", type=float, help="fraction of weights to prune, e.g. 0.7")
    convert.add_argument(
        "--prune-method", default="magnitude", choices=("magnitude", "wanda", "sparsegpt")
    )
    convert.add_argument("--pattern", help="N:M pattern instead of unstructured, e.g. 2:4")
    convert.add_argument("--quantize", choices=("w8a8", "w8", "w4"), help="weight format")
    convert.add_argument("--quant-method", default="rtn", choices=("rtn", "lkd", "gptq"))
    zero_points = convert.add_mutually_exclusive_group()
    zero_points.add_argument(
        "--asymmetric", dest="symmetric", action="store_false", default=None,
        help="weights with zero points (default for w4)",
    )  # fmt: skip
    zero_points.add_argument(
        "--symmetric", dest="symmetric", action="store_true", help="no zero points (w8 default)"
    )
    convert.add_argument(
        "--act-order", action="store_true", help="gptq: inputs by decreasing activation energy"
    )
    convert.add_argument("--group-size", type=int, default=128)
    convert.add_argument("--calibration-batches", type=int, default=4, help="of 4 sequences")
    convert.add_argument(
        "--data", help="calibration text/.npy (default: the run's data or the embedded corpus)"
    )
    convert.add_argument("--seq-len", type=int, help="calibration sequence length")
    convert.add_argument("--dtype", choices=("float32", "bfloat16"), help=DTYPE_HELP)

    evaluate = commands.add_parser("eval", help="perplexity and prefill / decode tokens/s")
    evaluate.add_argument("--checkpoint", required=True, help=SOURCE_HELP)
    evaluate.add_argument(
        "--data", help="text file, directory of *.txt or .npy token ids (default: embedded corpus)"
    )
    evaluate.add_argument(
        "--split",
        choices=("validation", "all"),
        default="validation",
        help="validation: the held-out blocks training and calibration never see (default)",
    )
    evaluate.add_argument("--seq-len", type=int, help="default: the run's, 256 for HF models")
    evaluate.add_argument("--batch-size", type=int, default=4)
    evaluate.add_argument("--max-batches", type=int, default=8)
    evaluate.add_argument("--decode-tokens", type=int, default=64, help="for decode tokens/s")
    evaluate.add_argument("--step", type=int, default=None, help="default: latest")
    evaluate.add_argument("--dtype", choices=("float32", "bfloat16"), help=DTYPE_HELP)

    bench = commands.add_parser("bench", help="run a benchmark from benchmarks/")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    return parser


def _train(args) -> None:
    from pallax import sharding as ps
    from pallax.train import Trainer, load_config, load_model, preset_config
    from pallax.train.config import from_dict, to_dict
    from pallax.train.sources import checkpoint_dir

    ps.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    model = None
    if args.config:
        config = load_config(args.config)
    elif args.init_from:
        model, meta = load_model(checkpoint_dir(args.init_from))
        config = from_dict(meta["config"])
    else:
        config = preset_config(args.preset or "tiny")
    overrides = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "learning_rate": args.learning_rate,
        "grad_accum": args.grad_accum,
        "seed": args.seed,
        "data": args.data,
        "tokenizer": args.tokenizer,
        "mesh": args.mesh,
        "peak_tflops": args.peak_tflops,
    }
    values = {k: v for k, v in overrides.items() if v is not None}
    if args.comm_quant is not None:
        values["comm_quant_weights"], values["comm_quant_grads"] = ps.parse_comm_quant(
            args.comm_quant
        )
    for flag, field in (
        ("hpz", "comm_hpz"),
        ("comm_hadamard", "comm_hadamard"),
        ("comm_weight_diff", "comm_weight_diff"),
    ):
        if getattr(args, flag):
            values[field] = True
    model_values = {}
    for key, value in args.set:
        if key.startswith("model."):
            model_values[key.removeprefix("model.")] = value
        else:
            values[key] = value
    if model_values and model is not None:
        raise ValueError("model settings cannot change when fine-tuning a checkpoint (--init-from)")
    config = from_dict({**to_dict(config), **values, "model": model_values}, config)
    if args.out:
        out = args.out
    elif args.init_from:
        out = f"{args.init_from.rstrip('/')}-finetune"
    else:
        out = f"runs/{args.preset or (Path(args.config).stem if args.config else 'tiny')}"
    trainer = Trainer(config, model=model, output_dir=out, progress=not args.no_progress)
    trainer.fit()
    trainer.close()
    if trainer.is_main:
        print(f"checkpoints in {out}/checkpoints; metrics in {out}/metrics.jsonl")


def _generate(args) -> None:
    import time

    import jax

    from pallax.models import generate
    from pallax.train.sources import load_source

    model, meta, tokenizer = load_source(args.checkpoint, args.step, dtype=args.dtype)
    if tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer.json to encode --prompt with")
    prompt = tokenizer.encode(args.prompt)
    if prompt.size == 0:
        raise ValueError("--prompt is empty")
    start = time.perf_counter()
    out = generate(
        model,
        prompt[None],
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_tokens=tuple(meta.get("stop_tokens", ())),
    )
    jax.block_until_ready(out)
    elapsed = time.perf_counter() - start
    print(args.prompt + tokenizer.decode(out[0]))
    print(
        f"[{args.max_new_tokens} tokens in {elapsed:.2f} s incl. compile; step {meta['step']}]",
        file=sys.stderr,
    )


def _convert_method(args) -> str:
    """The method of ``--method`` (or --prune-method / --quant-method), checked against
    the operation that --sparsity / --quantize asks for."""
    if args.sparsity is None and args.quantize is None:
        raise ValueError("nothing to do: give --sparsity and/or --quantize")
    # Checked before the (slow) checkpoint load.
    if args.sparsity is not None and not 0 <= args.sparsity < 1:
        raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.group_size < 1:
        raise ValueError(f"--group-size must be >= 1, got {args.group_size}")
    if args.calibration_batches < 1:
        raise ValueError(f"--calibration-batches must be >= 1, got {args.calibration_batches}")
    if args.sparsity is not None and args.quantize is not None:
        raise ValueError(
            "a linear holds one weight format: sparsify or quantize, not both "
            "(convert twice with different layer selections instead)"
        )
    operation = "prune" if args.sparsity is not None else "quantize"
    method = args.method or (args.prune_method if operation == "prune" else args.quant_method)
    if CONVERT_METHODS[method][0] != operation:
        flag = "--sparsity" if operation == "prune" else "--quantize"
        raise ValueError(f"--method {method} does not {operation}: it cannot go with {flag}")
    if args.act_order and method != "gptq":
        raise ValueError(f"--act-order needs --quant-method gptq, got {method}")
    return method


def _compress(model, method: str, args, calibration=None, layers=None) -> None:
    """Applies ``method`` to the selected linears of ``model`` in place."""
    from pallax.models import quantize_model, sparsify_model

    if CONVERT_METHODS[method][0] == "prune":
        sparsify_model(
            model,
            args.sparsity,
            method,
            calibration=calibration,
            pattern=args.pattern,
            layers=layers,
        )
    else:
        quantize_model(
            model,
            4 if args.quantize == "w4" else 8,
            8 if args.quantize == "w8a8" else None,
            method,
            calibration=calibration,
            group_size=args.group_size,
            layers=layers,
            symmetric=args.symmetric,
            act_order=args.act_order,
        )


def _per_layer_transform(method: str, args, act_bits: dict):
    """``from_hf`` transform compressing each selected linear as it is read (data-free
    methods), so a Hugging Face model converts without ever being dense in memory."""
    from flax import nnx

    from pallax.models.convert import transformer_blocks_only
    from pallax.models.transformer import Linear

    def transform(path, kernel):
        if not transformer_blocks_only(path, None):
            return kernel
        layer = nnx.eval_shape(
            lambda: Linear(*kernel.shape, (None, None), parallel="column", rngs=nnx.Rngs(0))
        )
        layer.kernel.set_value(kernel)
        _compress(layer, method, args, layers=lambda *_: True)
        act_bits[path] = layer.act_bits
        return layer.kernel.get_value()

    return transform


def _calibration_tokens(args, config, tokenizer):
    """``[4 * calibration_batches, seq_len]`` windows from the training split (eval
    measures the validation split)."""
    import numpy as np

    from pallax.train.data import TokenDataset, load_tokens, train_batch

    data = args.data if args.data is not None else config.data
    if tokenizer is None and not str(data).endswith(".npy"):
        raise ValueError(f"{args.checkpoint} has no tokenizer.json: give --data as .npy tokens")
    seq_len = args.seq_len or config.seq_len
    tokens = load_tokens(data, tokenizer)
    dataset = TokenDataset.split(tokens, seq_len, config.validation_fraction)
    batches = [
        np.asarray(train_batch(dataset, config.seed, step, 4, seq_len))[:, :-1]
        for step in range(args.calibration_batches)
    ]
    return np.concatenate(batches)


def _copy_tokenizer(source, tokenizer, out) -> str | None:
    """Copies the Hugging Face tokenizer files next to the converted model."""
    import shutil

    from pallax.train.sources import HF_TOKENIZER_FILES, is_hf_directory

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if is_hf_directory(source):
        for name in HF_TOKENIZER_FILES:
            if (Path(source) / name).is_file():
                shutil.copy(Path(source) / name, out / name)
    elif getattr(tokenizer, "path", None):
        shutil.copy(tokenizer.path, out / "tokenizer.json")
    return str((out / "tokenizer.json").absolute()) if (out / "tokenizer.json").exists() else None


def _convert(args) -> None:
    from flax import nnx

    from pallax.models import linears, to_hf
    from pallax.train import Checkpointer
    from pallax.train.checkpoint import weight_descriptions
    from pallax.train.config import from_dict, to_dict
    from pallax.train.sources import is_hf_directory, load_source

    method = _convert_method(args)
    needs_data = CONVERT_METHODS[method][1]
    act_bits: dict[str, int | None] = {}
    streaming = is_hf_directory(args.checkpoint) and not needs_data
    transform = _per_layer_transform(method, args, act_bits) if streaming else None
    model, meta, tokenizer = load_source(args.checkpoint, dtype=args.dtype, transform=transform)
    if streaming:
        for path, layer in linears(model):
            layer.act_bits = act_bits.get(path, layer.act_bits)
    else:
        config = from_dict(meta["config"])
        calibration = _calibration_tokens(args, config, tokenizer) if needs_data else None
        _compress(model, method, args, calibration)
    tokenizer_path = _copy_tokenizer(args.checkpoint, tokenizer, args.out)
    if args.format == "compressed-tensors":
        to_hf(model, args.out, format="compressed-tensors")
        print(f"wrote {args.out} (compressed-tensors)")
        return
    config = from_dict(meta["config"])
    if tokenizer_path is not None:
        config = from_dict({**to_dict(config), "tokenizer": tokenizer_path}, config)
    meta = {
        **meta,
        "config": to_dict(config),
        "weights": weight_descriptions(model),
        "converted_from": args.checkpoint,
        "method": method,
    }
    out = Checkpointer(args.out)
    out.save(meta.pop("step"), nnx.state(model, nnx.Param), None, meta, force=True)
    out.wait()
    out.close()
    print(f"wrote {args.out}")


def _eval(args) -> None:
    import math
    import time

    import jax
    import numpy as np
    from flax import nnx

    from pallax.models import generate, model_nbytes
    from pallax.train.config import from_dict
    from pallax.train.data import TokenDataset, load_tokens
    from pallax.train.sources import load_source
    from pallax.train.trainer import cross_entropy

    for name in ("batch_size", "max_batches", "decode_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    model, meta, tokenizer = load_source(args.checkpoint, args.step, dtype=args.dtype)
    config = from_dict(meta["config"])
    data = args.data if args.data is not None else config.data
    if tokenizer is None and not str(data).endswith(".npy"):
        raise ValueError(f"{args.checkpoint} has no tokenizer.json: give --data as .npy tokens")
    seq_len = args.seq_len or config.seq_len
    tokens = load_tokens(data, tokenizer)
    if args.split == "validation":
        tokens = TokenDataset.split(tokens, seq_len, config.validation_fraction).validation
    count = min((len(tokens) - 1) // seq_len, args.batch_size * args.max_batches)
    if count < 1:
        raise ValueError(f"{len(tokens)} {args.split} tokens are too few for --seq-len {seq_len}")
    windows = tokens[np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)]
    loss_fn = nnx.jit(lambda m, t: cross_entropy(m(t[:, :-1]), t[:, 1:]))
    total = 0.0
    for start in range(0, count, args.batch_size):
        batch = windows[start : start + args.batch_size]
        total += float(loss_fn(model, jax.numpy.asarray(batch))) * len(batch)
    loss = total / count

    # Throughput: prefill of a batch of prompts, then decode steps (compiled first).
    prompt = windows[: args.batch_size, :seq_len]

    def timed(new_tokens, repeats=3):
        """Fastest of ``repeats`` runs after compiling."""
        jax.block_until_ready(generate(model, prompt, new_tokens))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(generate(model, prompt, new_tokens))
            times.append(time.perf_counter() - start)
        return min(times)

    prefill = timed(1)
    decode = timed(args.decode_tokens + 1) - prefill
    print(f"model          {args.checkpoint} ({model_nbytes(model):,} parameter bytes)")
    print(
        f"perplexity     {math.exp(loss):.3f} (loss {loss:.4f} nats/token over "
        f"{count * seq_len:,} {args.split} tokens, {count} windows of {seq_len})"
    )
    print(f"prefill        {prompt.size / prefill:,.1f} tokens/s (batch {len(prompt)} x {seq_len})")
    rate = f"{len(prompt) * args.decode_tokens / decode:,.1f}" if decode > 0 else "n/a"
    print(
        f"decode         {rate} tokens/s (batch {len(prompt)}, {args.decode_tokens} steps after "
        f"the prefill; {jax.devices()[0].device_kind})"
    )


def _bench(args, parser) -> None:
    import importlib

    try:
        module = importlib.import_module(f"benchmarks.{args.name}")
    except ImportError as e:
        parser.error(f"cannot import benchmarks.{args.name} ({e}): run from the repository root")
    module.main(args.args)


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from pallax import demo

            demo.main(steps=args.steps, out=args.out, preset=args.preset)
        elif args.command == "train":
            _train(args)
        elif args.command == "generate":
            _generate(args)
        elif args.command == "convert":
            _convert(args)
        elif args.command == "eval":
            _eval(args)
        elif args.command == "bench":
            _bench(args, parser)
    except USER_ERRORS as e:
        if os.environ.get("PALLAX_TRACEBACK"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__  # one line
        parser.exit(2, f"pallax {args.command}: error: {message}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
