"""The training loop: set-up, then step, log, evaluate, checkpoint — one code path for every layout.

Set-up: config -> ParallelDims -> DeviceMesh -> model on ``meta`` -> ``parallelize`` (which returns
the :class:`~meshweave.parallel.runtime.ParallelRuntime`) -> optimizer -> data -> checkpoint or
initial weights. One step: this rank's microbatches -> the step's global valid-token count ->
forward / backward and the gradient exchange (the runtime: pipeline or not, any data / tensor /
context / expert parallelism, any replica exchange) -> global grad norm + clip -> non-finite guard
-> optimizer step -> the replicas' outer exchange -> metrics (loss, throughput, MFU, memory; comm
bytes, seconds and exposed seconds from the ledger on every logged row).

The loop knows the layout only through ParallelDims and the runtime; adding a parallelism changes
``parallel/``, not this file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from meshweave.checkpoint.hf import load_initial_weights
from meshweave.checkpoint.manager import CheckpointError, CheckpointManager, checkpoint_info, read_manifest
from meshweave.comm import capture
from meshweave.comm.ops import LEDGER, CommGroup, all_reduce_scalars
from meshweave.config import Config
from meshweave.data.build import build_datasets
from meshweave.data.datasets import IGNORE_INDEX
from meshweave.data.loader import ShardedLoader
from meshweave.launch.env import RankInfo, destroy_process_group, init_process_group, pick_device, rank_info
from meshweave.launch.preemption import StopRequest
from meshweave.metrics.accounting import device_peak_tflops, mfu, model_flops_per_token, peak_memory_bytes
from meshweave.metrics.sinks import MetricsLogger
from meshweave.metrics.tensor_memory import TensorMemoryPeak
from meshweave.models.family import family_of
from meshweave.models.llama import Transformer, build_model, num_params, params_per_token
from meshweave.models.lora import apply_lora, count_parameters, freeze_base
from meshweave.options import to_toml
from meshweave.parallel.dims import resolve_degrees
from meshweave.parallel.parallelize import parallelize
from meshweave.parallel.runtime import ParallelRuntime
from meshweave.trainer.optim import build_optimizer, lr_at, set_lr
from meshweave.validation import preflight


class NonFiniteLossError(RuntimeError):
    """Raised after ``train.max_bad_steps`` consecutive steps with a non-finite loss or gradient."""


class Trainer:
    """Owns one rank's part of a run. ``fit()`` trains to ``train.steps`` and returns the losses."""

    def __init__(self, cfg: Config, info: RankInfo | None = None) -> None:
        # Start of the window the next logged row covers: the ledger's too (set-up collectives
        # land in the first row), so comm_exposed_frac compares like with like.
        self._last_log_at = time.perf_counter()
        self.cfg = cfg
        self.info = info or rank_info()
        self.device = pick_device(cfg.train.device, self.info)
        self.dims = resolve_degrees(cfg, self.info.world_size)
        init_process_group(self.device, self.info, timeout_s=cfg.comm.timeout_s)
        capture.install()
        self.mesh = self.dims.build_mesh(self.device.type)
        self.world = CommGroup.world()
        self.run_dir = Path(cfg.out)
        torch.manual_seed(cfg.train.seed)

        model: Transformer = build_model(cfg.model, moe=cfg.moe)
        if cfg.lora.rank:  # before the split: every stage's blocks carry their own adapters
            apply_lora(family_of(model).block_dict(model).values(), cfg.lora)
            freeze_base(model)
        self.n_params = num_params(model)
        self.n_trainable, _ = count_parameters(model)
        used, frozen = params_per_token(model)
        self.flops_per_token = model_flops_per_token(
            used, cfg.model.n_layers, cfg.model.dim, cfg.train.seq_len, n_frozen=frozen
        )
        self.runtime: ParallelRuntime = parallelize(model, self.dims, self.mesh, cfg, self.device, _token_loss_sum)
        self.model = self.runtime.model
        self.replicas = self.runtime.replicas
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device, self.mesh.group("dp_replicate"))
        self.replicas.bind_optimizer(self.optimizer)

        self.train_set, self.eval_set, _ = build_datasets(cfg.data, cfg.train.seq_len, cfg.train.seed)
        self.dp_group: CommGroup = self.runtime.dp_group
        self.loader = ShardedLoader(
            self.train_set,
            cfg.train.global_batch,
            self.runtime.micro_batch,
            self.dp_group.rank,
            self.dp_group.size,
            cfg.train.seed,
            documents=cfg.data.document_mask,
        )

        self.step = 0
        self.tokens_seen = 0
        self.bad_steps = 0
        self.skipped_steps = 0
        self._saved_step = -1
        self.stopped_early = False
        self.tensor_memory: TensorMemoryPeak | None = None  # log.tensor_memory, while fit() runs
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints",
            cfg.checkpoint.keep,
            self.world,
            checkpoint_info(cfg, self.info.world_size, parameters=self._parameter_counts()),
            async_save=cfg.checkpoint.async_,
            replica=self.replicas.checkpoint_replica(),
        )
        self._prepare_run_dir()
        self.peak_tflops = device_peak_tflops(cfg.log.peak_tflops)
        messages = self._start()
        self.logger = MetricsLogger(
            str(self.run_dir),
            cfg.log,
            cfg.train.steps,
            self.info.is_rank0,
            dataclasses.asdict(cfg),
            start_step=self.step,
        )
        for message in messages:
            self.logger.event(message)

    # ---------------------------------------------------------------------------------------
    # set-up helpers

    def _prepare_run_dir(self) -> None:
        if self.info.is_rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(to_toml(self.cfg))

    def _parameter_counts(self) -> dict[str, int]:
        """Trainable vs total parameters of the full model (manifests and the first event)."""
        return {"trainable": self.n_trainable, "total": self.n_params}

    def _trainer_state(self) -> dict[str, int | float]:
        return {
            "step": self.step,
            "consumed_samples": self.loader.consumed_samples,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "lr": lr_at(max(self.step - 1, 0), self.cfg.optim, self.cfg.train.steps),
        }

    def _start(self) -> list[str]:
        """Resume from a checkpoint, or initialise from ``checkpoint.init_from``; returns the
        events to log (the logger starts at the resumed step, so it is created afterwards)."""
        share = 100.0 * self.n_trainable / self.n_params
        messages: list[str] = [f"trainable parameters: {self.n_trainable:,} of {self.n_params:,} ({share:.3g}%)"]
        path = self.checkpoints.resolve(self.cfg.checkpoint.resume, messages.append)
        if path is None:
            messages.append(f"starting from scratch: {self.n_params:,} parameters, layout {self.dims}")
            if self.cfg.checkpoint.resume == "none" and self.checkpoints.complete():
                messages.append(
                    f"warning: checkpoint.resume=none but {self.checkpoints.root} holds "
                    "checkpoints; they are replaced as this run saves"
                )
            if self.cfg.checkpoint.init_from:
                load_initial_weights(self.model, self.cfg)
                messages.append(f"initialised weights from {self.cfg.checkpoint.init_from}")
            return messages
        saved_replicas = read_manifest(path).get("layout", {}).get("dp_replicate", 1)
        if self.replicas.checkpoint_replica() is not None and saved_replicas != self.dims.dp_replicate:
            kind = "CO2" if self.replicas.mode == "co2" else "DiLoCo"
            raise CheckpointError(
                f"{path} holds {saved_replicas} {kind} replicas but this run has "
                f"dp_replicate={self.dims.dp_replicate}; resume with the same dp_replicate"
            )
        extra = self.replicas.checkpoint_extra()
        state, manifest, rank_local = self.checkpoints.load(
            path, self.model, self.optimizer, self._trainer_state(), extra
        )
        warning = self.replicas.restore(extra, rank_local)
        if warning:
            messages.append(warning)
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.skipped_steps = int(state["skipped_steps"])
        self.loader.load_state_dict({"consumed_samples": int(state["consumed_samples"]), "seed": self.cfg.train.seed})
        self._saved_step = self.step
        messages.append(f"resumed from {path} at step {self.step}")
        if manifest.get("world_size") != self.info.world_size:
            # Per-rank RNG streams do not map across world sizes: derive fresh ones from the seed,
            # the step and the rank, so the new layout's run is deterministic too.
            torch.manual_seed(self.cfg.train.seed + 1_000_003 * self.step + self.info.rank)
            messages.append(
                f"layout changed ({manifest.get('layout')} on {manifest.get('world_size')} ranks "
                f"-> {self.dims} on {self.info.world_size}): model and optimizer resharded, "
                "RNG streams re-derived from the seed"
            )
        return messages

    # ---------------------------------------------------------------------------------------
    # one step

    def train_step(self) -> dict:
        """One optimizer step over one global batch; returns its metrics record (without the comm
        ledger, which the logged rows take, see :meth:`_step_and_bookkeep`)."""
        started = time.perf_counter()
        runtime = self.runtime
        batch = runtime.shard(self.loader.next_batch())
        global_tokens = runtime.count_tokens(batch)
        set_lr(self.optimizer, lr := lr_at(self.step, self.cfg.optim, self.cfg.train.steps))
        loss_value = runtime.forward_backward(batch, global_tokens)
        grad_norm = runtime.clip_gradients(self.cfg.optim.grad_clip or float("inf"))

        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            runtime.after_optimizer_step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.skipped_steps += 1
            self.logger.event(
                f"step {self.step + 1}: non-finite loss={loss_value} grad_norm={grad_norm}; "
                f"step skipped ({self.bad_steps} in a row)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            raise NonFiniteLossError(
                f"{self.bad_steps} consecutive steps had a non-finite loss or gradient "
                f"(last loss={loss_value}); lower optim.lr, check the data, or raise "
                "train.max_bad_steps"
            )

        self.step += 1
        event = runtime.after_step(self.step, last=self.step == self.cfg.train.steps)
        if event:
            self.logger.event(f"step {self.step}: {event}")
        step_time = time.perf_counter() - started
        step_tokens = self.cfg.train.global_batch * self.cfg.train.seq_len
        self.tokens_seen += step_tokens
        tokens_per_s = step_tokens / step_time
        return {
            "step": self.step,
            "time": time.time(),
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": self.tokens_seen,
            "tokens_per_s": tokens_per_s,
            "step_time_s": step_time,
            "mfu": mfu(tokens_per_s / self.info.world_size, self.flops_per_token, self.peak_tflops),
            "mem_peak_bytes": peak_memory_bytes(self.device),
            "skipped_steps": self.skipped_steps,
            **runtime.metrics(),
            **self.loader.metrics(),  # source_tokens of a data.blend
            **self._tensor_memory_metrics(),
        }

    def _tensor_memory_metrics(self) -> dict:
        """``mem_tensor_peak_bytes``: every rank's peak of live tensor bytes so far, indexed by
        rank (one small all-reduce), when ``log.tensor_memory`` is on."""
        if self.tensor_memory is None:
            return {}
        per_rank = [0.0] * self.info.world_size
        per_rank[self.info.rank] = float(self.tensor_memory.peak_bytes())
        return {"mem_tensor_peak_bytes": [int(b) for b in all_reduce_scalars(per_rank, self.world, self.device)]}

    # ---------------------------------------------------------------------------------------
    # eval, checkpoint, loop

    def evaluate(self) -> float | None:
        """Mean token loss over ``train.eval_batches`` global batches of the held-out split
        (on DiLoCo's global weights when replicas train apart)."""
        if len(self.eval_set) == 0:
            return None
        loader = ShardedLoader(
            self.eval_set,
            self.cfg.train.global_batch,
            self.runtime.micro_batch,
            self.dp_group.rank,
            self.dp_group.size,
            self.cfg.train.seed,
            documents=self.cfg.data.document_mask,
        )
        return self.runtime.evaluate(loader.next_batch() for _ in range(self.cfg.train.eval_batches))

    def save_checkpoint(self) -> None:
        path = self.checkpoints.save(
            self.step,
            self.model,
            self.optimizer,
            self._trainer_state(),
            extra=self.replicas.checkpoint_extra(),
            rank_local=self.replicas.rank_local(),
        )
        self._saved_step = self.step
        self.logger.event(
            f"writing checkpoint {path} in the background" if self.cfg.checkpoint.async_ else f"saved checkpoint {path}"
        )

    def _report_async_commit(self) -> None:
        commit = self.checkpoints.last_commit
        if self.cfg.checkpoint.async_ and commit and commit.get("reported") is None:
            commit["reported"] = True
            self.logger.event(
                f"checkpoint step-{commit['step']} committed after "
                f"{commit['committed_unix'] - commit['started_unix']:.2f}s in the background"
            )

    def fit(self) -> list[float]:
        """Train until ``train.steps`` (or ``train.stop_at_step``, or an agreed stop signal);
        returns this run's losses."""
        last = min(self.cfg.train.steps, self.cfg.train.stop_at_step or self.cfg.train.steps)
        losses: list[float] = []
        stop = StopRequest()
        self.model.train()
        if self.cfg.log.tensor_memory:
            self.tensor_memory = TensorMemoryPeak(self.model, self.optimizer)
        try:
            with self.tensor_memory or contextlib.nullcontext():
                while self.step < last:
                    losses.append(self._step_and_bookkeep(last))
                    signum = stop.agreed(self.world, self.device)
                    if signum and self.step < last:
                        self.logger.event(
                            f"stop requested ({signal.Signals(signum).name}) at step {self.step}: "
                            "checkpointing and exiting; resume with --checkpoint.resume=auto"
                        )
                        self.stopped_early = True
                        break
            if (self.cfg.checkpoint.save_final or self.stopped_early) and self._saved_step != self.step:
                self.save_checkpoint()
        finally:
            stop.restore()
        return losses

    def _step_and_bookkeep(self, last: int) -> float:
        """One step, then eval / log / checkpoint as configured; returns the step's loss."""
        cfg = self.cfg
        record = self.train_step()
        if cfg.train.eval_interval and (self.step % cfg.train.eval_interval == 0 or self.step == last):
            record["eval_loss"] = self.evaluate()
        if self.step % cfg.log.interval == 0 or self.step == last:
            # A logged row holds the ledger since the previous logged row (unlogged steps, evals and
            # checkpoints included), so the rows of a run sum to its comm_bytes_total.
            comm_bytes, comm_seconds = LEDGER.take_step()
            exposed = LEDGER.take_exposed()  # this rank's compute time spent waiting on each dim/op
            now = time.perf_counter()
            window, self._last_log_at = now - self._last_log_at, now
            record.update(
                comm_bytes=comm_bytes,
                comm_bytes_total=LEDGER.cumulative_bytes(),
                comm_seconds={k: round(v, 6) for k, v in comm_seconds.items()},
                comm_exposed_s={k: round(v, 6) for k, v in exposed.items()},
                # the share of the row's wall time (same window as the ledger's) compute stood still
                comm_exposed_frac=sum(exposed.values()) / window if window > 0 else None,
            )
            self.logger.log(record)
        if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
            self.save_checkpoint()
        self._report_async_commit()
        return record["loss"]

    def close(self, clean: bool = True) -> None:
        """Finish any background checkpoint write (collective unless ``clean`` is False, on an error
        path where peers may be gone), then close the sinks."""
        if clean:
            self.checkpoints.wait()
            self._report_async_commit()
        self.logger.close()


def _token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross entropy of the valid target tokens (fp32), the loss every layout normalises."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def train(cfg: Config) -> list[float]:
    """Run a whole training job on this rank (collective over the job); returns its losses."""
    preflight(cfg)
    trainer = Trainer(cfg)
    clean = False
    try:
        losses = trainer.fit()
        trainer.logger.event(f"done at step {trainer.step}; run directory {cfg.out}")
        clean = True
        return losses
    finally:
        trainer.close(clean)
        destroy_process_group(clean)
