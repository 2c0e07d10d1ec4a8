"""The training loop: a jit-compiled, sharded train step around a pallax Transformer.

* Parameters stay float32 (master weights); the model computes in its
  ``config.dtype`` (bf16 by default), so gradients arrive in float32.
* Only floating leaves that are real weights train: dense parameters and the
  nonzero ``values`` of sparse weights (their bitmap, hence the mask, is fixed);
  quantized weights are frozen. Everything else rides along untouched.
* AdamW (decoupled weight decay on matrices and sparse values, not on norms)
  with linear warmup + cosine decay and global-norm clipping; gradient
  accumulation with ``lax.scan`` over micro-batches inside the same jit.
* Batches are a pure function of ``(seed, step)`` and checkpoints hold the step,
  so a resumed run continues the identical loss trajectory.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pallax import sharding as ps
from pallax.models import Transformer, generate, shard_model
from pallax.models.transformer import Linear
from pallax.pallas_kernels import QuantizedWeight, SparseWeight
from pallax.sharding import comm_quant
from pallax.train import data as data_lib
from pallax.train.checkpoint import Checkpointer, weight_descriptions
from pallax.train.config import TrainConfig, to_dict
from pallax.train.metrics import (
    JsonlLog,
    ProgressBar,
    device_peak_tflops,
    training_flops_per_token,
)


def leaf_roles(params) -> tuple[list[bool], list[bool]]:
    """Per leaf of ``params`` (``jax.tree.leaves`` order): ``(trainable, decayed)``."""
    is_weight = lambda x: isinstance(x, QuantizedWeight | SparseWeight)  # noqa: E731

    def roles(x):
        if isinstance(x, QuantizedWeight):  # frozen
            return jax.tree.map(lambda _: (False, False), x)
        if isinstance(x, SparseWeight):  # values train, the mask does not
            return SparseWeight(
                values=(True, True),
                bitmap=(False, False),
                tile_offsets=(False, False),
                in_features=x.in_features,
                out_features=x.out_features,
            )
        floating = jnp.issubdtype(x.dtype, jnp.floating)
        return (floating, floating and x.ndim >= 2)

    tree = jax.tree.map(roles, params, is_leaf=is_weight)
    pairs = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, tuple))
    return [p[0] for p in pairs], [p[1] for p in pairs]


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=min(config.warmup_steps, config.steps),
        decay_steps=max(config.steps, config.warmup_steps + 1),
        end_value=config.learning_rate * config.min_lr_ratio,
    )


def make_optimizer(config: TrainConfig, decay_mask: list[bool]) -> optax.GradientTransformation:
    """Clipping + AdamW over the list of trainable leaves."""
    adamw = optax.adamw(
        learning_rate_schedule(config),
        b1=config.adam_b1,
        b2=config.adam_b2,
        weight_decay=config.weight_decay,
        mask=list(decay_mask),
    )
    if config.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)
    return adamw


def cross_entropy(logits, targets) -> jax.Array:
    """Mean next-token cross entropy (nats) of ``logits [B, T, V]`` against ``targets [B, T]``."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(log_z - target_logits)


def default_mesh(spec: str | None):
    """``None`` on one device without a spec, else a mesh (default: all devices on data)."""
    if spec is None and jax.device_count() == 1:
        return None
    return ps.make_mesh(**(ps.parse_mesh_spec(spec) if spec else {"data": -1}))


