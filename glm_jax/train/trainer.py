"""Training: `glm-jax train --config FILE --workdir DIR [--config.x.y=value ...]`.

`train_and_evaluate(config, workdir)` reads top to bottom: mesh -> optimizer -> train state born
sharded (abstract shapes, then one jitted init with `out_shardings`) or restored from the newest
checkpoint into this mesh -> one compiled `train_step` -> loop (log, eval, checkpoint, preemption).

The step is one pure function (state, batch, rng) -> (state, metrics), jitted with explicit
shardings and the state donated. Its randomness (gene masks, dropout) is the run's seed folded
with the step number, and the data reader resumes at the checkpointed window, so a resumed run
repeats the uninterrupted one exactly on the same mesh. Accumulation runs k microbatches under
`lax.scan` inside the step; masks are drawn for the whole batch first, so k microbatches give
the gradient of one k-times-larger batch.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import Iterator, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from glm_jax import distributed, kernels, sharding
from glm_jax.train import flops
from glm_jax.train import metrics_log
from glm_jax.model import objective
from glm_jax.model.batch import validate_batch
from glm_jax.train import optim
from glm_jax.train import checkpoint as train_checkpoint
from glm_jax.errors import ConfigError, DistributedError
from glm_jax.model.glm import GLMConfig, abstract_model, abstract_params, config_from_dict_like, create_model

BATCH_KEYS = ("inputs_embeds", "labels", "attention_mask")
# `objective.masked_gene_metrics` sums that `objective.summarize_metrics` turns into ratios.
COUNT_KEYS = ("masked", "pseudo_correct", "absolute_correct", "confident", "confident_correct", "confidence_sum")
# Fraction of a device's large-tensor elements (>= 2^20) that may be replicated beyond a perfect
# fsdp x tensor split: the per-layer relative-distance tables [layers, 2 * max_positions - 1,
# head_dim] are unsharded by design (1023 rows divide no mesh), 6.8% of gLM-base at fsdp=8.
UNSHARDED_TOLERANCE = 0.1


@flax.struct.dataclass
class TrainState:
    step: jax.Array             # [] int32: optimizer updates applied so far
    params: dict                # nested {name: array} float32 master weights
    opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """`config.objective` as a hashable value (a static argument of the jitted steps)."""

    mask_prob: float = 0.15
    mask_value: float = -1.0
    label_clip: float = 10.0
    prob_loss_weight: float = 1e-4
    reduction: str = "all_positions"

    @classmethod
    def from_config(cls, objective_config) -> "ObjectiveConfig":
        return cls(**{f.name: objective_config[f.name] for f in dataclasses.fields(cls)})


# --- the pure step functions -------------------------------------------------------------------

def loss_fn(params: dict, graphdef, batch: dict, masked: jax.Array, dropout_rng: Optional[jax.Array],
            obj: ObjectiveConfig):
    """The masked-gene objective of one batch. Returns (loss, (mse, ce, metric sums)).

    batch: inputs_embeds [b, s, f], labels [b, s, c], attention_mask [b, s]; masked: bool [b, s].
    """
    model = nnx.merge(graphdef, params)
    inputs = objective.apply_gene_mask(batch["inputs_embeds"], masked, obj.mask_value)
    out = model(inputs, batch["attention_mask"], dropout_rng=dropout_rng)
    labels = objective.clip_labels(batch["labels"], obj.label_clip)
    terms = objective.multi_hypothesis_loss(out.predictions, out.logits, labels, masked,
                                            prob_loss_weight=obj.prob_loss_weight, reduction=obj.reduction)
    sums = objective.masked_gene_metrics(jax.lax.stop_gradient(out.predictions),
                                         jax.lax.stop_gradient(out.logits), labels, masked)
    return terms.loss, (terms.mse, terms.ce, sums)


def loss_normalizer(masked: jax.Array, reduction: str) -> jax.Array:
    """What the loss is a mean over: all b*s positions, or the masked genes."""
    if reduction == "all_positions":
        return jnp.asarray(masked.size, jnp.float32)
    return masked.sum().astype(jnp.float32)


def split_microbatches(x: jax.Array, k: int) -> jax.Array:
    """[B, ...] -> [k, B/k, ...], microbatch i = rows i, i+k, i+2k, ...

    Interleaving keeps each device's rows on that device: its contiguous block of B/n rows
    splits into k equal parts, so the scan needs no resharding.
    """
    micro = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(micro, (None, "act_batch") + (None,) * (x.ndim - 1))


def accumulated_gradients(params: dict, graphdef, batch: dict, masked: jax.Array, dropout_rng, obj: ObjectiveConfig,
                          k: int):
    """Gradient of the batch's loss from k microbatches under `lax.scan`.

    Microbatch i's loss is weighted by its share of the loss normaliser (1/k for the original's
    all-positions mean; its masked-gene count / the batch's for "masked_genes"), so the summed
    gradients equal the gradient of the whole batch. The weight scales the scalar loss before
    differentiation, not every gradient leaf after it (one pass over the parameters fewer).
    k = 1 runs no scan: a scan's zero-initialised carry and its sum are two more passes over
    a parameter-sized tree. Returns (grads, metrics).
    """
    def weighted_loss(p, mb, mm, rng, weight):
        loss, (mse, ce, sums) = loss_fn(p, graphdef, mb, mm, rng, obj)
        return weight * loss, {"loss": weight * loss, "mse": weight * mse, "ce": weight * ce} | sums

    def microbatch_rng(index):
        return None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)

    grad_fn = jax.grad(weighted_loss, has_aux=True)
    if k == 1:
        weight = (loss_normalizer(masked, obj.reduction) > 0).astype(jnp.float32)  # n / max(n, 1)
        return grad_fn(params, batch, masked, microbatch_rng(0), weight)

    micro_batch, micro_masked = jax.tree.map(lambda x: split_microbatches(x, k), (batch, masked))
    normalizers = jax.vmap(lambda m: loss_normalizer(m, obj.reduction))(micro_masked)
    weights = normalizers / jnp.maximum(normalizers.sum(), 1.0)

    def microbatch(mb, mm, weight, index):
        return grad_fn(params, mb, mm, microbatch_rng(index), weight)

    def body(totals, inputs):
        return jax.tree.map(jnp.add, totals, microbatch(*inputs)), None

    inputs = (micro_batch, micro_masked, weights, jnp.arange(k))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(microbatch, *jax.tree.map(lambda x: x[0], inputs)))
    (grads, metrics), _ = jax.lax.scan(body, zeros, inputs)
    return grads, metrics


def train_step(state: TrainState, batch: dict, base_rng: jax.Array, *, graphdef, tx: optax.GradientTransformation,
               schedule: optax.Schedule, obj: ObjectiveConfig, accumulation_steps: int):
    """One optimizer update on a global batch (inputs_embeds [B, S, F], labels [B, S, C],
    attention_mask [B, S]). Returns (new state, metrics: loss terms, metric sums, norms, lr)."""
    mask_rng, dropout_rng = jax.random.split(jax.random.fold_in(base_rng, state.step))
    masked = objective.sample_gene_mask(mask_rng, batch["attention_mask"], obj.mask_prob)
    grads, metrics = accumulated_gradients(state.params, graphdef, batch, masked, dropout_rng, obj, accumulation_steps)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Per-step norms cost full passes over every parameter-sized tree (the update norm even forces
    # the update to be materialised instead of fused into the parameter write): on CPU, gLM-base,
    # the three norms cost more than the Adam update itself. The gradient norm stays (each step's
    # NaN/Inf check reads it); the parameter norm is taken at log steps (`parameter_norm`).
    metrics |= {"grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: dict, batch: dict, rng: jax.Array, *, graphdef, obj: ObjectiveConfig) -> dict:
    """Sums over one held-out batch (no dropout; masks drawn from `rng`): the loss terms times
    their normaliser, the normaliser, and `masked_gene_metrics` sums."""
    masked = objective.sample_gene_mask(rng, batch["attention_mask"], obj.mask_prob)
    loss, (mse, ce, sums) = loss_fn(params, graphdef, batch, masked, None, obj)
    n = loss_normalizer(masked, obj.reduction)
    return {"loss_sum": loss * n, "mse_sum": mse * n, "ce_sum": ce * n, "normalizer": n, **sums}


# --- state creation and shardings --------------------------------------------------------------

def state_shardings(model_config: GLMConfig, tx: optax.GradientTransformation, mesh) -> TrainState:
    """NamedShardings of every TrainState leaf: parameters by their logical axes, optimizer
    moments like their parameters, counters replicated."""
    model = abstract_model(model_config)
    param_shardings = sharding.tree_shardings(mesh, sharding.logical_axes_tree(nnx.state(model, nnx.Param)))
    abstract_opt = jax.eval_shape(tx.init, abstract_params(model_config))
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                          transform_non_params=lambda _: sharding.replicated(mesh))
    return TrainState(step=sharding.replicated(mesh), params=param_shardings, opt_state=opt_shardings)


def state_initializer(model_config: GLMConfig, tx: optax.GradientTransformation, seed: int):
    """() -> fresh TrainState; jit it with `out_shardings` so every array is created in its shards."""

    def init() -> TrainState:
        params = nnx.to_pure_dict(nnx.state(create_model(model_config, seed), nnx.Param))
        return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params))

    return init


def init_train_state(model_config: GLMConfig, tx: optax.GradientTransformation, seed: int,
                     shardings: TrainState) -> TrainState:
    """A fresh state, each array born in its shards (never whole on one device)."""
    return jax.jit(state_initializer(model_config, tx, seed), out_shardings=shardings)()


def abstract_state(model_config: GLMConfig, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the train state: restore targets."""
    params = abstract_params(model_config)
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                       opt_state=jax.eval_shape(tx.init, params))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, shardings)


