"""The training loop: data -> plan -> step -> metrics, timelines, checkpoints and evaluation.

`run(cfg, workdir)` is what the CLI calls and what tests and notebooks call directly. Batches
are fetched `pipeline.plan_ahead` steps early so that their plans are searched in the background
while earlier batches train.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from dip_jax.config import ConfigError, TrainConfig
from dip_jax.data.oversize import OversizeCounts
from dip_jax.data.packing import Budget, padding_fraction
from dip_jax.data.pipeline import PackedBatches, Share, TrainData, batch_dataset, replica_rows, train_iterator
from dip_jax.data.stream import file_stream
from dip_jax.runtime import distributed
from dip_jax.runtime.distributed import broadcast_json, gather_int_rows, gather_ints
from dip_jax.runtime.mesh import mesh_for, mesh_shape
from dip_jax.train import pretrained
from dip_jax.train.checkpoint import Checkpointer
from dip_jax.train.checkpoint_guard import CheckpointGuard
from dip_jax.train.errors import RunStopped
from dip_jax.train.evaluate import greedy_accuracy
from dip_jax.train.interrupt import Interrupts
from dip_jax.train.metrics import MetricsWriter, RunStats, read_records
from dip_jax.train.nonfinite import NonfiniteMonitor
from dip_jax.train.optim import build_optimizer
from dip_jax.train.peers import PeerLoss
from dip_jax.train.planning import BatchPlan
from dip_jax.train.preflight import check_state_fits
from dip_jax.train.state import abstract_model, count_params, create_state, model_layouts, state_bytes, state_shapes
from dip_jax.train.step import make_eval_loss, make_logits_fn, make_train_step, put_batch
from dip_jax.train.workdir import workdir_session

PLAN_FIELDS = ("scheduler", "predicted_step_seconds", "prediction_error", "lower_bound_seconds", "bubble_fraction",
               "plan_seconds", "plan_fallback", "plan_fallback_reason", "plan_wait_seconds", "compiles", "cache_hits",
               "step_compiled", "stored_fraction", "predicted_peak_gb", "compiled_peak_gb")


def _key(cache_dir) -> str | None:
    return None if cache_dir is None else str(cache_dir)


def _eval_batch_count(cfg: TrainConfig, probe) -> int:
    per_batch = max(1, sum(len(mb) for mb in probe.metadata))
    return max(1, math.ceil(cfg.data.eval_samples / per_batch))


class Evaluator:
    """Held-out loss (through the pipelined executor when one runs) and, for the digits and files tasks,
    greedy decoding accuracy (decoding needs logits, so it uses the unpipelined model)."""

    def __init__(self, cfg: TrainConfig, graphdef, mesh, pipelined=None, cache_dir=None):
        self.cfg, self.mesh, self.pipelined = cfg, mesh, pipelined
        source = batch_dataset(cfg, "eval", cache_dir)
        first = source[0]
        count = (file_stream(cfg, "eval", _key(cache_dir)).eval_batch_count(cfg.data.eval_samples)
                 if cfg.data.task == "files" else _eval_batch_count(cfg, first))
        self.batches = [first] + [source[i] for i in range(1, count)]
        self.loss_fn = make_eval_loss(graphdef)
        self.cache_dir = cache_dir
        self.logits_fn = make_logits_fn(graphdef)

    def put(self, arrays):
        return put_batch(arrays, self.mesh)

    def __call__(self, params) -> dict[str, float]:
        if self.pipelined is not None:
            losses = [float(self.pipelined.eval_loss(params, b)) for b in self.batches]
        else:
            losses = [float(self.loss_fn(params, self.put(b.arrays))) for b in self.batches]
        out = {"eval_loss": float(np.mean(losses))}
        if self.cfg.data.task in ("digits", "files"):
            model_params = self.pipelined.model_params(params) if self.pipelined is not None else params
            # the files task scores answer tokens, not the template's special tokens
            ignore = (file_stream(self.cfg, "eval", _key(self.cache_dir)).dataset.tok.special_ids
                      if self.cfg.data.task == "files" else None)
            out.update(greedy_accuracy(self.logits_fn, model_params, self.batches, self.put, ignore))
        return out


class BatchFeed:
    """Fetches batches ahead of the step and hands them to the planner as soon as they exist.

    Yields (step, batch, data_state, plan): `data_state` is the iterator position just after the
    batch (what a checkpoint of that step must hold); `plan` is None under the reference step.
    """

    def __init__(self, cfg: TrainConfig, data, start: int, planner=None, pipelined: bool = False):
        self.cfg, self.data, self.planner, self.pipelined = cfg, data, planner, pipelined
        self.queue: collections.deque = collections.deque()
        self.next_step = start + 1
        self.ahead = cfg.pipeline.plan_ahead if pipelined else 0

    def _fill(self, upto: int) -> None:
        while self.next_step <= min(upto, self.cfg.train.steps):
            t0 = time.perf_counter()
            batch = next(self.data)
            batch.wait_seconds = time.perf_counter() - t0
            self.queue.append((self.next_step, batch, self.data.get_state()))
            if self.planner is not None:
                self.planner.submit(self.next_step, batch.metadata)
            self.next_step += 1

    def __iter__(self):
        while True:
            if not self.queue:
                self._fill(self.next_step + self.ahead)
            if not self.queue:
                return
            step, batch, data_state = self.queue.popleft()
            self._fill(step + self.ahead)            # plans of later batches search while this one runs
            plan = None
            if self.pipelined:
                plan = self.planner.get(step, batch.metadata) if self.planner is not None else None
                plan = _from_lead(plan)
            yield step, batch, data_state, plan


def _from_lead(plan: BatchPlan | None) -> BatchPlan:
    """Process 0's plan on every process (the others plan nothing), as JSON."""
    if jax.process_count() == 1:
        return plan
    data = broadcast_json(plan.to_json() if jax.process_index() == 0 else None)
    return plan if jax.process_index() == 0 else BatchPlan.from_json(data)


