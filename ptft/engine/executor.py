"""The run executor: one training loop for every stage and method, readable top to bottom.

    setup:   run dir -> resume point -> data (cached) -> model -> method -> optimizer
    train:   for each step: lr -> micro-batches -> backward -> finite? -> clip -> optimizer step
             (+ log, evaluate, checkpoint at their cadence; stop cleanly on a signal)
    finish:  final model, summary.json, summary table
"""

from __future__ import annotations

import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from rich.console import Console

from ptft.config.schema import OnNonFinite, RootConfig
from ptft.data.batches import TrainStream, eval_batches
from ptft.data.prepare import prepare_data, resolve_task
from ptft.engine.allocator import keep_freed_memory, training_step_allocations
from ptft.engine.checkpoint import (checkpoint_name, complete_checkpoints, full_model_state,
                                    save_checkpoint)
from ptft.engine.distributed import World, init_world, wrap_model
from ptft.engine.device import (autocast, autocast_dtype, emulated_bf16_warning, peak_memory_mb,
                                resolve_device)
from ptft.engine.fast_paths import process_switches, restore_process_switches, use_fast_paths
from ptft.engine.flops import TrainingMeter, cpu_matmul_rates, device_peak_flops, training_flops
from ptft.engine.frozen_weights import store_frozen_projections_in
from ptft.engine.metrics import MetricsLog, check_loggers
from ptft.engine.objective import (accumulate_gradients, chunked_loss_problem, evaluate,
                                   is_prompt_learning)
from ptft.engine.optim import build_optimizer, lr_at, planned_steps
from ptft.engine.packed_attention import check_sliding_window
from ptft.engine.progress import ProgressReporter
from ptft.engine.resume import (checkpoint_config, checkpoint_onednn_route, compare_configs,
                                continue_from, find_checkpoint)
from ptft.engine.run_report import data_line, summary_table, write_summary
from ptft.engine.rundir import create_run_dir
from ptft.engine.signals import StopRequests, ignore_launcher_stop
from ptft.errors import Preempted, TrainingFailed, UsageError, redact_secrets
from ptft.methods import apply_method, save_final
from ptft.models import build_model, check_model_path, count_parameters, load_model, resolve_latest


def execute(cfg: RootConfig, console: Console | None = None) -> dict:
    """Run one training job described by `cfg`; returns the summary (also in summary.json)."""
    world = init_world(cfg.train.device.value)
    switches = process_switches()  # process-wide state this run may change
    try:
        summary = _execute(cfg, world, console or Console(quiet=not world.is_main))
    except (UsageError, Preempted, TrainingFailed):
        world.close()  # decided on every rank alike (a shared input, the stop vote, the loss)
        raise
    except BaseException:
        world.close(together=False)  # maybe this rank's failure alone: no barrier to hang on
        raise
    finally:
        restore_process_switches(switches)
        training_step_allocations(False)  # a step that raised left it on
    world.close()
    return summary


