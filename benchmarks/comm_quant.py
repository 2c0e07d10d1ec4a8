"""Quantized FSDP communication (ZeRO++ / SDP4Bit): bytes on the wire, step time, loss.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python -m benchmarks.comm_quant                    # bytes + CPU step times
    ... python -m benchmarks.comm_quant --loss-steps 300   # + the loss table and plot
    python -m benchmarks.comm_quant                        # GPU: all local GPUs

For each mode: bytes each device receives per training step, counted from the
compiled HLO's collectives (all-gather, all-to-all, reduce-scatter, all-reduce,
collective-permute) and from the analytic formula (``comm_quant.step_bytes``),
the ratio to the uncompressed run, and the step time on the devices present.
``--loss-steps`` trains the embedded demo corpus with every mode for the same
steps and prints the final validation losses. The last table is arithmetic,
not a measurement: communication time of the 1b preset at 100 / 400 Gb/s.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from pathlib import Path

import jax
from flax import nnx

from pallax import sharding as ps
from pallax.models.transformer import Linear
from pallax.sharding import comm_quant
from pallax.train import Trainer, preset_config
from pallax.train.config import TrainConfig

_DTYPE_BYTES = {
    "f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
    "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1,
}  # fmt: skip
_OPS = ("all-gather", "all-to-all", "reduce-scatter", "all-reduce", "collective-permute")
_INSTRUCTION = re.compile(
    r"= (?P<type>.*?) (?P<op>" + "|".join(_OPS) + r")(?P<start>-start)?\((?P<rest>.*)$"
)
_BUFFER = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")

# Modes compared: (label, TrainConfig comm_* fields).
MODES = (
    ("none (XLA)", {}),
    ("fp32 explicit", dict(comm_explicit=True)),
    ("int8", dict(comm_quant_weights="int8", comm_quant_grads="int8")),
    ("int4", dict(comm_quant_weights="int4", comm_quant_grads="int4")),
    (
        "int4 wdiff",
        dict(
            comm_quant_weights="int4",
            comm_quant_grads="int4",
            comm_weight_diff=True,
            comm_hadamard=True,
        ),
    ),  # fmt: skip
    ("int8 hpz", dict(comm_quant_weights="int8", comm_quant_grads="int8", comm_hpz=True)),
)


def _group_size(rest: str, num_devices: int) -> int:
    if match := _MESH_GROUPS.search(rest):
        sizes = dict(
            (name.strip().strip("'"), int(size))
            for name, size in (item.split("=") for item in match.group(1).split(","))
        )
        axes = [a.strip().strip("'") for a in match.group(2).split(",") if a.strip()]
        return math.prod(sizes[a] for a in axes)
    if match := _IOTA_GROUPS.search(rest):
        return int(match.group(1).split(",")[-1])
    if match := _LIST_GROUPS.search(rest):
        return len([d for d in match.group(1).split(",") if d])
    return num_devices


def collective_bytes(hlo_text: str, num_devices: int) -> dict[str, float]:
    """Bytes one device receives per execution, by collective kind, from compiled HLO.

    Ring accounting with ``n`` devices in the group and ``S`` the result size:
    all-gather / all-to-all ``S (n-1)/n``, reduce-scatter ``S (n-1)``, all-reduce
    ``2 S (n-1)/n``, collective-permute ``S``.
    """
    totals = dict.fromkeys(_OPS, 0.0)
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.search(line)
        if not match:
            continue
        op = match.group("op")
        buffers = [
            _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
            for dtype, dims in _BUFFER.findall(match.group("type"))
        ]
        if not buffers:
            continue
        # Async starts return (operand, result[, ...]): the result is the largest buffer.
        size = max(buffers) if match.group("start") else sum(buffers)
        n = _group_size(match.group("rest"), num_devices)
        if n <= 1 and op != "collective-permute":
            continue
        factor = {
            "all-gather": (n - 1) / n,
            "all-to-all": (n - 1) / n,
            "reduce-scatter": n - 1,
            "all-reduce": 2 * (n - 1) / n,
            "collective-permute": 1.0,
        }[op]
        totals[op] += size * factor
    totals["total"] = sum(totals[op] for op in _OPS)
    return totals


def step_hlo(trainer: Trainer) -> str:
    """Compiled HLO text of the trainer's jitted train step."""
    with jax.set_mesh(trainer.mesh):
        lowered = trainer._train_step.lower(trainer.params, trainer.opt_state, trainer.batch(0))
        return lowered.compile().as_text()


def dense_fsdp_params(trainer: Trainer) -> int:
    """Number of dense linear weights split over fsdp (what comm_quant compresses)."""
    total = 0
    for _, layer in nnx.iter_modules(trainer.model):
        w = layer.kernel.get_value() if isinstance(layer, Linear) else None
        if isinstance(w, jax.Array) and comm_quant.fsdp_axis_of(w.sharding.spec) is not None:
            total += w.size
    return total