def _wants_timeline(cfg: TrainConfig, step: int, start: int) -> bool:
    t = cfg.train
    return step - start <= t.timeline_first or (t.timeline_every > 0 and step % t.timeline_every == 0)


def _write_timeline(workdir: pathlib.Path, step: int, plan, measured: float, median_error: float | None) -> None:
    from dip_jax.viz.timeline import prediction_text, write_png, write_trace
    out = workdir / "timelines"
    out.mkdir(exist_ok=True)
    r = plan.slowest
    title = f"step {step} ({plan.scheduler}, replica {plan.slowest_index})"
    write_png(r.plan, r.timeline, out / f"step_{step}.png", title, measured_seconds=measured,
              median_error=median_error)
    write_trace(r.plan, r.timeline, out / f"step_{step}.trace.json",
                f"{title}, measured {measured:.4g} s, {prediction_text(r.timeline, measured, median_error)}")


def _gb(n: int) -> str:
    return f"{n / 2 ** 30:.3f} GiB" if n >= 2 ** 27 else f"{n / 2 ** 20:.2f} MiB"


def run(cfg: TrainConfig, workdir: str | pathlib.Path) -> dict:
    """Train (resuming from `workdir`'s newest good checkpoint if there is one). Returns the
    summary. Raises RunStopped (with an exit code) when the run is interrupted or must stop."""
    if cfg.model.extra_modules:
        # the built-in tasks make samples for the built-in modules only: training would feed the
        # extra encoder nothing, silently
        raise ConfigError(f"model.extra_modules: data.task={cfg.data.task!r} brings no inputs for module "
                          f"{cfg.model.extra_modules[0][0]!r}; train it from your own loop (README: Bring your own module)")
    cfg = pretrained.resolve(cfg)        # init_from modules take their checkpoint's architecture
    workdir = pathlib.Path(workdir)
    lead = jax.process_index() == 0
    peers = None
    if distributed.HEARTBEATS is not None:
        peers = distributed.HEARTBEATS.on_lost = PeerLoss(workdir)
    with Interrupts() as interrupts, workdir_session(cfg, workdir, lead):
        try:
            return _run(cfg, workdir, lead, interrupts, peers)
        except BaseException as e:
            _after_failure(peers, e)
            raise


