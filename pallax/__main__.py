"""Command line: ``pallax {demo,train,generate,convert,bench}`` (or ``python -m pallax``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCHMARKS = ("attention", "quant_matmul", "spmm", "generation", "sequence_parallel", "train")


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
    train.add_argument("--coordinator", help="multi-host: coordinator host:port")
    train.add_argument("--num-processes", type=int)
    train.add_argument("--process-id", type=int)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    gen = commands.add_parser("generate", help="sample text from a checkpoint")
    gen.add_argument("--checkpoint", required=True, help="run or checkpoints directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--step", type=int, default=None, help="default: latest")

    convert = commands.add_parser("convert", help="sparsify and/or quantize a checkpoint")
    convert.add_argument("--checkpoint", required=True)
    convert.add_argument("--out", required=True, help="new checkpoint directory")
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
    convert.add_argument("--calibration-batches", type=int, default=4)

    bench = commands.add_parser("bench", help="run a benchmark from benchmarks/")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    return parser


def _checkpoint_dir(path: str) -> Path:
    """Accepts a run directory (holding ``checkpoints/``) or the checkpoints directory."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} not found")
    return path


def _train(args) -> None:
    from pallax import sharding as ps
    from pallax.train import Trainer, load_config, load_model, preset_config
    from pallax.train.config import from_dict, to_dict

    ps.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    model = None
    if args.config:
        config = load_config(args.config)
    elif args.init_from:
        model, meta = load_model(_checkpoint_dir(args.init_from))
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
    from pallax.train import load_model, load_tokenizer

    model, meta = load_model(_checkpoint_dir(args.checkpoint), args.step)
    tokenizer = load_tokenizer(meta["config"]["tokenizer"])
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
    )
    jax.block_until_ready(out)
    elapsed = time.perf_counter() - start
    print(args.prompt + tokenizer.decode(out[0]))
    print(
        f"[{args.max_new_tokens} tokens in {elapsed:.2f} s incl. compile; step {meta['step']}]",
        file=sys.stderr,
    )


def _convert(args) -> None:
    from pallax.models import quantize_model, sparsify_model
    from pallax.train import Checkpointer, TrainConfig, load_model
    from pallax.train.checkpoint import weight_descriptions
    from pallax.train.config import from_dict
    from pallax.train.data import TokenDataset, load_tokenizer, load_tokens, validation_batches

    if args.sparsity is None and args.quantize is None:
        raise ValueError("nothing to do: give --sparsity and/or --quantize")
    if args.sparsity is not None and args.quantize is not None:
        raise ValueError(
            "a linear holds one weight format: sparsify or quantize, not both "
            "(convert twice with different layer selections instead)"
        )
    if args.act_order and args.quant_method != "gptq":
        raise ValueError("--act-order needs --quant-method gptq")
    model, meta = load_model(_checkpoint_dir(args.checkpoint))
    config: TrainConfig = from_dict(meta["config"])
    calibration = None
    calibrated_pruning = args.prune_method in ("wanda", "sparsegpt") and args.sparsity is not None
    calibrated_quant = args.quant_method in ("lkd", "gptq") and args.quantize is not None
    if calibrated_pruning or calibrated_quant:
        tokenizer = load_tokenizer(config.tokenizer)
        dataset = TokenDataset.split(
            load_tokens(config.data, tokenizer), config.seq_len, config.validation_fraction
        )
        calibration = validation_batches(dataset, 4, config.seq_len, args.calibration_batches)
        calibration = [b[:, :-1] for b in calibration]
        import numpy as np

        calibration = np.concatenate(calibration)
    if args.sparsity is not None:
        sparsify_model(
            model, args.sparsity, args.prune_method, calibration=calibration, pattern=args.pattern
        )
    else:
        bits = 4 if args.quantize == "w4" else 8
        act_bits = 8 if args.quantize == "w8a8" else None
        quantize_model(
            model,
            bits,
            act_bits,
            args.quant_method,
            calibration=calibration,
            group_size=args.group_size,
            symmetric=args.symmetric,
            act_order=args.act_order,
        )
    out = Checkpointer(args.out)
    meta = {**meta, "weights": weight_descriptions(model), "converted_from": args.checkpoint}
    from flax import nnx

    out.save(meta.pop("step"), nnx.state(model, nnx.Param), None, meta, force=True)
    out.wait()
    out.close()
    print(f"wrote {args.out}")


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
        elif args.command == "bench":
            _bench(args, parser)
    except (ValueError, FileNotFoundError, ImportError) as e:
        parser.exit(2, f"pallax {args.command}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