class Trainer:
    """Trains ``model`` (default: a fresh ``Transformer(config.model)``).

    Args:
      config: the run (:class:`TrainConfig`).
      model: e.g. a sparsified or quantized model to fine-tune.
      output_dir: checkpoints in ``output_dir/checkpoints``, metrics in
        ``output_dir/metrics.jsonl``; the latest checkpoint is resumed.
      mesh: default from ``config.mesh`` (see :func:`default_mesh`).
      tokens: token ids to train on instead of ``config.data``.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: Transformer | None = None,
        output_dir: str | Path | None = None,
        mesh=None,
        tokens: np.ndarray | None = None,
        progress: bool = True,
        log=print,
    ):
        if not isinstance(config, TrainConfig):
            raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = config
        self.is_main = jax.process_index() == 0
        self._log = log if self.is_main else (lambda *_: None)
        self.tokenizer = data_lib.load_tokenizer(config.tokenizer)
        if config.model.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(
                f"model vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size}"
            )
        if tokens is None:
            tokens = data_lib.load_tokens(config.data, self.tokenizer)
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be 1D integer ids, got {tokens.dtype}{tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= config.model.vocab_size):
            raise ValueError(
                f"tokens span [{tokens.min()}, {tokens.max()}], outside the model's "
                f"vocab_size={config.model.vocab_size}"
            )
        self.dataset = data_lib.TokenDataset.split(
            tokens.astype(np.int32), config.seq_len, config.validation_fraction
        )
        self.mesh = mesh if mesh is not None else default_mesh(config.mesh)
        if self.mesh is not None:
            c = config.model
            ps.validate_layout(
                self.mesh,
                num_heads=c.num_heads,
                num_kv_heads=c.num_kv_heads,
                seq_len=config.seq_len,
                sequence_method=c.sequence_method,
                mlp_dim=c.mlp_dim,
                vocab_size=c.vocab_size,
            )
            shards = self.mesh.shape[ps.DATA] * self.mesh.shape[ps.FSDP]
            if (config.batch_size // config.grad_accum) % shards:
                raise ValueError(
                    f"micro-batch {config.batch_size // config.grad_accum} sequences "
                    f"(batch_size / grad_accum) must divide over data x fsdp = {shards} devices"
                )
        self.comm = self._resolve_comm(config)
        if model is None:
            model = Transformer(config.model, rngs=nnx.Rngs(config.seed))
        elif model.config != config.model:
            raise ValueError("model.config differs from config.model")
        else:  # train steps donate their inputs: keep the caller's model usable
            graphdef, state = nnx.split(model)
            model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
        if self.mesh is not None:
            with jax.set_mesh(self.mesh):
                shard_model(model, self.mesh)
        self._fsdp_specs = self._fsdp_weight_specs(model) if self.comm.enabled else {}
        self.weights = weight_descriptions(model)
        self.graphdef, self.params = nnx.split(model)
        self._treedef = jax.tree.structure(self.params)
        trainable, decayed = leaf_roles(self.params)
        self._train_index = [i for i, t in enumerate(trainable) if t]
        self.optimizer = make_optimizer(
            config, [d for d, t in zip(decayed, trainable, strict=True) if t]
        )
        self.schedule = learning_rate_schedule(config)
        self.opt_state = self._init_optimizer()
        if self.comm.weight_diff:  # the SDP4Bit references travel (and checkpoint) with it
            self.opt_state = (self.opt_state, self._initial_references(model))
        self.step = 0
        self.batch_sharding = (
            None if self.mesh is None else ps.named_sharding(self.mesh, ("batch", None))
        )
        self._train_step = jax.jit(self._step_fn, donate_argnums=(0, 1))
        self._eval_loss = jax.jit(self._eval_fn)
        self.progress = progress
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.checkpointer = None
        self.metrics = None
        if self.output_dir is not None:
            self.checkpointer = Checkpointer(
                self.output_dir / "checkpoints",
                keep=config.keep_checkpoints,
                save_every=config.checkpoint_every,
            )
            self.metrics = JsonlLog(self.output_dir / "metrics.jsonl")
            if self.checkpointer.latest_step() is not None:
                self.restore()
        self.peak_tflops = config.peak_tflops or device_peak_tflops()
        self.flops_per_token = training_flops_per_token(config.model, config.seq_len)

    # -- parameters -------------------------------------------------------------------------

    def _resolve_comm(self, config: TrainConfig) -> ps.CommQuant:
        """The comm quantization of ``config``, checked against (and resolved on) the mesh."""
        comm = config.comm_quant()
        if not comm.enabled:
            return comm
        if self.mesh is None or self.mesh.shape[ps.FSDP] == 1:
            shape = None if self.mesh is None else dict(self.mesh.shape)
            raise ValueError(
                f"the comm_* settings ({comm}) act on the fsdp collectives: the mesh needs "
                f"fsdp > 1 (e.g. --mesh data=2,fsdp=4), got {shape}"
            )
        return comm.resolve(self.mesh)

    @staticmethod
    def _fsdp_weight_specs(model) -> dict:
        """``{layer path: PartitionSpec}`` of the dense linear weights split over fsdp."""
        specs = {}
        for path, layer in nnx.iter_modules(model):
            w = layer.kernel.get_value() if isinstance(layer, Linear) else None
            if isinstance(w, jax.Array) and comm_quant.fsdp_axis_of(w.sharding.spec) is not None:
                specs[".".join(map(str, path))] = w.sharding.spec
        return specs

    def _fsdp_layers(self, model):
        for path, layer in nnx.iter_modules(model):
            name = ".".join(map(str, path))
            if name in self._fsdp_specs:
                yield name, layer

    def _initial_references(self, model) -> dict:
        """Exact replicated copies of the dense fsdp weights (SDP4Bit's starting point)."""
        return {
            name: jax.device_put(
                layer.kernel.get_value(),
                jax.sharding.NamedSharding(
                    self.mesh, comm_quant.reference_spec(self._fsdp_specs[name])
                ),
            )
            for name, layer in self._fsdp_layers(model)
        }

    def _refreshed_references(self, params, references) -> dict:
        model = nnx.merge(self.graphdef, params)
        return {
            name: comm_quant.refresh(
                layer.kernel.get_value(),
                references[name],
                self._fsdp_specs[name],
                self.comm,
                self.mesh,
            )
            for name, layer in self._fsdp_layers(model)
        }

    def _trainable(self, params):
        leaves = jax.tree.leaves(params)
        return [leaves[i] for i in self._train_index]

    def _with_trainable(self, params, trainable):
        leaves = list(jax.tree.leaves(params))
        for i, leaf in zip(self._train_index, trainable, strict=True):
            leaves[i] = leaf
        return jax.tree.unflatten(self._treedef, leaves)

    def _init_optimizer(self):
        trainable = self._trainable(self.params)
        if self.mesh is None:
            return self.optimizer.init(trainable)
        return ps.init_optimizer_state(self.optimizer, trainable, self.mesh)

    @property
    def model(self) -> Transformer:
        """The current model (shares the trainer's parameter arrays)."""
        return nnx.merge(self.graphdef, self.params)

    # -- jitted steps -----------------------------------------------------------------------

    def _loss(self, trainable, params, tokens, *, comm=None, references=None):
        model = nnx.merge(self.graphdef, self._with_trainable(params, trainable))
        if comm is not None:  # dense layers gather and reduce through comm_quant
            for name, layer in self._fsdp_layers(model):
                reference = None if references is None else references[name]
                weight = ps.FsdpWeight(layer.kernel.get_value(), reference, comm)
                layer.kernel.set_value(weight)
        return cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])

    def _step_fn(self, params, opt_state, tokens):
        trainable = self._trainable(params)
        references = None
        if self.comm.weight_diff:
            opt_state, references = opt_state
        loss_fn = self._loss
        if self.comm.enabled:
            loss_fn = functools.partial(self._loss, comm=self.comm, references=references)
        grad_fn = jax.value_and_grad(loss_fn)
        accum = self.config.grad_accum
        if accum == 1:
            loss, grads = grad_fn(trainable, params, tokens)
        else:
            # Row i of micro-batch j is row i * accum + j, so each micro-batch keeps
            # the batch dimension's data/fsdp sharding.
            micro = tokens.reshape(tokens.shape[0] // accum, accum, -1).swapaxes(0, 1)
            micro = ps.shard_as(micro, (None, "batch", None))

            def accumulate(carry, tokens):
                loss, grads = grad_fn(trainable, params, tokens)
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trainable))
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, micro)
            loss, grads = jax.tree.map(lambda g: g / accum, (loss, grads))
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.optimizer.update(grads, opt_state, trainable)
        params = self._with_trainable(params, optax.apply_updates(trainable, updates))
        if self.comm.weight_diff:
            opt_state = (opt_state, self._refreshed_references(params, references))
        return params, opt_state, {"loss": loss, "grad_norm": grad_norm}

    def _eval_fn(self, params, tokens):
        return self._loss(self._trainable(params), params, tokens)

    def _run(self, fn, *args):
        if self.mesh is None:
            return fn(*args)
        with jax.set_mesh(self.mesh):
            return fn(*args)

    # -- public API -------------------------------------------------------------------------

    def evaluate(self, params=None) -> float:
        """Mean validation loss (nats / token) over ``config.eval_batches`` fixed batches."""
        params = self.params if params is None else params
        c = self.config
        batches = data_lib.validation_batches(
            self.dataset, c.batch_size // c.grad_accum, c.seq_len, c.eval_batches
        )
        losses = [
            self._run(self._eval_loss, params, data_lib.place_batch(b, self.batch_sharding))
            for b in batches
        ]
        return float(np.mean([float(x) for x in losses]))

    def batch(self, step: int):
        c = self.config
        return data_lib.train_batch(
            self.dataset, c.seed, step, c.batch_size, c.seq_len, self.batch_sharding
        )

    def fit(self, steps: int | None = None) -> list[dict]:
        """Trains until step ``steps`` (default ``config.steps``); returns the log records."""
        c = self.config
        steps = c.steps if steps is None else steps
        if steps > c.steps:
            raise ValueError(f"steps={steps} exceeds config.steps={c.steps} (the schedule's end)")
        bar = ProgressBar(steps, enabled=self.progress and self.is_main)
        history, window_start, window_steps = [], None, 0
        if self.step == 0 and c.eval_every:
            history.append(self._record({"step": 0, "val_loss": self.evaluate()}, bar))
        while self.step < steps:
            tokens = self.batch(self.step)
            self.params, self.opt_state, out = self._run(
                self._train_step, self.params, self.opt_state, tokens
            )
            self.step += 1
            window_steps += 1
            if window_start is None:  # the first step compiles: time from its end
                jax.block_until_ready(out["loss"])
                window_start, window_steps = time.perf_counter(), 0
            record = None
            if self.step % c.log_every == 0 or self.step == steps:
                record = self._train_record(out, window_start, window_steps)
                window_start, window_steps = time.perf_counter(), 0
            if c.eval_every and (self.step % c.eval_every == 0 or self.step == steps):
                record = {**(record or {"step": self.step}), "val_loss": self.evaluate()}
            if record is not None:
                history.append(self._record(record, bar))
                window_start = time.perf_counter()
            bar.update(self.step, f"loss {float(out['loss']):.3f}" if record else "")
            if self.checkpointer is not None:
                self.checkpointer.save(self.step, self.params, self.opt_state, self._meta())
        bar.close()
        if self.checkpointer is not None:
            self.save()
        return history

    def _train_record(self, out, window_start, window_steps) -> dict:
        loss = float(out["loss"])  # blocks until the step is done
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss} at step {self.step}; lower learning_rate "
                f"({self.config.learning_rate}) or check the data"
            )
        record = {
            "step": self.step,
            "loss": loss,
            "grad_norm": float(out["grad_norm"]),
            "lr": float(self.schedule(self.step - 1)),
        }
        elapsed = time.perf_counter() - window_start
        if window_steps > 0 and elapsed > 0:
            step_time = elapsed / window_steps
            tokens_per_s = self.config.tokens_per_step / step_time
            record.update(step_time=step_time, tokens_per_s=tokens_per_s)
            if self.peak_tflops:
                peak = self.peak_tflops * 1e12 * jax.device_count()
                record["mfu"] = self.flops_per_token * tokens_per_s / peak
        return record

    def _record(self, record: dict, bar: ProgressBar) -> dict:
        if self.metrics is not None and self.is_main:
            self.metrics.write(record)
        parts = [f"step {record['step']:>6}"]
        for key, fmt in (
            ("loss", "loss {:.4f}"),
            ("val_loss", "val {:.4f}"),
            ("lr", "lr {:.2e}"),
            ("tokens_per_s", "{:,.0f} tok/s"),
            ("step_time", "{:.3f} s/step"),
            ("mfu", "MFU {:.1%}"),
        ):
            if key in record:
                parts.append(fmt.format(record[key]))
        bar.clear_line()
        self._log(" | ".join(parts))
        return record

    def _meta(self) -> dict:
        return {
            "config": to_dict(self.config),
            "weights": self.weights,
            "tokenizer": self.tokenizer.name,
        }

    def save(self) -> None:
        """Saves the current step (if not saved already) and waits for it to land."""
        if self.checkpointer is None:
            raise ValueError("this Trainer has no output_dir to save into")
        if self.checkpointer.latest_step() != self.step:
            self.checkpointer.save(self.step, self.params, self.opt_state, self._meta(), force=True)
        self.checkpointer.wait()

    def restore(self, step: int | None = None) -> int:
        """Loads a checkpoint (default: the latest) into the trainer; returns its step."""
        template = lambda tree: jax.tree.map(  # noqa: E731
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree
        )
        saved_config = self.checkpointer.meta(step)["config"]
        # The SDP4Bit reference copies live in the optimizer state: its layout differs.
        saved_diff = bool(saved_config.get("comm_weight_diff", False))
        if saved_diff != self.comm.weight_diff:
            raise ValueError(
                f"checkpoint in {self.checkpointer.directory} was saved with "
                f"comm_weight_diff={saved_diff}, this run has comm_weight_diff="
                f"{self.comm.weight_diff}: resume with the same --comm-weight-diff setting"
            )
        params, opt_state, meta = self.checkpointer.restore(
            step, template(self.params), template(self.opt_state)
        )
        saved = meta["config"]["model"]
        if saved != to_dict(self.config)["model"]:
            raise ValueError(
                f"checkpoint in {self.checkpointer.directory} was trained with model config "
                f"{saved}, not {to_dict(self.config)['model']}"
            )
        self.params, self.opt_state, self.step = params, opt_state, int(meta["step"])
        if self.metrics is not None and self.is_main:
            self.metrics.truncate_after(self.step)
        self._log(f"resumed from step {self.step} ({self.checkpointer.directory})")
        return self.step

    def sample(self, prompt: str, max_new_tokens: int = 100, **sampling) -> str:
        """Generates a continuation of ``prompt`` with the current weights."""
        tokens = self.tokenizer.encode(prompt)[None]
        if self.mesh is None:
            out = generate(self.model, tokens, max_new_tokens, **sampling)
        else:
            with jax.set_mesh(self.mesh):
                out = generate(self.model, tokens, max_new_tokens, **sampling)
        return self.tokenizer.decode(np.asarray(out)[0])

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.wait()
            self.checkpointer.close()
