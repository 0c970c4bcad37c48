"""A run that fails, diverges or learns nothing says so: internal failures (exit 1), non-finite steps, stalls."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tests.support import LENGTH_REWARD
from tests.test_train_cli import CONF, FAST, metric_rows
from vrft.callbacks import Checkpoints
from vrft.cli import user_errors
from vrft.modules.grpo import GRPOModule
from vrft.train import train


def config(run_dir: Path, *overrides: str, fast=FAST):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[*fast, *overrides])
    cfg.run_dir = str(run_dir)
    return cfg


def run_cli_main(cfg, capsys) -> tuple[int, str]:
    """`train` behind the CLI's error handling, as `python -m vrft.train` runs it: (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        user_errors(train)(cfg)
    return exit_info.value.code, capsys.readouterr().err


def go_wrong(monkeypatch, method: str, bad_calls, make_error, grad_only: bool = False):
    """Patch `GRPOModule.<method>` so that call number n (1-based) goes wrong (`make_error(result)`) when
    `bad_calls(n)`; with `grad_only`, only calls under autograd (the update, not the reference) count."""
    original, calls = getattr(GRPOModule, method), []

    def patched(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if grad_only and not torch.is_grad_enabled():
            return result
        calls.append(1)
        return make_error(result) if bad_calls(len(calls)) else result

    monkeypatch.setattr(GRPOModule, method, patched)


def raise_mismatch(_result):
    raise ValueError("Image features and image tokens do not match, tokens: 2049, features: 2048")


def all_finite(checkpoint: Path) -> bool:
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    return all(bool(v.isfinite().all()) for v in state.values())


def test_an_error_inside_a_phase_is_an_internal_failure_with_step_and_safe_checkpoint(
    tmp_path, monkeypatch, capsys
):
    # The error a sampled <|image_pad|> raised in the reference forward: a ValueError from transformers,
    # which the CLI used to report as a bad setting (exit 2).
    # FAST: one rollout (one reference pass) per optimizer step, so call 2 is step 2.
    go_wrong(monkeypatch, "rollout_logprobs", lambda n: n == 2, raise_mismatch)
    code, stderr = run_cli_main(config(tmp_path, "trainer.max_steps=3"), capsys)
    assert code == 1
    assert "vrft: internal failure: training failed in the reference phase of step 2" in stderr
    assert "ValueError: Image features and image tokens do not match" in stderr
    safe = tmp_path / "checkpoints" / "last.ckpt"
    assert (
        f"resume with ckpt_path={safe}" in stderr and torch.load(safe, weights_only=False)["global_step"] == 1
    )
    assert "ValueError" in json.loads((tmp_path / "run_summary.json").read_text())["error"]


def test_sigterm_mid_step_exits_143_naming_the_resume_and_keeps_the_checkpoint(
    tmp_path, monkeypatch, capsys, caplog
):
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    step = GRPOModule.training_step

    def terminated_in_step_2(self, batch, batch_idx):
        if self.trainer.global_step == 1:  # what a scheduler's kill does in the middle of step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(GRPOModule, "training_step", terminated_in_step_2)
    # No checkpoint is due before step 10: the one of step 2 is the SIGTERM's.
    cfg = config(tmp_path, "trainer.max_steps=4", "callbacks.checkpoint.every_n_train_steps=10")
    code, err = run_cli_main(cfg, capsys)
    assert code == 143, err  # Lightning's SystemExit without a code would exit 0, like a finished run
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert f"vrft: stopped by SIGTERM; training checkpointed step 2: resume with ckpt_path={last}" in err
    # Lightning finishes the running step, then `Checkpoints` saves it (and last.ckpt) before stopping.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt", "step-step=2.ckpt"]
    assert torch.load(last, weights_only=False)["global_step"] == 2
    assert "Received SIGTERM: 15" in caplog.text  # Lightning's line is true here: only Ctrl-C's is dropped


def interrupted_in_step_2(monkeypatch, presses: int) -> None:
    """Ctrl-C pressed `presses` times in the middle of step 2 (SIGINT to this process, as the terminal sends)."""
    step = GRPOModule.training_step

    def pressed(self, batch, batch_idx):
        if self.trainer.global_step == 1:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(GRPOModule, "training_step", pressed)


def test_ctrl_c_finishes_the_running_step_checkpoints_it_and_names_the_resume(
    tmp_path, monkeypatch, capsys, caplog
):
    # Before, Ctrl-C raised KeyboardInterrupt mid-step and Lightning exited 1 with no checkpoint since the
    # last due one: here none is due before step 10, so steps 1 and 2 were lost.
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    interrupted_in_step_2(monkeypatch, presses=1)
    cfg = config(tmp_path, "trainer.max_steps=4", "callbacks.checkpoint.every_n_train_steps=10")
    handler = signal.getsignal(signal.SIGINT)
    code, err = run_cli_main(cfg, capsys)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert code == 130, err
    assert "Ctrl-C again to stop at once" in err
    assert f"vrft: stopped by Ctrl-C; training checkpointed step 2: resume with ckpt_path={last}" in err
    assert torch.load(last, weights_only=False)["global_step"] == 2
    assert signal.getsignal(signal.SIGINT) is handler  # the CLI put back the handler it found
    # Lightning's "Received SIGTERM: 15" and "An SIGTERMException was raised" told of a signal nobody sent
    assert "SIGTERM" not in caplog.text and "SIGTERM" not in err


def test_a_second_ctrl_c_stops_at_once_and_says_the_step_is_lost(tmp_path, monkeypatch, capsys):
    interrupted_in_step_2(monkeypatch, presses=2)
    cfg = config(tmp_path, "trainer.max_steps=4", "callbacks.checkpoint.every_n_train_steps=10")
    code, err = run_cli_main(cfg, capsys)
    assert code == 130, err
    assert (
        "vrft: stopped by Ctrl-C at once; the running step or batch is lost; no checkpoint was written" in err
    )
    assert not list((tmp_path / "checkpoints").glob("*.ckpt"))  # a half-done step is never saved


def test_a_sigterm_before_any_step_finished_names_no_checkpoint(tmp_path, capsys):
    # It used to say "training checkpointed its last finished step" where there was none.
    callback = Checkpoints(dirpath=tmp_path, filename="step-{step}", save_last=True)
    trainer = SimpleNamespace(fast_dev_run=False, sanity_checking=False, global_step=0)
    callback._save_checkpoint = lambda trainer, path: pytest.fail("a step-0 checkpoint was written")

    def stopped(*_args):
        callback.on_exception(trainer, None, SIGTERMException())
        raise SIGTERMException()

    with pytest.raises(SystemExit) as exit_info:
        user_errors(stopped)()
    assert exit_info.value.code == 143
    assert "vrft: stopped by SIGTERM; no checkpoint was written at the stop" in capsys.readouterr().err


def test_only_a_sigterm_saves_a_checkpoint_between_the_due_ones(tmp_path):
    # Any other exception may come in the middle of a step (an out-of-memory error, a failure): its
    # half-done state is not a checkpoint to resume from.
    callback = Checkpoints(dirpath=tmp_path, filename="step-{step}", save_last=True)
    trainer = SimpleNamespace(fast_dev_run=False, sanity_checking=False, global_step=3)
    saved = []
    callback._save_checkpoint = lambda trainer, path: saved.append(path)
    callback._save_last_checkpoint = lambda trainer, candidates: saved.append("last")
    callback._monitor_candidates = lambda trainer: {"step": 3}
    callback.on_exception(trainer, None, torch.OutOfMemoryError("CUDA out of memory"))
    assert saved == []
    callback.on_exception(trainer, None, SIGTERMException())
    assert saved == [str(tmp_path / "step-step=3.ckpt"), "last"]


def test_a_nan_loss_skips_one_step_and_the_run_goes_on(tmp_path, monkeypatch):
    # Step 2's update log-probs are NaN: its loss and gradients are NaN, the step must not apply them.
    # FAST: two update micro-batches (of 2 of the 4 completions) per optimizer step: call 3 is in step 2.
    go_wrong(monkeypatch, "sequence_logprobs", lambda n: n == 3, lambda r: r * float("nan"), grad_only=True)
    cfg = config(tmp_path, "trainer.max_steps=3")
    train(cfg)
    rows = metric_rows(tmp_path)
    assert [float(r["train/skipped_steps"]) for r in rows] == [0.0, 1.0, 1.0]
    assert json.loads((tmp_path / "run_summary.json").read_text())["skipped_steps"] == 1
    checkpoints = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert len(checkpoints) == 4 and all(all_finite(c) for c in checkpoints)  # step 1-3 and last


def test_consecutive_non_finite_steps_stop_the_run_naming_the_phase(tmp_path, monkeypatch, capsys):
    # From step 2 on the reference log-probs are NaN (so is the KL term of every loss).
    go_wrong(monkeypatch, "rollout_logprobs", lambda n: n >= 2, lambda r: r * float("nan"))
    code, stderr = run_cli_main(config(tmp_path, "trainer.max_steps=5", "algorithm.max_bad_steps=2"), capsys)
    assert code == 1
    assert "training failed in the reference phase of step 3: 2 optimizer steps in a row" in stderr
    checkpoints = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert checkpoints and all(all_finite(c) for c in checkpoints)


def test_a_run_without_reward_spread_warns_and_counts_it(tmp_path, caplog):
    # Without the length reward, the untrained tiny model never matches the format: every reward is 0.
    fast = [o for o in FAST if o not in LENGTH_REWARD]
    train(config(tmp_path, "trainer.max_steps=2", "algorithm.stall_steps=2", fast=fast))
    warnings = json.loads((tmp_path / "run_summary.json").read_text())["warnings"]
    assert warnings["no_reward_spread"] == 1
    assert "every group's completions got the same reward" in caplog.text
    assert "the format reward never matched" in caplog.text


def test_run_summary_json_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    # written in place, a stop or a full disk mid-write left a cut run_summary.json
    from vrft.callbacks.summary import RunSummary

    summary = RunSummary(str(tmp_path), {"config_hash": "abc"})
    summary.write()
    written = (tmp_path / "run_summary.json").read_text()

    def disk_full(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    summary.summary["steps"] = 3
    with pytest.raises(OSError, match="No space left"):
        summary.write()
    assert (tmp_path / "run_summary.json").read_text() == written
    assert [p.name for p in tmp_path.iterdir()] == ["run_summary.json"]  # no partial file left behind


def test_a_gpu_profile_without_a_gpu_says_the_run_goes_on_on_the_cpu(tmp_path, monkeypatch, caplog):
    from vrft.train import warn_gpu_profile_without_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING", logger="vrft.train"):
        warn_gpu_profile_without_gpu(config(tmp_path, "+hw=cpu"))
        assert not caplog.records  # the CPU profile: nothing to say
        warn_gpu_profile_without_gpu(config(tmp_path, "+hw=rtx4090"))
    assert "hw=rtx4090 describes a 24 GB GPU, but torch sees none" in caplog.text


def test_an_atomically_written_file_is_readable_as_write_text_made_it(tmp_path):
    # mkstemp makes its file owner-only (0600): the run summary and results became unreadable to a group.
    from vrft.paths import write_atomic

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "summary.json", "{}")
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    mode = (tmp_path / "summary.json").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.json").stat().st_mode & 0o777 == 0o644


def test_an_atomically_written_file_fsyncs_its_folder_after_the_rename(tmp_path, monkeypatch):
    # Without the folder's fsync a power cut after the rename can leave the old file (or none) in place.
    from vrft.paths import write_atomic

    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append("folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    write_atomic(tmp_path / "summary.json", "{}")
    assert synced == ["file", "folder"]
    assert (tmp_path / "summary.json").read_text() == "{}"