def _after_failure(peers: PeerLoss | None, error: BaseException) -> None:
    """In a multi-process run, an error that is not every process's: end this process if a peer
    is lost (the error was its loss), else tell the peers why this one stops."""
    if peers is None or (isinstance(error, RunStopped) and error.everywhere) or getattr(error, "_peers_asked", False):
        return
    error._peers_asked = True
    peers.after_failure(distributed.HEARTBEATS, error)
    distributed.HEARTBEATS.leave(str(error).splitlines()[0] if str(error) else type(error).__name__)


def _finished(cfg: TrainConfig, workdir: pathlib.Path, step: int, lead: bool) -> dict:
    """A rerun of a finished run changes nothing, its summary included."""
    if lead:
        print(f"dip_jax: already at step {step} of {cfg.train.steps}; nothing to do ({workdir})", flush=True)
    path = workdir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {"steps": cfg.train.steps, "resumed_from": step}


def _stop_after_interrupt(stop: tuple[int, list[int]], interrupts, ckpt, step: int, start: int, state,
                          data_state) -> RunStopped:
    signum, signalled = stop
    if ckpt is None:
        done = "checkpointing is off (checkpoint.enabled=false)"
    elif step > start:
        ckpt.save(step, state, data_state, force=True, wait=True)
        done = "checkpoint saved"
    else:
        done = "no step trained since the last checkpoint"
    code = 128 + (interrupts.signum or signum)
    if jax.process_count() == 1:
        return RunStopped(f"interrupted at step {step}, {done}, rerun the same command to resume", code, everywhere=True)
    on = f"process {signalled[0]}" if len(signalled) == 1 else f"processes {', '.join(map(str, signalled))}"
    return RunStopped(f"interrupted at step {step} (signal on {on}), {done}, rerun the same command on every "
                      f"process to resume", code, everywhere=True)


def _check_files(cfg: TrainConfig, index_dir: pathlib.Path, lead: bool) -> dict:
    """The files task's index and tokenizer (ConfigError on a bad key, file or record); the bad
    records skipped by reason."""
    if cfg.data.task != "files":
        return {}
    dataset = file_stream(cfg, "train", str(index_dir)).dataset
    skipped = dict(dataset.skipped)
    if cfg.data.eval_path:
        file_stream(cfg, "eval", str(index_dir))
    if lead and dataset.warning():
        print(f"dip_jax: {dataset.warning()}", flush=True)
    return skipped