# --- data --------------------------------------------------------------------------------------

def open_reader(pattern: str, split: str, batch_size_per_host: int, seed: int, shuffle: bool,
                shuffle_buffer: Optional[int] = None):
    """This host's reader of `pattern`: an .npz of windows (InMemoryWindows, no TensorFlow
    needed) or TFRecord shards (a glob, or a make-shards directory read with `split`)."""
    from glm_jax.data import shards
    if not pattern:
        raise ConfigError(f"config.data.{split}_pattern is empty: point it at make-shards output or an .npz of windows")
    hosts = jax.process_count()
    common = dict(seed=seed, shuffle=shuffle, process_index=jax.process_index(), process_count=hosts)
    if pattern.endswith(".npz"):  # every host holds all windows and yields its rows of each global batch
        return shards.InMemoryWindows.from_npz(pattern, batch_size_per_host, **common)
    num_shards = len(shards._resolve_files(pattern, split))
    if num_shards % hosts:
        # Host p reads only shards p, p+P, ...: an uneven split gives the hosts epochs of
        # different lengths, and a data position that means something else on each of them.
        raise DistributedError(f"config.data.{split}_pattern {pattern}: its {num_shards} shards do not split evenly "
                               f"over {hosts} processes; use a process count that divides {num_shards}, or write "
                               f"a multiple of {hosts} shards (make-shards --shard-multiple {hosts})")
    return shards.ShardReader(pattern, batch_size_per_host, split=split, shuffle_buffer=shuffle_buffer, **common)


