"""The training loop: set-up in DESIGN.md's order, then step, log, evaluate, checkpoint.

One step: this rank's microbatches -> global valid-token count (one tiny all-reduce) -> forward /
backward per microbatch, loss = token-sum / global token count, gradient sync only on the last
microbatch -> gradient exchange finished -> global grad norm + clip -> non-finite guard ->
optimizer step -> metrics (loss, comm bytes from the ledger, throughput, MFU, memory).

Because the loss is normalised by the *global* number of valid tokens and gradients are summed
over data-parallel ranks, a step under any data-parallel layout computes the same gradient as one
process with the same global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from meshweave.comm import capture
from meshweave.comm.ops import LEDGER, CommGroup, all_reduce_scalars
from meshweave.config import Config, ConfigError, to_toml
from meshweave.launch.env import RankInfo, destroy_process_group, init_process_group, pick_device, rank_info
from meshweave.launch.preemption import StopRequest
from meshweave.models.llama import Transformer, build_model, moe_settings, num_params
from meshweave.parallel.data import gradient_sync
from meshweave.parallel.dims import resolve_degrees
from meshweave.parallel.expert import balance_experts, expert_metrics
from meshweave.parallel.parallelize import context_parallel, parallelize
from meshweave.parallel.pipeline import build_schedule, clip_pipeline_gradients
from meshweave.parallel.tensor import loss_context, settle_gradients
from meshweave.trainer.checkpoint import CheckpointError, CheckpointManager, checkpoint_info, read_manifest, verify
from meshweave.trainer.data import IGNORE_INDEX, ShardedLoader, build_datasets
from meshweave.trainer.hf import check_init_from, load_initial_weights
from meshweave.trainer.metrics import (
    MetricsLogger,
    device_peak_tflops,
    mfu,
    model_flops_per_token,
    peak_memory_bytes,
)
from meshweave.trainer.optim import build_optimizer, lr_at, set_lr
from meshweave.lowcomm.replicas import ReplicaExchange

class NonFiniteLossError(RuntimeError):
    """Raised after ``train.max_bad_steps`` consecutive steps with a non-finite loss or gradient."""


class Trainer:
    """Owns one rank's part of a run. ``fit()`` trains to ``train.steps`` and returns the losses."""

    def __init__(self, cfg: Config, info: RankInfo | None = None) -> None:
        self.cfg = cfg
        self.info = info or rank_info()
        self.device = pick_device(cfg.train.device, self.info)
        self.dims = resolve_degrees(cfg, self.info.world_size)
        init_process_group(self.device, self.info, timeout_s=cfg.comm.timeout_s)
        capture.install()
        self.mesh = self.dims.build_mesh(self.device.type)
        self.dp_group: CommGroup = self.mesh.group("dp")
        # Token counts, losses and gradients sum over data-parallel *and* context-parallel ranks.
        self.loss_group: CommGroup = self.mesh.group(self.dims.loss_dim)
        self.world = CommGroup.world()
        self.run_dir = Path(cfg.out)
        torch.manual_seed(cfg.train.seed)

        self.model: Transformer = build_model(cfg.model, moe=moe_settings(cfg.moe))
        self.n_params = num_params(self.model)
        self.flops_per_token = model_flops_per_token(num_params(self.model, exclude_embedding=True),
                                                     cfg.model.n_layers, cfg.model.dim, cfg.train.seq_len)
        self.cp = context_parallel(self.dims, self.mesh, cfg)
        parts = parallelize(self.model, self.dims, self.mesh, cfg, self.device, self.cp)
        self.reducer, self.pipeline = parts.reducer, parts.pipeline
        self._set_positions()
        self._loss_scale = 1.0  # 1 / global valid tokens of the step, for the pipeline's loss_fn
        self.schedule = None
        if self.pipeline is not None:
            self.pp_group = self.mesh.group("pp")
            self.schedule = build_schedule(self.pipeline, cfg, self.pp_group.pg, self.device, self._pipeline_loss)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device, self.mesh.group("dp_replicate"))
        self.replicas = ReplicaExchange(cfg, self.dims, self.mesh, self.model, self.optimizer)

        self.train_set, self.eval_set, _ = build_datasets(cfg.data, cfg.train.seq_len, cfg.train.seed)
        dp_size, dp_rank = self.dp_group.size, self.dp_group.rank
        # A pipeline cuts this rank's whole batch into its own microbatches (parallel.pp_microbatches).
        per_rank = cfg.train.global_batch // dp_size
        self.micro_batch = per_rank if self.pipeline is not None else cfg.train.micro_batch or per_rank
        self.loader = ShardedLoader(self.train_set, cfg.train.global_batch, self.micro_batch, dp_rank,
                                    dp_size, cfg.train.seed)

        self.step = 0
        self.tokens_seen = 0
        self.bad_steps = 0
        self.skipped_steps = 0
        self._saved_step = -1
        self.stopped_early = False
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep, self.world,
                                             checkpoint_info(cfg, self.info.world_size),
                                             async_save=cfg.checkpoint.async_,
                                             replica=self.replicas.checkpoint_replica())
        self._prepare_run_dir()
        self.peak_tflops = device_peak_tflops(cfg.log.peak_tflops)
        messages = self._start()
        self.logger = MetricsLogger(str(self.run_dir), cfg.log, cfg.train.steps, self.info.is_rank0,
                                    dataclasses.asdict(cfg), start_step=self.step)
        for message in messages:
            self.logger.event(message)

    # ---------------------------------------------------------------------------------------
    # set-up helpers

    def _prepare_run_dir(self) -> None:
        if self.info.is_rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(to_toml(self.cfg))

    def _trainer_state(self) -> dict[str, int | float]:
        return {"step": self.step, "consumed_samples": self.loader.consumed_samples,
                "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps,
                "lr": lr_at(max(self.step - 1, 0), self.cfg.optim, self.cfg.train.steps)}

    def _start(self) -> list[str]:
        """Resume from a checkpoint, or initialise from ``checkpoint.init_from``; returns the
        events to log (the logger starts at the resumed step, so it is created afterwards)."""
        messages: list[str] = []
        path = self.checkpoints.resolve(self.cfg.checkpoint.resume, messages.append)
        if path is None:
            messages.append(f"starting from scratch: {self.n_params:,} parameters, layout {self.dims}")
            if self.cfg.checkpoint.resume == "none" and self.checkpoints.complete():
                messages.append(f"warning: checkpoint.resume=none but {self.checkpoints.root} holds "
                                "checkpoints; they are replaced as this run saves")
            if self.cfg.checkpoint.init_from:
                load_initial_weights(self.model, self.cfg)
                messages.append(f"initialised weights from {self.cfg.checkpoint.init_from}")
            return messages
        saved_replicas = read_manifest(path).get("layout", {}).get("dp_replicate", 1)
        if self.replicas.checkpoint_replica() is not None and saved_replicas != self.dims.dp_replicate:
            raise CheckpointError(f"{path} holds {saved_replicas} DiLoCo replicas but this run has "
                                  f"dp_replicate={self.dims.dp_replicate}; resume with the same dp_replicate")
        extra = self.replicas.checkpoint_extra()
        state, manifest, rank_local = self.checkpoints.load(path, self.model, self.optimizer,
                                                            self._trainer_state(), extra)
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
            messages.append(f"layout changed ({manifest.get('layout')} on {manifest.get('world_size')} ranks "
                            f"-> {self.dims} on {self.info.world_size}): model and optimizer resharded, "
                            "RNG streams re-derived from the seed")
        return messages

    # ---------------------------------------------------------------------------------------
    # one step

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.train.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _this_ranks_tokens(self, microbatches: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each microbatch's ``(inputs, labels)`` cut to this CP rank's shard of the sequence."""
        if self.cp is None:
            return microbatches
        return [(self.cp.shard(inputs, 1), self.cp.shard(labels, 1)) for inputs, labels in microbatches]

    def _set_positions(self) -> None:
        """Give every model (or stage) the global RoPE positions of the tokens it sees: a CP
        shard, and for pipeline stages (whose input is hidden states) the whole sequence."""
        if self.cp is None and self.pipeline is None:
            return
        seq_len = self.cfg.train.seq_len
        positions = (self.cp.positions(seq_len, self.device) if self.cp is not None
                     else torch.arange(seq_len, device=self.device))
        for module in [self.model, *(self.pipeline.stages if self.pipeline else [])]:
            module.rope_positions = positions

    def _token_loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.to(self.device).flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")

    def _loss_sum(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            logits = self.model(inputs.to(self.device))
        return self._token_loss_sum(logits, labels)

    def _pipeline_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The last stage's loss for one pipeline microbatch: its token-loss sum over the step's
        global token count (``_loss_scale``), so microbatch gradients add up to the step's."""
        return self._token_loss_sum(logits, labels) * self._loss_scale

    def _pipeline_pass(self, inputs: torch.Tensor, labels: torch.Tensor, train: bool) -> float:
        """Run the schedule over this rank's batch (all stages of the pipeline call it together);
        returns this rank's share of the loss (its last-stage microbatch losses, else 0)."""
        stage_ids = self.pipeline.stage_ids
        args = (inputs.to(self.device),) if 0 in stage_ids else ()
        target = labels.to(self.device) if self.pipeline.has_last_stage else None
        losses: list = []
        with self._autocast(), loss_context(self.dims.tp > 1):
            if train:
                self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
            else:
                self.schedule.eval(*args, target=target, losses=losses)
        return sum(_scalar(loss) for loss in losses)

    def train_step(self) -> dict:
        """One optimizer step over one global batch; returns its metrics record."""
        started = time.perf_counter()
        microbatches = self._this_ranks_tokens(self.loader.next_batch())
        apart = self.replicas.apart
        local_tokens = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in microbatches)
        (global_tokens,) = all_reduce_scalars([local_tokens], self.replicas.token_group(), self.device)
        set_lr(self.optimizer, lr := lr_at(self.step, self.cfg.optim, self.cfg.train.steps))

        loss_sum = 0.0
        if self.pipeline is not None:
            self._loss_scale = 1.0 / max(global_tokens, 1.0)
            (inputs, labels), = microbatches
            (loss_sum,) = all_reduce_scalars([self._pipeline_pass(inputs, labels, train=True)], self.pp_group,
                                             self.device)
        for i, (inputs, labels) in enumerate(microbatches if self.pipeline is None else []):
            last = i == len(microbatches) - 1
            with gradient_sync(self.model, self.reducer, enabled=last, across_replicas=not apart), \
                    loss_context(self.dims.tp > 1):
                loss = self._loss_sum(inputs, labels) / max(global_tokens, 1.0)
                loss.backward()
            loss_sum += _scalar(loss)
        if self.reducer is not None and not apart:
            self.reducer.finish()
        settle_gradients(self.params)
        (loss_value,) = all_reduce_scalars([loss_sum], self.loss_group, self.device)
        loss_value = self.replicas.reported_loss(loss_value)
        grad_norm = self._clip_gradients()

        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            balance_experts(self.model, self.loss_group)
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.skipped_steps += 1
            self.logger.event(f"step {self.step + 1}: non-finite loss={loss_value} grad_norm={grad_norm}; "
                              f"step skipped ({self.bad_steps} in a row)")
        self.optimizer.zero_grad(set_to_none=True)
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            raise NonFiniteLossError(f"{self.bad_steps} consecutive steps had a non-finite loss or gradient "
                                     f"(last loss={loss_value}); lower optim.lr, check the data, or raise "
                                     "train.max_bad_steps")

        self.step += 1
        event = self.replicas.after_step(self.step, last=self.step == self.cfg.train.steps)
        if event:
            self.logger.event(f"step {self.step}: {event}")
        step_time = time.perf_counter() - started
        step_tokens = self.cfg.train.global_batch * self.cfg.train.seq_len
        self.tokens_seen += step_tokens
        comm_bytes, comm_seconds = LEDGER.take_step()
        tokens_per_s = step_tokens / step_time
        return {
            "step": self.step, "time": time.time(), "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
            "tokens": self.tokens_seen, "tokens_per_s": tokens_per_s, "step_time_s": step_time,
            "mfu": mfu(tokens_per_s / self.info.world_size, self.flops_per_token, self.peak_tflops),
            "mem_peak_bytes": peak_memory_bytes(self.device),
            "comm_bytes": comm_bytes, "comm_bytes_total": LEDGER.cumulative_bytes(),
            "comm_seconds": {k: round(v, 6) for k, v in comm_seconds.items()},
            "dp_exposed_wait_s": self.reducer.exposed_wait_s if self.reducer is not None else None,
            "skipped_steps": self.skipped_steps,
            **({"moe": moe} if (moe := expert_metrics(self.model)) else {}),
            **({"replicas_apart": apart, **self.replicas.metrics()} if self.replicas.mode != "dp" else {}),
        }

    def _clip_gradients(self) -> float:
        """Global L2 norm of all gradients (over every shard), clipped to ``optim.grad_clip``."""
        max_norm = self.cfg.optim.grad_clip or float("inf")
        if self.pipeline is not None:
            return clip_pipeline_gradients(self.params, max_norm, self.pp_group)
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return float(norm)

    # ---------------------------------------------------------------------------------------
    # eval, checkpoint, loop

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean token loss over ``train.eval_batches`` global batches of the held-out split
        (on DiLoCo's global weights when replicas train apart)."""
        if len(self.eval_set) == 0:
            return None
        loader = ShardedLoader(self.eval_set, self.cfg.train.global_batch, self.micro_batch,
                               self.dp_group.rank, self.dp_group.size, self.cfg.train.seed)
        self.model.eval()
        loss_sum, tokens = 0.0, 0
        self._loss_scale = 1.0
        with self.replicas.eval_weights():
            for _ in range(self.cfg.train.eval_batches):
                for inputs, labels in self._this_ranks_tokens(loader.next_batch()):
                    if self.pipeline is not None:
                        loss_sum += self._pipeline_pass(inputs, labels, train=False)
                    else:
                        with loss_context(self.dims.tp > 1):
                            loss_sum += _scalar(self._loss_sum(inputs, labels))
                    tokens += int((labels != IGNORE_INDEX).sum())
        self.model.train()
        if self.pipeline is not None:
            (loss_sum,) = all_reduce_scalars([loss_sum], self.pp_group, self.device)
        loss_sum, tokens = all_reduce_scalars([loss_sum, tokens], self.loss_group, self.device)
        return loss_sum / max(tokens, 1.0)

    def save_checkpoint(self) -> None:
        path = self.checkpoints.save(self.step, self.model, self.optimizer, self._trainer_state(),
                                     extra=self.replicas.checkpoint_extra(), rank_local=self.replicas.rank_local())
        self._saved_step = self.step
        self.logger.event(f"writing checkpoint {path} in the background" if self.cfg.checkpoint.async_
                          else f"saved checkpoint {path}")

    def _report_async_commit(self) -> None:
        commit = self.checkpoints.last_commit
        if self.cfg.checkpoint.async_ and commit and commit.get("reported") is None:
            commit["reported"] = True
            self.logger.event(f"checkpoint step-{commit['step']} committed after "
                              f"{commit['committed_unix'] - commit['started_unix']:.2f}s in the background")

    def fit(self) -> list[float]:
        """Train until ``train.steps`` (or ``train.stop_at_step``, or an agreed stop signal);
        returns this run's losses."""
        last = min(self.cfg.train.steps, self.cfg.train.stop_at_step or self.cfg.train.steps)
        losses: list[float] = []
        stop = StopRequest()
        self.model.train()
        try:
            while self.step < last:
                losses.append(self._step_and_bookkeep(last))
                signum = stop.agreed(self.world, self.device)
                if signum and self.step < last:
                    self.logger.event(f"stop requested ({signal.Signals(signum).name}) at step {self.step}: "
                                      "checkpointing and exiting; resume with --checkpoint.resume=auto")
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


def _scalar(t: torch.Tensor) -> float:
    """A 0-d loss as a float; under loss parallelism it is a replicated DTensor."""
    return (t.to_local() if isinstance(t, DTensor) else t).item()


def preflight(cfg: Config) -> None:
    """Checks that read files but need no process group: the data's vocabulary fits the model and
    ``checkpoint.init_from`` has the model's shape, an explicit ``checkpoint.resume`` path verifies.
    ConfigError otherwise."""
    check_init_from(cfg)
    if cfg.checkpoint.resume not in ("auto", "none"):
        try:
            verify(Path(cfg.checkpoint.resume))
        except CheckpointError as e:
            raise ConfigError(f"checkpoint.resume: {e} (use auto to fall back to the newest valid one)") from None
    if cfg.data.source == "embedded":
        from meshweave.trainer.data import ByteTokenizer

        vocab = ByteTokenizer().vocab_size
    else:
        vocab = json.loads((Path(cfg.data.source) / "index.json").read_text())["vocab_size"]
    if vocab > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
                          f"({vocab} tokens in {cfg.data.source}); set model.vocab_size >= {vocab}")


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
