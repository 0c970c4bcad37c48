"""The loggers of a run: metrics.csv survives a run resumed into its own folder; W&B's credentials are
looked for before anything loads."""

from __future__ import annotations

import csv

import pytest
from hydra.utils import instantiate

import vrft.train
from tests.support import train_config as config
from tests.test_train_cli import FAST
from vrft.loggers import CSVLogger, WandbLogger, check_wandb_login


def logged(save_dir, steps: range) -> None:
    logger = CSVLogger(save_dir, name="logs", version="")
    for step in steps:
        logger.log_metrics(
            {"train/reward": float(step), **({"train/kl": 0.5} if step > 2 else {})}, step=step
        )
    logger.save()


def rows(save_dir) -> list[dict]:
    with (save_dir / "logs" / "metrics.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def test_resumed_run_keeps_the_rows_before_its_checkpoint(tmp_path):
    logged(tmp_path, range(1, 7))  # a run killed after step 6
    logged(tmp_path, range(5, 9))  # resumed into the same folder from the step-4 checkpoint
    assert [int(row["step"]) for row in rows(tmp_path)] == list(range(1, 9))
    assert [row["train/kl"] for row in rows(tmp_path)][:3] == ["", "", "0.5"]
    logged(tmp_path, range(1, 3))  # a fresh run from step 1 replaces every row
    assert [int(row["step"]) for row in rows(tmp_path)] == [1, 2]


def test_resumed_run_that_logs_skipped_rows_at_step_0_keeps_the_rows_before_its_checkpoint(tmp_path):
    # data.on_bad_row=skip logs the dropped rows at step 0 before any optimizer step, a resumed run too;
    # metrics.csv is flushed after every row (flush_logs_every_n_steps=1)
    for steps in (range(1, 4), range(2, 5)):  # a run to step 3, resumed from its step-1 checkpoint
        logger = CSVLogger(tmp_path, name="logs", version="", flush_logs_every_n_steps=1)
        logger.log_metrics({"data/skipped_rows_train": 2.0}, step=0)
        for step in steps:
            logger.log_metrics({"train/reward": float(step)}, step=step)
    assert [int(row["step"]) for row in rows(tmp_path)] == [0, 1, 2, 3, 4]
    assert rows(tmp_path)[0]["data/skipped_rows_train"] == "2.0"


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """No W&B credentials anywhere wandb looks (its key variable, a netrc in HOME, its settings folder)."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / "wandb"))


@pytest.mark.parametrize("loggers", ["logger=wandb", "logger=[wandb,tensorboard]"])
def test_wandb_without_credentials_fails_before_the_warm_start_naming_the_fixes(
    tmp_path, monkeypatch, no_wandb_login, loggers
):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the warm start ran although W&B has no credentials")

    monkeypatch.setattr(vrft.train, "apply_warm_start", must_not_run)
    with pytest.raises(
        ValueError, match=r"^logger=wandb found no W&B credentials .*WANDB_MODE=offline"
    ) as error:
        vrft.train.fit(config(loggers, f"run_dir={tmp_path / 'run'}"))
    assert "wandb login" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "overrides, mode",
    [
        (["logger=wandb"], "offline"),  # the README's way without an account
        (["logger=wandb"], "disabled"),
        (["logger=wandb", "+logger.wandb.offline=true"], None),  # the logger's own switch
        (["logger=tensorboard"], None),  # no W&B at all
    ],
)
def test_runs_that_need_no_wandb_credentials_pass(monkeypatch, no_wandb_login, overrides, mode):
    if mode:
        monkeypatch.setenv("WANDB_MODE", mode)
    check_wandb_login(config(*overrides))


def test_a_key_in_the_environment_is_found(monkeypatch, no_wandb_login):
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # a key of the right form; verify=False sends nothing
    check_wandb_login(config("logger=wandb"))


def test_a_run_resumed_into_its_folder_goes_on_in_the_same_wandb_run(tmp_path, no_wandb_login):
    # each resume started a new W&B run: one run's curves split into one W&B run per resume. Offline (no
    # network here; online the id is kept the same way), as wandb.init's own mode: wandb reads WANDB_MODE
    # once per process, and an earlier test's wandb.login may have read it already.
    offline = ("logger=wandb", "+logger.wandb.mode=offline")
    run_dir = tmp_path / "run"
    logger = instantiate(config(*offline, f"run_dir={run_dir}").logger.wandb)
    assert isinstance(logger, WandbLogger) and logger.version is None  # a first run: wandb chooses the id
    first_id = logger.experiment.id
    logger.experiment.finish()
    assert (run_dir / "wandb" / "vrft-run-id").read_text() == f"{first_id}\n"
    # ckpt_path= into the same folder
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    resumed = instantiate(config(*offline, f"run_dir={run_dir}", f"ckpt_path={checkpoint}").logger.wandb)
    assert resumed.version == first_id and resumed._wandb_init["resume"] == "allow"
    assert resumed.experiment.id == first_id
    resumed.experiment.finish()
    # a run in another folder is a W&B run of its own; an id given is the user's
    assert WandbLogger(project="vrft", save_dir=tmp_path / "other", mode="offline").version is None
    assert WandbLogger(project="vrft", save_dir=run_dir, id="chosen1", mode="offline").version == "chosen1"
    disabled = WandbLogger(project="vrft", save_dir=tmp_path / "disabled", mode="disabled")
    disabled.experiment.finish()  # a stand-in run with an id of its own, which no later run could resume
    assert not disabled.run_id_file.exists()


def test_a_fresh_run_into_a_folder_with_an_earlier_wandb_run_starts_its_own(tmp_path, no_wandb_login):
    # check_fresh_run lets a run start again where the earlier one stopped before its first checkpoint; it read
    # that run's id and joined its W&B run, two runs' curves in one.
    offline = ("logger=wandb", "+logger.wandb.mode=offline")
    run_dir = tmp_path / "run"
    id_file = run_dir / "wandb" / "vrft-run-id"
    earlier = instantiate(config(*offline, f"run_dir={run_dir}").logger.wandb)
    earlier_id = earlier.experiment.id
    earlier.experiment.finish()
    fresh = instantiate(config(*offline, f"run_dir={run_dir}").logger.wandb)  # no ckpt_path
    assert fresh.version is None  # wandb chooses a new id
    fresh_id = fresh.experiment.id
    fresh.experiment.finish()
    assert fresh_id != earlier_id and id_file.read_text() == f"{fresh_id}\n"  # what a resume goes on in
    # A fresh run that logs nowhere (WANDB_MODE=disabled) leaves no id behind for a resume of its checkpoints.
    disabled = instantiate(
        config("logger=wandb", "+logger.wandb.mode=disabled", f"run_dir={run_dir}").logger.wandb
    )
    disabled.experiment.finish()
    assert not id_file.exists()


def test_resumed_tensorboard_run_hides_the_earlier_runs_steps_after_its_checkpoint(tmp_path):
    # both runs' event files sit in one folder: TensorBoard showed both runs' points for steps 2 and 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vrft.loggers import TensorBoardLogger

    # The logger finds the step itself, as metrics.csv's writer does: the first optimizer step it logs. The
    # hyperparameters and the step-0 rows come first (they said nothing of it) and both runs' stay.
    for start, offset in ((0, 0.0), (1, 10.0)):  # a run to step 3, resumed from its step-1 checkpoint
        logger = TensorBoardLogger(tmp_path, name="tensorboard", version="", default_hp_metric=False)
        logger.log_hyperparams({"lr": 1e-4})
        logger.log_metrics({"data/skipped_rows_train": offset}, step=0)
        for step in range(start + 1, 4 + start):
            logger.log_metrics({"train/reward": offset + step}, step=step)
        logger.finalize("success")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    points = [(event.step, event.value) for event in events.Scalars("train/reward")]
    assert points == [(1, 1.0), (2, 12.0), (3, 13.0), (4, 14.0)]
    assert [event.value for event in events.Scalars("data/skipped_rows_train")] == [0.0, 10.0]


def test_the_purge_marker_opens_the_event_file_of_the_first_optimizer_step(tmp_path):
    # SummaryWriter(purge_step=...), torch's public way to hide a crashed run's later events, writes it first
    # in a file of its own. It was written with SummaryWriter's private _get_file_writer() into the file
    # Lightning opened at the hyperparameters.
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    from vrft.loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path, name="tensorboard", version="", default_hp_metric=False)
    logger.log_hyperparams({"lr": 1e-4})
    logger.log_metrics({"data/skipped_rows_train": 0.0}, step=0)
    for step in (3, 4):  # resumed from a step-2 checkpoint
        logger.log_metrics({"train/reward": float(step)}, step=step)
    logger.finalize("success")
    files = [
        [event for event in LegacyEventFileLoader(str(path)).Load() if not event.HasField("file_version")]
        for path in (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    ]
    (marked,) = [events for events in files if any(event.HasField("session_log") for event in events)]
    assert marked[0].session_log.status == SessionLog.START and marked[0].step == 3
    assert [event.step for event in marked[1:]] == [3, 4]
    (setup,) = [events for events in files if events is not marked]
    assert setup and all(event.step == 0 for event in setup)  # the hyperparameters and the step-0 rows


def test_validation_metrics_are_logged_at_the_optimizer_step_of_the_training_rows(tmp_path):
    # Two batches an optimizer step: Lightning's own logging step counts batches under manual optimization,
    # so the validation after step 2 of this run was written at step 3, past the run's last step.
    run_dir = tmp_path / "run"
    overrides = [o for o in FAST if not o.startswith(("trainer.max_steps", "algorithm.prompts_per_step"))]
    cfg = config(
        *overrides,
        "algorithm.prompts_per_step=4",
        "trainer.max_steps=2",
        "data.val_split=test",
        "trainer.val_check_interval=2",  # batches: one optimizer step
        f"run_dir={run_dir}",
    )
    vrft.train.fit(cfg)
    with (run_dir / "logs" / "metrics.csv").open(newline="") as file:
        table = list(csv.DictReader(file))
    train_steps = {int(row["step"]) for row in table if row.get("train/reward")}
    val_steps = [int(row["step"]) for row in table if row.get("val/map") or row.get("val/accuracy")]
    assert train_steps == {1, 2}
    assert val_steps == [1, 2]


def test_a_run_resumed_into_its_folder_shows_each_step_once_in_tensorboard(tmp_path):
    # the logger finds the step itself: vrft.train gives it nothing
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    overrides = [o for o in FAST if not o.startswith("trainer.max_steps")]
    vrft.train.fit(config(*overrides, "logger=tensorboard", "trainer.max_steps=2", f"run_dir={run_dir}"))
    checkpoint = run_dir / "checkpoints" / "step-step=1.ckpt"
    resumed = config(
        *overrides,
        "logger=tensorboard",
        "trainer.max_steps=3",
        f"run_dir={run_dir}",
        f"ckpt_path='{checkpoint}'",
    )
    vrft.train.fit(resumed)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/reward")] == [1, 2, 3]