def device_batch(host_batch: dict, batch_sharding) -> dict:
    """This host's rows -> global arrays sharded over the batch axes (multi-host correct)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(host_batch[k])) for k in BATCH_KEYS}


def replicated_constant(make, shardings):
    """`make()` (host constants) as arrays on every device of the mesh. `jax.device_put` cannot
    place onto another process's devices; a jitted constant is created on each device where it lives."""
    return jax.jit(make, out_shardings=shardings)()


# --- metrics -----------------------------------------------------------------------------------

def summarize_train(records: list[tuple[int, dict, dict]]) -> dict:
    """Means of the per-step scalars of a log interval, and accuracy ratios from its summed counts.

    records: (step, device metrics fetched to host, host info) per step. Raises on a NaN/Inf
    loss or gradient norm, naming the first bad step and its windows.
    """
    for step, metrics, info in records:
        if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
            raise FloatingPointError(f"non-finite training loss {metrics['loss']} / grad norm {metrics['grad_norm']} "
                                     f"at step {step} (windows {info['window_index'][:8].tolist()} ...)")
    scalars = ("loss", "mse", "ce", "grad_norm", "learning_rate")
    summary = {k: float(np.mean([m[k] for _, m, _ in records])) for k in scalars}
    sums = {k: np.sum([m[k] for _, m, _ in records], axis=0) for k in COUNT_KEYS}
    return summary | objective.summarize_metrics(sums)


parameter_norm = jax.jit(optax.tree.norm)  # at log steps: the global L2 norm of the parameters


def summarize_eval(batch_sums: list[dict]) -> dict:
    """Held-out loss terms (weighted like the training mean), accuracies and confidence histogram."""
    total = jax.tree.map(lambda *xs: np.sum(xs, axis=0), *batch_sums)
    n = max(float(total["normalizer"]), 1.0)
    return {"loss": float(total["loss_sum"]) / n, "mse": float(total["mse_sum"]) / n, "ce": float(total["ce_sum"]) / n,
            **objective.summarize_metrics(total), "masked_genes": int(total["masked"]),
            "confidence_histogram": np.asarray(total["confidence_histogram"]).astype(int)}