def _execute(cfg: RootConfig, world: World, console: Console) -> dict:
    started = time.perf_counter()
    t = cfg.train

    # ---- setup -------------------------------------------------------------------------
    if cfg.model.path:  # resolve `latest` and check the folder before anything is written
        cfg.model.path = resolve_latest(cfg.model.path, cfg.run.root)
        check_model_path(cfg.model.path)
        if Path(cfg.model.path).expanduser().exists():  # recorded absolute: adapters point
            cfg.model.path = str(Path(cfg.model.path).expanduser().resolve())  # at their base
    # Rank 0 decides where the run lives and where it resumes from; the others follow.
    run_dir, new_dir = world.on_main(lambda: create_run_dir(
        cfg.run.dir, cfg.run.root, cfg.stage.name, cfg.run.name))
    new_dir = new_dir and world.is_main
    cfg.run.dir = str(run_dir)
    config_yaml = OmegaConf.to_yaml(redact_secrets(OmegaConf.to_container(
        OmegaConf.structured(cfg), enum_to_str=True)))
    try:
        check_loggers(cfg.run.loggers)  # a missing optional package fails before any work
        resume_from = world.on_main(lambda: find_checkpoint(cfg.run.resume, run_dir))
        if resume_from:
            changes = compare_configs(checkpoint_config(resume_from), OmegaConf.to_container(
                OmegaConf.create(config_yaml)))
            console.print(f"resuming from {resume_from}"
                          + (f" (changed: {'; '.join(changes)})" if changes else ""),
                          highlight=False)
        console.print(f"[bold]ptft {cfg.stage.name}[/]  run dir: {run_dir}")
        _quiet_libraries()
        _seed_everything(t.seed)
        device = resolve_device(t)
        if device.type == "cpu":
            keep_freed_memory()  # no page faults for the buffers every step reallocates
        amp_dtype = autocast_dtype(t, device)
        if slow_precision := emulated_bf16_warning(amp_dtype, device):
            console.print(f"[yellow]warning:[/] {slow_precision}", highlight=False)
        # Rank 0 prepares (and caches) the data once; the others then read the cache.
        data_started = time.perf_counter()
        data = world.on_main(lambda: prepare_data(cfg), share=False)
        world.wait_for_main()
        data = data if world.is_main else prepare_data(cfg)  # reads rank 0's cache
        data_prep_s = time.perf_counter() - data_started  # a cache hit: well under a second
        console.print(data_line(data), highlight=False)
        _check_data_sizes(data, t.seq_len, console)
        model = _model(cfg, data)
        model = apply_method(model, cfg.method, data.task)
        store_frozen_projections_in(model, amp_dtype)  # before the move: half the transfer
        model = model.to(device)
        check_sliding_window(model, getattr(data.train, "packing", False), t.seq_len)
        # fp32 on a CPU: the matmul probe (< 2 s per route, then cached) picks the library for
        # the projections and gives MFU's peak; rank 0 measures, every rank follows.
        fp32_cpu_rates = world.on_main(lambda: cpu_matmul_rates(None, cfg.data.cache_dir)) \
            if device.type == "cpu" and amp_dtype is None else None
        fast_paths = use_fast_paths(model, device, t.compile, fp32_cpu_rates,
                                    checkpoint_onednn_route(resume_from))
        total_params, trainable_params = count_parameters(model)
        _activation_checkpointing(model, t.activation_checkpointing)
        flops = training_flops(model, t.seq_len)
        model = wrap_model(model, world, t.strategy.value, device, amp_dtype)
        if t.compile:  # in place: parameter and checkpoint names stay as they are
            model.compile()
        chunked_loss = _chunked_loss(t.chunked_loss, model, data.task)
        optimizer = build_optimizer(model, t, device)
        # The device's peak FLOP/s for MFU (on a CPU measured once, < 2 s, then cached).
        peak = device_peak_flops(device, amp_dtype, cfg.data.cache_dir, fp32_cpu_rates) \
            if world.is_main else None
    except BaseException:
        if new_dir:  # nothing of this run is worth keeping: leave no half-made directory
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    trainable = [p for p in model.parameters() if p.requires_grad]
    global_sequences = t.batch_size * t.grad_accum * world.world_size
    total_steps = planned_steps(t, len(data.train), world.world_size)
    # Every rank walks the same shuffled order and takes its own slice of each global batch.
    stream = TrainStream(data.train, t.batch_size, t.seed, world.rank, world.world_size)
    console.print(
        f"model: {cfg.model.path or cfg.model.name}  {total_params / 1e6:.2f}M parameters, "
        f"{trainable_params / 1e6:.3f}M trainable ({100 * trainable_params / total_params:.2f}%, "
        f"method {cfg.method.name})  device: {device}"
        f"{f' x {world.world_size} processes ({t.strategy.value})' if world.distributed else ''}"
        f"{'  autocast ' + str(amp_dtype).split('.')[-1] if amp_dtype else '  fp32'}",
        highlight=False)
    console.print(f"training: {total_steps} steps x {global_sequences} sequences of up to "
                  f"{t.seq_len} tokens = {total_steps * global_sequences / len(data.train):.2f} "
                  "epochs", highlight=False)

    # Where the loop starts: step 0, or exactly where the checkpoint left off.
    state = {"step": 0, "tokens_seen": 0, "skipped_steps": 0, "first_eval": None,
             "interval": {"loss": 0.0, "targets": 0},
             "data_key": data.tokens_dir.name,  # the prepared tokens, named by their cache key
             "onednn_linears": fast_paths["onednn_linears"]}  # a resumed run takes the same
    # Metrics of the steps before the checkpoint; a run started over sets old ones aside.
    kept_rows = continue_from(resume_from, model, optimizer, stream.sampler, state, total_steps,
                              run_dir / "metrics.jsonl", world, console)
    if world.is_main:
        (run_dir / "config.yaml").write_text(config_yaml)
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=world.is_main,
                         loggers=cfg.run.loggers)
    progress = ProgressReporter(total_steps, console, start_step=state["step"])
    # The summary reports the last train row and evaluation, written before a resume or not.
    evaluations = [r for r in kept_rows if r.get("kind") == "eval"]
    last_row = next((r for r in reversed(kept_rows)
                     if r.get("kind") == "train" and not r.get("nonfinite")), None)
    summary = {"status": "running", "stage": cfg.stage.name, "task": resolve_task(cfg),
               "method": cfg.method.name, "model": cfg.model.path or cfg.model.name,
               "data": cfg.data.source, "parameters": total_params,
               "trainable_parameters": trainable_params, "world_size": world.world_size,
               "run_dir": str(run_dir), "data_prep_s": data_prep_s,
               # what train.precision=auto and train.chunked_loss=null resolved to
               "precision": str(amp_dtype).removeprefix("torch.") if amp_dtype else "fp32",
               "chunked_loss": chunked_loss, **fast_paths}
    write_summary(run_dir, summary, world)

    def run_eval(step: int) -> None:
        if len(data.eval) == 0:
            return
        with autocast(device, amp_dtype):
            result = evaluate(model, eval_batches(data.eval, t.batch_size, t.eval_batches),
                              data.task, device, chunked_loss)
        row = {"kind": "eval", "step": step, **result, "elapsed_s": time.perf_counter() - started}
        metrics.write(row)
        evaluations.append(row)
        state["first_eval"] = state["first_eval"] or result["eval_loss"]
        progress.message("eval  step {:>6}  ".format(step) + "  ".join(
            f"{k.removeprefix('eval_')} {v:.4f}" for k, v in result.items()))
        model.train()

    def save(step: int) -> Path:
        return save_checkpoint(run_dir / "checkpoints", step, model, optimizer,
                               {**state, "sampler": stream.sampler.state_dict()}, config_yaml,
                               cfg.run.keep_last, world)

    # ---- train -------------------------------------------------------------------------
    try:
        with StopRequests() as stop:
            if state["step"] == 0:
                run_eval(0)
            model.train()
            meter = TrainingMeter(flops, peak, started)
            saved_at = None  # the step of this process's latest checkpoint
            for step in range(state["step"], total_steps):
                meter.begin_step()
                training_step_allocations(True)
                lr = lr_at(step, t, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                micro_batches = [stream.next_batch() for _ in range(t.grad_accum)]
                summed, step_targets = accumulate_gradients(model, micro_batches, data.task,
                                                            device, amp_dtype, world,
                                                            chunked=chunked_loss)
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip or float("inf"))
                # One host sync per step (not per micro-batch) to keep a NaN out of the weights;
                # the same collective tells every rank whether any of them was asked to stop.
                step_loss, stop_votes = world.sum([summed.item(), float(bool(stop.received))],
                                                  device)
                norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor")
                             else grad_norm)
                loss = step_loss / step_targets
                done = step + 1
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    metrics.write({"kind": "train", "step": done, "loss": loss, "grad_norm": norm,
                                   "lr": lr, "nonfinite": True})
                    _handle_nonfinite(t, state, done, loss, norm, run_dir)
                    optimizer.zero_grad(set_to_none=True)  # skip: no update from this step
                else:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    state["interval"]["loss"] += step_loss
                    state["interval"]["targets"] += step_targets
                    state["interval"]["grad_norm"] = norm  # the last step that was applied
                meter.end_step(micro_batches, step_targets)
                training_step_allocations(False)
                state["tokens_seen"] += step_targets
                state["step"] = done
                progress.step(done)

                if (done % t.log_every == 0 or done == total_steps) and state["interval"]["targets"]:
                    interval = state["interval"]
                    # Throughput of the steps themselves (evaluations and checkpoints excluded),
                    # timed in this process: after a resume, without the steps before it.
                    seconds, targets, interval_mfu = meter.take_interval()
                    last_row = {"kind": "train", "step": done,
                                "loss": interval["loss"] / interval["targets"], "lr": lr,
                                "grad_norm": interval.get("grad_norm", norm),
                                "tokens": state["tokens_seen"],
                                "tokens_per_s": targets / seconds if seconds else None,
                                "mfu": interval_mfu,
                                "elapsed_s": time.perf_counter() - started}
                    metrics.write(last_row)
                    progress.log(last_row)
                    state["interval"] = {"loss": 0.0, "targets": 0}
                if t.eval_every and done % t.eval_every == 0 and done != total_steps:
                    run_eval(done)
                if t.save_every and done % t.save_every == 0:
                    save(done)
                    saved_at = done
                if stop_votes and done != total_steps:
                    path = save(done) if saved_at != done else \
                        run_dir / "checkpoints" / checkpoint_name(done)
                    raise Preempted(f"stopped by {stop.received or 'a signal to another rank'} at "
                                    f"step {done}; checkpoint "
                                    f"saved to {path}. Run the same command with "
                                    f"run.dir={run_dir} to resume.")
    except (Preempted, TrainingFailed, KeyboardInterrupt) as err:
        if isinstance(err, Preempted) and world.distributed:
            ignore_launcher_stop()
        progress.close()
        metrics.close()
        status = "preempted" if isinstance(err, Preempted) else "failed"
        reason = str(err) or type(err).__name__
        if isinstance(err, KeyboardInterrupt):  # the second Ctrl-C: out now, nothing saved
            last = complete_checkpoints(run_dir / "checkpoints")
            reason = (f"a second Ctrl-C stopped the run during step {state['step'] + 1}, without "
                      "saving; " + (f"the last checkpoint is {last[-1]}: run the same command "
                                    "to resume from it." if last else "no checkpoint yet."))
            err = KeyboardInterrupt(reason)
        write_summary(run_dir, {**summary, "status": status, "steps": state["step"],
                                "reason": reason}, world)
        raise err from None

    # ---- finish ------------------------------------------------------------------------
    if not (evaluations and evaluations[-1]["step"] == total_steps):  # a resume may have it
        run_eval(total_steps)
    progress.close()
    metrics.close()
    _save_final_atomically(model, data.tokenizer, run_dir / "final", cfg.method, world)
    wall = time.perf_counter() - started
    summary.update({
        "status": "finished", "steps": total_steps, "tokens": state["tokens_seen"],
        "skipped_steps": state["skipped_steps"],
        "train_loss": last_row["loss"] if last_row else None,
        "first_eval_loss": state["first_eval"],
        **{k: v for k, v in (evaluations[-1] if evaluations else {}).items()
           if k.startswith("eval_")},
        # This process's tokens over its time: a resumed run's earlier steps took other time.
        "wall_s": wall, "tokens_per_s": meter.total_targets / wall if meter.total_targets else None,
        "mfu": meter.mfu,
        "time_to_first_step_s": meter.first_step_s,
        "flops_per_token": flops.per_block_token, "peak_flops": peak,
        "peak_memory_mb": peak_memory_mb(device)})
    write_summary(run_dir, summary, world)
    console.print(summary_table(summary))
    return summary