def _replicas_of(mesh) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the data replicas with a device of this process, the replicas this process counts for:
    those whose lowest process is this one, so that each replica is counted once)."""
    me = jax.process_index()
    hosts = [sorted({d.process_index for d in mesh.devices[r].flat}) for r in range(mesh.devices.shape[0])]
    return tuple(r for r, h in enumerate(hosts) if me in h), tuple(r for r, h in enumerate(hosts) if h[0] == me)


class DecodeShare:
    """The files task in a multi-process run: each process decodes only the records of the
    microbatches its data replicas train (the input pipeline predicts them with the planner's
    own replica order), and the numbers a whole batch defines are summed over the processes."""
    from dip_jax.data.files.source import DECODE_REASONS as REASONS

    def __init__(self, cfg: TrainConfig, mesh, order, index_dir):
        self.cfg, self.data = cfg, cfg.mesh.data
        self.local, self.owned = _replicas_of(mesh)
        self.share = Share(order, self.local)
        self.rebuild = PackedBatches(cfg, "train", cache_dir=index_dir)
        self.rebuilt = 0

    def complete(self, step: int, batch, plan: BatchPlan):
        """(the batch with every microbatch the plan gives this process decoded and its loss
        normaliser `n_tokens` of the whole batch, the whole batch's decode failures by reason,
        the records each process decoded for it): one collective."""
        decoded = len(batch.decoded)
        needed = replica_rows(plan.order, self.local, self.data)
        if not set(needed) <= set(batch.rows):
            # a plan whose replica order is not the predicted one (never expected: both come from
            # the same metadata and cost model) still trains the right records
            if not self.rebuilt:
                print(f"dip_jax: warning: step {step}: the plan gave process {jax.process_index()} microbatches "
                      f"it had not decoded; decoding them now", flush=True)
            self.rebuilt += 1
            t0 = time.perf_counter()
            batch = dataclasses.replace(self.rebuild.build(batch.index, needed),
                                        wait_seconds=batch.wait_seconds + time.perf_counter() - t0)
            decoded += len(batch.decoded)
        owned = list(replica_rows(plan.order, self.owned, self.data))
        failed = [sum(1 for row, why in batch.failed if why == r and row in owned) for r in self.REASONS]
        rows = gather_int_rows([int(batch.arrays["loss_mask"][owned].sum()) if owned else 0, *failed, decoded])
        batch.arrays["n_tokens"] = np.float32(max(1.0, sum(r[0] for r in rows)))
        failures = {why: n for k, why in enumerate(self.REASONS) if (n := sum(r[1 + k] for r in rows))}
        return batch, failures, [r[-1] for r in rows]


def _decode_share(cfg: TrainConfig, mesh, ctx, index_dir) -> DecodeShare | None:
    if not (cfg.data.task == "files" and cfg.data.decode_shares and ctx is not None and jax.process_count() > 1):
        return None
    share = DecodeShare(cfg, mesh, ctx.replica_order, index_dir)
    return share if len(share.local) < cfg.mesh.data else None     # every replica here: decode it all


def _log_records(workdir: pathlib.Path, step: int, batch) -> None:
    out = workdir / "records_decoded"
    out.mkdir(exist_ok=True)
    with open(out / f"process_{jax.process_index()}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "batch_index": batch.index, "records": list(batch.decoded)}) + "\n")


def _run(cfg: TrainConfig, workdir: pathlib.Path, lead: bool, interrupts: Interrupts, peers: PeerLoss | None) -> dict:
    # memory first: a config too large for this host is refused with the hint to plan it instead,
    # whatever else does not fit (the paper's configs also ask for more devices than a laptop has)
    check_state_fits(cfg, jax.local_devices()[: cfg.mesh.devices])
    index_dir = workdir / "data_index"
    records_skipped = _check_files(cfg, index_dir, lead)     # bad data and vocabularies fail before compiling
    mesh = mesh_for(cfg)

    graphdef, model = abstract_model(cfg)
    pipelined = cfg.pipeline.schedule != "none"
    tx = build_optimizer(cfg.optim, cfg.train.steps, cfg.model.modules, mesh if pipelined else None, pipelined)
    planner = ctx = None
    if pipelined:
        from dip_jax.plan.schedulers import PlanContext
        from dip_jax.train.pipelined import PipelinedStep
        from dip_jax.train.planning import Planner
        measured_on = None
        if cfg.pipeline.hardware == "auto":
            from dip_jax.train.calibration import resolve_auto
            cfg, measured_on = resolve_auto(cfg, workdir, mesh, model, tx)
        ctx = PlanContext(cfg)
        step_fn = PipelinedStep(cfg, model, mesh, tx, ctx, measured_on)
        if cfg.pipeline.memory_strategy != "recompute":
            # what a stored op keeps, exactly, from this executor's traced step: the cap holds
            # whatever the cost profile guessed
            ctx.cost.residuals = step_fn.residual_profile(state_shapes(cfg, tx, mesh, step_fn.layouts))
        planner = Planner(cfg, ctx) if lead else None   # other processes receive process 0's plans
        layouts = step_fn.layouts
    else:
        layouts = model_layouts(cfg)
        shardings = jax.tree.map(lambda x: x.sharding, state_shapes(cfg, tx, mesh, layouts))
        reference = make_train_step(graphdef, tx, shardings=shardings)
        step_fn = lambda state, batch, plan: reference(state, put_batch(batch.arrays, mesh))
    state = create_state(cfg, tx, mesh, layouts)
    share = _decode_share(cfg, mesh, ctx, index_dir)
    data = train_iterator(cfg, index_dir, share.share if share is not None else None)
    ckpt = (CheckpointGuard(Checkpointer(workdir / "checkpoints", cfg.checkpoint, layouts, mesh), lead)
            if cfg.checkpoint.enabled else None)
    start = 0
    if ckpt is not None:
        state, restored = ckpt.restore(state, data)
        start = restored or 0
    if start >= cfg.train.steps:
        ckpt.close()
        if planner is not None:
            planner.close()
        return _finished(cfg, workdir, start, lead)
    has_eval = cfg.data.task != "files" or bool(cfg.data.eval_path)
    evaluator = (Evaluator(cfg, graphdef, mesh, step_fn if pipelined else None, index_dir)
                 if has_eval and (cfg.train.eval_every or cfg.data.task in ("digits", "files")) else None)
    log = MetricsWriter(workdir, cfg.train.steps, start, cfg.train.progress and lead, enabled=lead)
    stats = RunStats()
    stats.add_history(read_records(workdir / "metrics.jsonl", start) if lead and start else [])
    guard = NonfiniteMonitor(cfg.train)
    bytes_total, bytes_device = state_bytes(state, layouts)
    placement = {"mesh": mesh_shape(mesh), "devices": int(mesh.devices.size), "state_bytes_total": bytes_total,
                 "state_bytes_per_device_max": bytes_device}
    if lead:
        print(f"dip_jax: {cfg.model.name}, {count_params(nnx.state(model)):,} params, {len(mesh.devices.flat)} devices "
              f"{mesh_shape(mesh)} in {jax.process_count()} process(es), schedule {cfg.pipeline.schedule}, "
              f"steps {start}->{cfg.train.steps}, workdir {workdir}", flush=True)
        print(f"dip_jax: state (params + optimizer) {_gb(bytes_total)} in all, at most {_gb(bytes_device)} "
              f"on one device", flush=True)

    t_start, final_eval = time.perf_counter(), {}
    budget, paddings = Budget.from_config(cfg), []
    # the whole run's decode failures by reason and records decoded per process, resumed runs included
    decode_failed: dict[str, int] = dict(data.counts.get("records_skipped", {}))
    decoded_per_process = list(data.counts.get("records_decoded_per_process", []))
    if len(decoded_per_process) != jax.process_count():       # resumed on another number of processes
        decoded_per_process = [sum(decoded_per_process)] + [0] * (jax.process_count() - 1)
    counts = lambda: {"records_skipped": dict(decode_failed), "records_decoded_per_process": list(decoded_per_process)}
    step = start
    try:
        for step, batch, data_state, plan in BatchFeed(cfg, data, start, planner, pipelined):
            if peers is not None:
                peers.step = step
            if share is not None:
                batch, failures, decoded = share.complete(step, batch, plan)
            else:                      # every process decoded the whole batch
                failures = {}
                for _, reason in batch.failed:
                    failures[reason] = failures.get(reason, 0) + 1
                decoded = [len(batch.decoded)] * jax.process_count()
            for reason, n in failures.items():
                decode_failed[reason] = decode_failed.get(reason, 0) + n
            decoded_per_process = [a + b for a, b in zip(decoded_per_process, decoded)]
            data_state = TrainData.with_counts(data_state, counts())
            if cfg.data.log_records:
                _log_records(workdir, step, batch)
            compiles_before = step_fn.cache_fields["compiles"] if plan is not None else 0
            t0 = time.perf_counter()
            state, metrics = step_fn(state, batch, plan)
            stats.add_plan(plan)
            stats.add_oversize(batch.oversize)
            padding = padding_fraction(batch.metadata, budget)
            paddings.append(padding)
            finite = guard.observe(step, {k: float(metrics[k]) for k in ("loss", "grad_norm", "update_skipped")})   # waits
            timeline = lead and plan is not None and _wants_timeline(cfg, step, start)
            if timeline or step % cfg.train.log_every == 0 or step == cfg.train.steps:
                metrics = {k: float(v) for k, v in metrics.items()}       # waits for the step
                measured = time.perf_counter() - t0
                fields = dict.fromkeys(PLAN_FIELDS)
                if plan is not None:
                    fields.update(plan.fields(), **step_fn.cache_fields)
                    fields["prediction_error"] = measured / fields["predicted_step_seconds"] - 1.0
                    fields["step_compiled"] = fields["compiles"] > compiles_before
                    if plan.fallback:
                        print(f"dip_jax: step {step}: planner fell back to {plan.scheduler} ({plan.fallback})",
                              flush=True)
                record = log.write("train", step, step_seconds=measured, batch_index=batch.index,
                                   samples=sum(len(mb) for mb in batch.metadata), samples_truncated=batch.oversize[0],
                                   samples_skipped=batch.oversize[1], epoch=batch.epoch, padding_fraction=padding,
                                   data_wait_seconds=batch.wait_seconds, **metrics, **fields)
                stats.add_record(record)
                log.progress(step, loss=metrics["loss"])
                if timeline:
                    _write_timeline(workdir, step, plan, measured, stats.prediction_error_median_abs())
            if evaluator is not None and cfg.train.eval_every and step % cfg.train.eval_every == 0 \
                    and step != cfg.train.steps:
                log.write("eval", step, **evaluator(state["params"]))
            guard.check_stop(ckpt.latest_step() if ckpt is not None else None)
            stop = interrupts.agree(gather_ints)         # every process stops after the same step
            if stop is not None:
                raise _stop_after_interrupt(stop, interrupts, ckpt, step, start, state, data_state)
            if ckpt is not None and finite:
                ckpt.save(step, state, data_state, force=step == cfg.train.steps)
        if evaluator is not None:
            final_eval = log.write("eval", cfg.train.steps, **evaluator(state["params"]))
    except ConfigError:
        # a bad record met while decoding a batch (data.bad_records=error): keep what was trained
        if ckpt is not None and step > start and ckpt.latest_step() != step:
            ckpt.save(step, state, data_state, force=True, wait=True)
        raise
    except BaseException as e:
        _after_failure(peers, e)               # before closing: a save cannot finish without the lost peer
        raise
    finally:
        log.close()
        if ckpt is not None:
            ckpt.close()
        if planner is not None:
            planner.close()
    wall = time.perf_counter() - t_start
    decoded = {}
    if cfg.data.task == "files":
        for reason, n in decode_failed.items():
            records_skipped[reason] = records_skipped.get(reason, 0) + n
        decoded = {"records_decoded": sum(decoded_per_process), "records_decoded_per_process": decoded_per_process}
    summary = {"steps": cfg.train.steps, "resumed_from": start, "schedule": cfg.pipeline.schedule,
               **placement, "wall_seconds": wall, **stats.summary(wall),
               "padding_fraction": float(np.mean(paddings)) if paddings else None, "records_skipped": records_skipped,
               **decoded,
               **{k: v for k, v in final_eval.items() if k.startswith("eval")}}
    if lead:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
        print(RunStats.table(summary), flush=True)
        warning = OversizeCounts(stats.truncated, stats.skipped).warning(cfg.data.oversize, Budget.from_config(cfg))
        if warning:
            print(f"dip_jax: {warning}", flush=True)
    return summary