def throughput(records: list, seconds: float, flops_per_step: float, num_devices: int,
               peak: Optional[float]) -> dict:
    """Step time, genes (real, not padding) and contigs per second, model TFLOP/s and MFU."""
    steps = len(records)
    genes = sum(info["genes"] for _, _, info in records) * jax.process_count()
    contigs = sum(info["contigs"] for _, _, info in records) * jax.process_count()
    out = {"step_time_s": seconds / steps, "steps_per_s": steps / seconds, "genes_per_s": genes / seconds,
           "contigs_per_s": contigs / seconds, "tflops_per_s_per_device": flops_per_step * steps / seconds / num_devices / 1e12}
    if peak:
        out["mfu"] = flops.mfu(flops_per_step, seconds / steps, num_devices, peak)
    return out


# --- the loop ----------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainResult:
    step: int              # updates applied when the run stopped
    train: dict            # the last logged training summary
    eval: dict             # the last evaluation ({} without eval data)
    preempted: bool        # stopped early by SIGTERM (after a final checkpoint)
    state: TrainState


def per_host_batch_size(batch_size: int, accumulation_steps: int, mesh) -> int:
    """Windows each host reads per step; fails unless every device gets whole microbatches."""
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % (batch_devices * accumulation_steps) or batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size {batch_size} must be divisible by data x fsdp = {batch_devices} times "
                          f"train.accumulation_steps = {accumulation_steps}, and by the {jax.process_count()} hosts")
    return batch_size // jax.process_count()


def evaluate(eval_fn, params, eval_data, start_position: dict, num_batches: int, batch_sharding, rng) -> dict:
    """The same `num_batches` held-out batches with the same masks at every evaluation."""
    eval_data.restore(start_position)
    sums = [eval_fn(params, device_batch(next(eval_data), batch_sharding), jax.random.fold_in(rng, i))
            for i in range(num_batches)]
    return summarize_eval(jax.device_get(sums))


def check_first_batch(reader, model_config: GLMConfig, batch_size: int, source: str) -> None:
    """Reads and validates the reader's next batch, then rewinds it: data that does not fit the
    model is refused before anything is written to the workdir."""
    position = reader.state()
    validate_batch(next(reader), model_config, source=source, batch_size=batch_size, require_labels=True)
    reader.restore(position)


