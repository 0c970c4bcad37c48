"""What a resume compares with its checkpoint before loading (`vrft.resume`), and reads of the checkpoint."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import vrft.cli  # noqa: F401  (importing it registers the resolvers the configs use)
from tests.support import train_config as config
from vrft.resume import CHECKPOINT_KEY, resume_settings
from vrft.validation import validate

TRAINED = ("warm_start=none", "lora.r=4")


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint of a run with `TRAINED`'s settings, at step 2."""
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "global_step": 2, CHECKPOINT_KEY: resume_settings(config(*TRAINED))}, path)
    return path


@pytest.mark.parametrize(
    ("resumed", "message"),
    [
        # min_new_tokens=8 forces every completion to 8 tokens: the resumed steps trained on other rollouts
        ("algorithm.min_new_tokens=8", "was trained with algorithm.min_new_tokens=0 but this run has "),
        ("algorithm.temperature=0.7", "was trained with algorithm.temperature=1.0 but this run has "),
        ("algorithm.group_size=2", "was trained with algorithm.group_size=4 but this run has "),
        ("algorithm.max_new_tokens=32", "was trained with algorithm.max_new_tokens=24 but this run has "),
        ("seed=3", "was trained with algorithm.rollout_seed=0 but this run has algorithm.rollout_seed=3"),
        # the loss: its KL weight (0 also drops the reference forward) and its class
        ("loss.beta=0.1", "was trained with loss.beta=0.04 but this run has "),
        (
            "loss=dapo",
            "was trained with loss._target_='vrft.modules.losses.SequenceMeanLoss' but this run has ",
        ),
    ],
)
def test_resume_with_another_rollout_setting_is_refused_naming_the_checkpoints_value(
    checkpoint, resumed, message
):
    validate(config(*TRAINED, f"ckpt_path={checkpoint}"))  # the same settings resume
    with pytest.raises(ValueError) as error:
        validate(config(*TRAINED, resumed, f"ckpt_path={checkpoint}"))
    key, value = message.split("was trained with ")[1].split(" but")[0].split("=", 1)
    assert message in str(error.value)
    assert f"; resume with {key}={value}, or start a new run from its adapter (lora.init_adapter=" in str(
        error.value
    )


@pytest.mark.parametrize(
    "resumed",
    ["algorithm.rollout_batch_size=2", "algorithm.update_micro_batch_size=4", "algorithm.stall_steps=9"],
)
def test_resume_with_another_memory_or_watch_setting_goes_on(checkpoint, resumed):
    # how the same work is split (to fit another card), or what is only watched
    validate(config(*TRAINED, resumed, f"ckpt_path={checkpoint}"))


def test_a_checkpoint_that_records_no_rollout_settings_still_resumes(checkpoint):
    # written before the algorithm's settings were recorded
    settings = {k: v for k, v in resume_settings(config(*TRAINED)).items() if not k.startswith("algorithm.")}
    torch.save({"state_dict": {}, CHECKPOINT_KEY: settings}, checkpoint)
    validate(config(*TRAINED, "algorithm.min_new_tokens=8", f"ckpt_path={checkpoint}"))


def test_a_resume_reads_the_checkpoints_index_once(tmp_path, monkeypatch):
    # validation's check, the comparison after precision=auto resolved and TensorBoard's step each read it
    import vrft.resume
    import vrft.train

    reads = []
    read = vrft.resume._read_checkpoint
    monkeypatch.setattr(vrft.resume, "_read_checkpoint", lambda path: reads.append(path) or read(path))
    monkeypatch.setattr(vrft.train, "apply_warm_start", lambda cfg, splits: [])
    fitted = []
    trainer = SimpleNamespace(loggers=[], fit=lambda module, **kwargs: fitted.append(kwargs["ckpt_path"]))
    monkeypatch.setattr(
        vrft.train,
        "build_run",
        lambda cfg, callbacks: SimpleNamespace(trainer=trainer, module=None, datamodule=None),
    )
    resumed = (*TRAINED, "precision=auto", "logger=tensorboard", f"run_dir={tmp_path / 'run'}")
    path = tmp_path / "last.ckpt"
    picked = vrft.train.resolve_auto(config(*resumed))  # what auto picks here (bf16: no budget on the CPU)
    torch.save({"state_dict": {}, "global_step": 2, CHECKPOINT_KEY: resume_settings(picked)}, path)
    vrft.train.fit(config(*resumed, f"ckpt_path={path}"))
    assert fitted == [str(path)]
    assert reads == [path]


def test_an_sft_resume_compares_no_loss(tmp_path):
    # algorithm=sft trains on the solutions: the GRPO loss node is composed but nothing reads it
    sft = ("algorithm=sft", "lora.r=4")
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "global_step": 2, CHECKPOINT_KEY: resume_settings(config(*sft))}, path)
    assert not any(key.startswith("loss.") for key in resume_settings(config(*sft)))
    validate(config(*sft, "loss.beta=0.1", f"ckpt_path={path}"))