def time_steps(trainer: Trainer, steps: int) -> float:
    """Median seconds per step after a compile step (state is not written back)."""
    params, opt_state = trainer.params, trainer.opt_state
    params, opt_state, out = trainer._run(trainer._train_step, params, opt_state, trainer.batch(0))
    jax.block_until_ready(out)
    samples = []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        params, opt_state, out = trainer._run(
            trainer._train_step, params, opt_state, trainer.batch(step)
        )
        jax.block_until_ready(out)
        samples.append(time.perf_counter() - start)
    trainer.params, trainer.opt_state = params, opt_state  # the old buffers were donated
    return statistics.median(samples)


def one_b_table(fsdp: int, per_host: int, block_size: int = 128) -> list[str]:
    """Arithmetic (not measured): per-device fsdp bytes and wire time of the 1b preset."""
    config = preset_config("1b")
    m = config.model
    per_layer = (
        m.embed_dim * m.num_heads * m.dim_per_head * 2
        + m.embed_dim * m.num_kv_heads * m.dim_per_head * 2
        + 3 * m.embed_dim * m.mlp_dim
    )
    params = m.num_layers * per_layer + m.embed_dim * m.vocab_size  # + the untied head
    tokens_per_device = config.batch_size * config.seq_len / fsdp
    flops = 6 * params * tokens_per_device
    compute_s = flops / (989e12 * 0.4)  # H100 bf16 dense peak at 40% MFU (assumed)
    lines = [
        f"1b preset, fsdp={fsdp} ({fsdp // per_host} hosts x {per_host}), {params / 1e9:.2f}B "
        f"dense params, {tokens_per_device:.0f} tokens/device/step; compute ~{compute_s:.3f} s "
        "at 40% MFU (ARITHMETIC, not measured)",
        f"{'mode':<14}{'GB/dev/step':>12}{'ratio':>7}{'100Gb/s s':>11}{'400Gb/s s':>11}"
        f"{'step@100':>10}{'step@400':>10}",
    ]
    base = None
    for label, comm in (
        ("none fp32", comm_quant.CommQuant(explicit=True)),
        ("none bf16", None),
        ("int8", comm_quant.CommQuant("int8", "int8", block_size=block_size)),
        ("int4", comm_quant.CommQuant("int4", "int4", block_size=block_size)),
        (
            "int4 wdiff",
            comm_quant.CommQuant("int4", "int4", block_size=block_size, weight_diff=True),
        ),  # fmt: skip
        (
            "int8 hpz*",
            comm_quant.CommQuant(
                "int8", "int8", block_size=block_size, hpz=True, fsdp_per_host=per_host
            ),
        ),  # fmt: skip
    ):
        if comm is None:  # weights cast to bf16 before the gathers, bf16 gradients
            nbytes = comm_quant.step_bytes(
                params, fsdp, comm_quant.CommQuant(), weight_bytes=2, grad_bytes=2
            )["total"]
        else:
            parts = comm_quant.step_bytes(params, fsdp, comm)
            # hpZ: the backward gather stays on the in-host links (NVLink), off the wire.
            nbytes = parts["total"] - (parts["backward_gather"] if comm.hpz else 0)
        base = base or nbytes
        wire = [nbytes / (gbps * 1e9 / 8) for gbps in (100, 400)]
        lines.append(
            f"{label:<14}{nbytes / 1e9:>12.2f}{base / nbytes:>7.2f}{wire[0]:>11.3f}"
            f"{wire[1]:>11.3f}{compute_s + wire[0]:>10.3f}{compute_s + wire[1]:>10.3f}"
        )
    lines.append(
        "step@X = compute + wire time (no overlap: the upper bound); with perfect overlap a "
        "step takes max(compute, wire). *hpz: cross-host bytes only."
    )
    return lines


def loss_run(config: TrainConfig, label: str, comm: dict) -> dict:
    trainer = Trainer(config.replace(**comm), progress=False, log=lambda *_: None)
    start = time.perf_counter()
    history = trainer.fit()
    elapsed = time.perf_counter() - start
    curve = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    return {"label": label, "val": curve, "train": train, "seconds": elapsed}