def train_and_evaluate(config, workdir: str | pathlib.Path, *, train_data: Optional[Iterator] = None,
                       eval_data: Optional[Iterator] = None,
                       devices: Optional[list[jax.Device]] = None, progress: Optional[bool] = None) -> TrainResult:
    """Trains `config` in `workdir`, resuming from its newest checkpoint if there is one.

    train_data / eval_data: readers with the `glm_jax.data.shards` contract (iteration, `state()`,
    `restore()`); by default opened from `config.data.{train,eval}_pattern`.
    devices: the mesh's devices (default: all of every host).
    progress: progress on stderr (glm_jax.progress; default on), False for none.
    """
    model_config = config_from_dict_like(config.model)
    kernels.check_dropout(model_config.attention, model_config.attention_dropout)
    if model_config.compute_dtype == "float16":
        raise ConfigError("compute_dtype float16 needs loss scaling, which glm-jax does not implement; "
                          "train in bfloat16 (same speed, float32 range) or float32")
    t = config.train
    mesh = sharding.make_mesh(config.mesh, devices)
    batch_per_host = per_host_batch_size(t.batch_size, t.accumulation_steps, mesh)
    tx, schedule = optim.create_optimizer(config.optimizer, t.num_steps)
    obj = ObjectiveConfig.from_config(config.objective)
    train_checkpoint.check_workdir_architecture(workdir, model_config)
    if train_data is None:  # opened before anything is written: bad data leaves no workdir behind
        train_data = open_reader(config.data.train_pattern, "train", batch_per_host, t.seed, True,
                                 config.data.shuffle_buffer or None)
    if eval_data is None and config.data.eval_pattern:
        eval_data = open_reader(config.data.eval_pattern, "eval", batch_per_host, t.seed, False)
    for reader, split in ((train_data, "train"), (eval_data, "eval")):
        if reader is not None:
            check_first_batch(reader, model_config, batch_per_host,
                              f"first {split} batch of {getattr(config.data, split + '_pattern') or 'the reader'}")
    if distributed.is_primary():  # one writer of the run's files; every process saves its checkpoint shards
        train_checkpoint.write_run_config(workdir, model_config, config)
    checkpointer = train_checkpoint.TrainCheckpointer(workdir, t.keep_checkpoints)
    eval_start = eval_data.state() if eval_data is not None else None

    with sharding.use_mesh(mesh):
        shardings = state_shardings(model_config, tx, mesh)
        start = checkpointer.latest_step() or 0
        if start:
            target = abstract_state(model_config, tx, shardings)
            params, opt_state, data_state, _ = checkpointer.restore(start, model_config, target.params,
                                                                    target.opt_state)
            state = TrainState(step=replicated_constant(lambda: jnp.int32(start), shardings.step), params=params,
                               opt_state=opt_state)
            # the saved position is process 0's; readers take any process count (glm_jax.data.shards)
            train_data.restore({**data_state, "process_index": jax.process_index()})
        else:
            state = init_train_state(model_config, tx, t.seed, shardings)
        if sharding.weight_sharding_devices(mesh) > 1:
            sharding.assert_params_sufficiently_sharded(state.params, mesh, UNSHARDED_TOLERANCE)

        graphdef = nnx.graphdef(abstract_model(model_config))
        batch_sharding = sharding.batch_sharding(mesh)
        rep = sharding.replicated(mesh)
        step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule, obj=obj,
                                            accumulation_steps=t.accumulation_steps),
                          in_shardings=(shardings, batch_sharding, rep), out_shardings=(shardings, rep),
                          donate_argnums=0)
        eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, obj=obj),
                          in_shardings=(shardings.params, batch_sharding, rep), out_shardings=rep)
        base_rng, eval_rng = replicated_constant(lambda: tuple(jax.random.split(jax.random.key(t.seed))), (rep, rep))

        host_batch = next(train_data)
        compile_start = time.perf_counter()
        compiled_step = step_fn.lower(state, device_batch(host_batch, batch_sharding), base_rng).compile()
        genes = host_batch["inputs_embeds"].shape[1]
        flops_per_step = flops.train_flops_per_step(model_config, t.batch_size, genes)
        logger = metrics_log.MetricsLogger(workdir, start, t.num_steps, is_primary=jax.process_index() == 0,
                                           progress=progress)
        logger.message(f"glm-jax train: {'resuming at step ' + str(start) if start else 'new run'} in {workdir}; "
                       f"mesh {dict(mesh.shape)}; {flops.parameter_count(model_config):,} parameters; "
                       f"{flops_per_step / 1e12:.3g} TFLOP/step; compiled in {time.perf_counter() - compile_start:.1f}s")
        meta = {"model": model_config.to_dict(), "mesh": dict(mesh.shape), "batch_size": t.batch_size,
                "accumulation_steps": t.accumulation_steps}

        records, last_train, last_eval, preempted = [], {}, {}, False
        step, interval_start = start, time.perf_counter()
        with distributed.Preemption() as preemption:
            while step < t.num_steps and not preempted:
                batch = device_batch(host_batch, batch_sharding)
                with jax.transfer_guard("disallow"):
                    state, metrics = compiled_step(state, batch, base_rng)
                step += 1
                records.append((step, metrics, {"window_index": np.asarray(host_batch["window_index"]),
                                                "genes": int(host_batch["attention_mask"].sum()),
                                                "contigs": len(host_batch["attention_mask"])}))
                data_position = train_data.state()  # after this step's batch: what a resume continues from
                if step < t.num_steps:
                    host_batch = next(train_data)   # read while the device computes
                logger.advance()
                if step % t.log_every == 0 or step == t.num_steps:
                    fetched = [(s, m, info) for (s, _, info), m in zip(records, jax.device_get([m for _, m, _ in records]))]
                    last_train = summarize_train(fetched) | {"param_norm": float(parameter_norm(state.params))} | throughput(
                        fetched, time.perf_counter() - interval_start, flops_per_step, mesh.size,
                        flops.peak_flops_per_device())
                    logger.write(step, "train", last_train)
                    records, interval_start = [], time.perf_counter()
                if eval_data is not None and (step % t.eval_every == 0 or step == t.num_steps):
                    eval_began = time.perf_counter()
                    last_eval = evaluate(eval_fn, state.params, eval_data, eval_start, t.eval_batches,
                                         batch_sharding, eval_rng)
                    logger.write(step, "eval", last_eval)
                    interval_start += time.perf_counter() - eval_began  # keep eval out of the step time
                preempted = preemption.reached(step)  # the same step on every process
                if step % t.checkpoint_every == 0 or step == t.num_steps or preempted:
                    checkpointer.save(step, state.params, state.opt_state, data_position, meta)
        if preempted:
            logger.message(f"SIGTERM: saved a checkpoint at step {step} and stopped; rerun the same command to resume")
        checkpointer.wait()
        checkpointer.close()
        logger.close()
    return TrainResult(step=step, train=last_train, eval=last_eval, preempted=preempted, state=state)