def _model(cfg: RootConfig, data):
    """The pre-trained model (model.path) or a new one of the configured shape."""
    tokenizer = data.tokenizer
    if cfg.model.path:
        model = load_model(cfg.model.path, cfg.model.trust_remote_code, data.task, data.labels,
                           tokenizer.pad_token_id)
    else:
        model = build_model(cfg.model, tokenizer.bos_token_id, tokenizer.eos_token_id,
                            tokenizer.pad_token_id, cfg.train.seed)
    max_positions = getattr(model.config, "max_position_embeddings", None) or \
        getattr(model.config, "n_positions", None)
    if max_positions and cfg.train.seq_len > max_positions:
        raise UsageError(f"train.seq_len={cfg.train.seq_len} exceeds the model's "
                         f"max_position_embeddings={max_positions}; lower train.seq_len.")
    return model


def _activation_checkpointing(model, enabled: bool) -> None:
    """train.activation_checkpointing: recompute each decoder layer in backward (the
    transformers implementation, non-reentrant, so frozen inputs under LoRA/adapters work)."""
    if not enabled:
        return
    from ptft.engine.flops import unwrap_model
    base = unwrap_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise UsageError(f"train.activation_checkpointing=true: {type(base).__name__} does not "
                         "support activation checkpointing; set it to false.")
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5
        base.activation_checkpointing_enable({"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _check_data_sizes(data, seq_len: int, console: Console) -> None:
    if len(data.train) == 0:
        raise UsageError(f"the training data is smaller than one sequence of train.seq_len="
                         f"{seq_len}; add data or lower train.seq_len.")
    if len(data.eval) == 0:
        console.print("[yellow]warning:[/] the held-out split is smaller than one sequence: no "
                      "evaluation. Raise data.eval_fraction or give data.eval_paths.",
                      highlight=False)


def _handle_nonfinite(t, state: dict, step: int, loss: float, norm: float, run_dir: Path) -> None:
    """Stop (default) or count a skipped step; the weights never see the bad gradient."""
    state["skipped_steps"] += 1
    what = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {step}"
    if t.on_nonfinite == OnNonFinite.skip and state["skipped_steps"] <= t.max_nonfinite_skips:
        return
    checkpoints = complete_checkpoints(run_dir / "checkpoints")
    kept = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint yet"
    raise TrainingFailed(f"{what} (loss {loss}, grad norm {norm}); stopped before the optimizer "
                         f"step, {kept}. Lower train.lr or set train.grad_clip; "
                         "train.on_nonfinite=skip skips such steps.")


def _save_final_atomically(model, tokenizer, path: Path, method_cfg, world: World) -> None:
    """Rank 0 writes final/ under a temporary name and renames it; under FSDP the whole
    weights are gathered first (a collective: every rank takes part)."""
    state_dict = full_model_state(model) if world.distributed else None
    # peft saves prompt tuning's virtual tokens by running its prompt encoder, which needs
    # whole weights: under FSDP every rank gathers the root's own (embeddings, prompt encoder;
    # not the decoder layers, which are sharded on their own) for the save, a collective.
    unsharded = hasattr(model, "unshard") and is_prompt_learning(model)
    if unsharded:
        model.unshard()
    if world.is_main:
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_final(getattr(model, "module", model), tokenizer, tmp, method_cfg, state_dict)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    world.barrier()
    if unsharded:
        model.reshard()


def _quiet_libraries() -> None:
    """Our own progress display is the only one: no per-shard bars from transformers."""
    import warnings

    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # Deprecation notices between transformers and peft are for their developers, not ours.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _chunked_loss(setting: bool | None, model, task: str) -> bool:
    """train.chunked_loss resolved: null takes the chunked (fused) loss wherever it works."""
    if task != "lm" or setting is False:
        return False
    problem = chunked_loss_problem(model)
    if setting and problem:  # asked for explicitly: say so before any work is done
        raise UsageError(f"train.chunked_loss=true: {problem}. Set train.chunked_loss=false "
                         "(or null, which picks it where it works).")
    return problem is None