def plot_curves(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        steps, losses = zip(*run["val"], strict=True)
        ax.plot(steps, losses, marker="o", markersize=3, label=run["label"])
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("demo corpus, tiny preset, data x fsdp mesh: comm quantization")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--mesh", default=None, help="default: data=2,fsdp=N/2 (fsdp=N if odd)")
    parser.add_argument(
        "--fsdp-per-host",
        type=int,
        default=None,
        help="simulate hosts for hpZ / two-level qgZ (default: process layout)",
    )
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    parser.add_argument("--modes", default=None, help="comma-separated labels (default: all)")
    parser.add_argument("--loss-steps", type=int, default=0, help="also train every mode")
    parser.add_argument("--out", default="runs/comm_quant", help="loss curves JSON + plot")
    parser.add_argument("--coordinator", help="multi-process: coordinator host:port")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args(argv)  # fmt: skip
    ps.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    main_process = jax.process_index() == 0
    print_ = print if main_process else (lambda *a, **k: None)
    n = jax.device_count()
    mesh = args.mesh or (f"data=2,fsdp={n // 2}" if n % 2 == 0 and n >= 4 else f"fsdp={n}")
    config = preset_config(args.preset).replace(mesh=mesh, eval_every=0, log_every=10**6)
    changes = {k: v for k, v in (("batch_size", args.batch_size), ("seq_len", args.seq_len)) if v}
    config = config.replace(**changes)
    modes = MODES
    if args.modes:
        wanted = [m.strip() for m in args.modes.split(",")]
        modes = [m for m in MODES if m[0] in wanted]
    fsdp = ps.parse_mesh_spec(mesh).get("fsdp", 1)
    per_host = args.fsdp_per_host
    if per_host is None and jax.process_count() == 1 and fsdp % 2 == 0:
        per_host = fsdp // 2  # simulate two hosts: hpZ and two-level qgZ have work to do
    hosts = "process layout" if per_host is None else f"{per_host} fsdp devices per host"
    per_host = {} if per_host is None else {"comm_fsdp_per_host": per_host}
    print_(
        f"# {jax.devices()[0].device_kind} x{n} ({jax.process_count()} process(es)), jax "
        f"{jax.__version__}: preset {args.preset}, mesh {mesh}, batch {config.batch_size} x "
        f"{config.seq_len}, block 128, {hosts}"
    )
    header = (
        f"{'mode':<15}{'HLO MB/dev':>11}{'ratio':>7}{'gather':>9}{'a2a':>9}{'r-scat':>9}"
        f"{'a-red':>9}{'permute':>9}{'formula':>9}{'step ms':>9}"
    )
    print_(header + "\n" + "-" * len(header))
    results, base = {}, None
    for label, comm in modes:
        trainer = Trainer(config.replace(**comm, **(per_host if comm else {})), progress=False,
                          log=lambda *_: None)  # fmt: skip
        counted = collective_bytes(step_hlo(trainer), n)
        fsdp = trainer.mesh.shape["fsdp"]
        resolved = trainer.comm if trainer.comm.enabled else comm_quant.CommQuant()
        params = dense_fsdp_params(trainer)
        formula = comm_quant.step_bytes(params, fsdp, resolved)["total"]
        step_s = time_steps(trainer, args.steps)
        base = base or counted["total"]
        results[label] = dict(counted, formula=formula, step_s=step_s)
        mb = lambda b: f"{b / 2**20:>9.3f}"  # noqa: E731
        print_(
            f"{label:<15}{counted['total'] / 2**20:>11.3f}{base / counted['total']:>7.2f}"
            f"{mb(counted['all-gather'])}{mb(counted['all-to-all'])}"
            f"{mb(counted['reduce-scatter'])}{mb(counted['all-reduce'])}"
            f"{mb(counted['collective-permute'])}{mb(formula)}{step_s * 1e3:>9.1f}",
            flush=True,
        )
    print_(
        "formula: dense linear weights only (fwd + bwd gathers + gradient reduction); the HLO "
        "also holds the embedding gather, norm/embedding gradient all-reduces and the data-axis "
        "gradient all-reduce of each shard"
    )
    print_()
    for line in one_b_table(fsdp=16, per_host=8):
        print_(line)
    if args.loss_steps:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        loss_config = preset_config(args.preset).replace(
            mesh=mesh, steps=args.loss_steps, eval_every=max(args.loss_steps // 10, 1),
            log_every=max(args.loss_steps // 10, 1), checkpoint_every=0, **changes,
        )  # fmt: skip
        print_(f"\n# loss: demo corpus, {args.loss_steps} steps, mesh {mesh}")
        print_(f"{'mode':<15}{'final val':>10}{'vs none':>9}{'minutes':>9}")
        runs = []
        for label, comm in modes:
            if label == "fp32 explicit":
                continue  # same arithmetic as none up to summation order
            run = loss_run(loss_config, label, {**comm, **(per_host if comm else {})})
            runs.append(run)
            final = run["val"][-1][1]
            ref = runs[0]["val"][-1][1]
            print_(
                f"{label:<15}{final:>10.4f}{(final - ref) / ref:>+9.2%}{run['seconds'] / 60:>9.1f}",
                flush=True,
            )
        if main_process:
            (out / "loss_curves.json").write_text(json.dumps(runs, indent=1))
            plot_curves(runs, out / "loss_curves.png")
        print_(f"curves: {out / 'loss_curves.json'}, {out / 'loss_curves.png'}")
        results["loss"] = runs
    return results


if __name__ == "__main__":
    main()
