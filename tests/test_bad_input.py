"""Bad settings end in one line naming the key, the value and the fix, before anything loads.

Most cases run in-process (`hydra.compose` + `vrft.validation.validate`, what `fit` calls first); a
few run the real CLI (each subprocess costs its imports, tens of seconds on a busy machine) to show the whole path: exit code 2, the key in stderr, no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.support import train_config as config
from vrft.cli import (
    check_composes,
    check_sweep,
)  # importing vrft.cli registers the resolvers the task configs use
from vrft.paths import cache_root
from vrft.resume import CHECKPOINT_KEY, check_fresh_run, resume_settings
from vrft.validation import check_command_line, validate

ROOT = Path(__file__).resolve().parents[1]


# (overrides, text the one-line error must contain)
CASES = [
    (["model=local"], "model.name_or_path is not set (???); pass a local Qwen2-VL"),
    (["optimizer.lr=fast"], "optimizer.lr='fast' is not a number"),
    (["algorithm.group_size=abc"], "algorithm.group_size='abc' is not an integer"),
    (["trainer.max_steps=three"], "trainer.max_steps='three' is not an integer"),
    (["lora.r=0"], "lora.r=0 must be >= 1"),
    (["warm_start.lora.r=0"], "warm_start.lora.r=0 must be >= 1"),
    (["algorithm.temperature=0"], "algorithm.temperature=0 must be > 0"),
    (["algorithm.top_p=1.5"], "algorithm.top_p=1.5 must be in (0, 1]"),
    (["algorithm.rollout_batch_size=0"], "algorithm.rollout_batch_size=0 must be >= 1"),
    (["+trainer.gradient_clip_val=1.0"], "trainer.gradient_clip_val is set by vrft, not by Lightning; use algorithm.max_grad_norm"),
    (["+trainer.accumulate_grad_batches=2"], "use algorithm.prompts_per_step"),
    (["+trainer.precision=bf16-mixed"], "use the precision group, e.g. precision=bf16"),
    (["+algorithm.num_generations=8"], "algorithm.num_generations is TRL's name; vrft's setting is algorithm.group_size"),
    (["+algorithm.group_sise=8"], "algorithm.group_sise is not a setting of vrft.modules.grpo.GRPOModule; did you mean algorithm.group_size?"),
    (["+lora.rank=8"], "lora.rank is not a setting of vrft.models.policy.LoraSpec"),
    (["task.rewards.accuracy.fn.compat=maybe"], "task.rewards.accuracy.fn.compat='maybe' is not true or false"),
    (["task=detection", "task.strict=sometimes"], "task.rewards.confidence.fn.strict='sometimes' is not true or false"),
    (["ckpt_path=/no/such.ckpt"], "ckpt_path='/no/such.ckpt' is not a file"),
    (["trainer.max_steps=-5"], "trainer.max_steps=-5 must be >= 0, or -1 for no limit (train by epochs)"),
    (["trainer.max_epochs=-2"], "trainer.max_epochs=-2 must be >= 0, or -1 for no limit (train by steps)"),
    (["trainer.num_nodes=0"], "trainer.num_nodes=0 must be >= 1"),
    # taken and trained wrongly, or refused only once the model or the Trainer is built
    (["optimizer.lr=0"], "^optimizer.lr=0 must be > 0"),
    (["optimizer.lr=-1e-4"], "optimizer.lr=-0.0001 must be > 0"),
    (["warm_start.optimizer.lr=0"], "warm_start.optimizer.lr=0 must be > 0"),
    (["optimizer.weight_decay=-1"], "optimizer.weight_decay=-1 must be >= 0"),
    (["algorithm.max_grad_norm=-1"], "algorithm.max_grad_norm=-1 must be > 0, or null for no clipping"),
    (["algorithm=sft", "algorithm.max_grad_norm=-1"], "algorithm.max_grad_norm=-1 must be > 0, or null"),
    (["algorithm.advantage_eps=0"], "algorithm.advantage_eps=0 must be > 0"),
    (["scheduler=cosine", "trainer.max_steps=-1", "trainer.max_epochs=2"], "^scheduler.num_training_steps=-1 must be >= 1"),
    (["callbacks.checkpoint.every_n_train_steps=-5"], "callbacks.checkpoint.every_n_train_steps=-5 must be >= 0"),
    (["data.num_workers=-1"], "data.num_workers=-1 must be >= 0"),
    (["data.val_batch_size=0"], "data.val_batch_size=0 must be >= 1"),
    (["warm_start.steps=-5"], "warm_start.steps=-5 must be >= 1, or warm_start=none"),
    (["lora.dropout=1.5"], "lora.dropout=1.5 must be in [0, 1)"),
    (["lora.target_modules='(q_proj'"], "lora.target_modules='(q_proj' is not a regular expression"),
    (["model.max_pixels=-1"], "model.max_pixels=-1 must be >= 784"),
    (["model.min_pixels=0"], "model.min_pixels=0 must be >= 784"),
    (["trainer.devices=0"], "trainer.devices=0 is not a device count"),
    (["trainer.devices=-2"], "trainer.devices=-2 is not a device count"),
    (["trainer.devices=two"], "trainer.devices='two' is not a device count"),
    # refused before only once the loss, the data module or the model was built (after a warm start)
    (["loss.beta=-1"], "loss.beta=-1 must be >= 0"),
    (["loss.epsilon=0"], "loss.epsilon=0 must be > 0"),
    (["loss.epsilon_high=-0.5"], "loss.epsilon_high=-0.5 must be >= 0, or null for loss.epsilon"),
    (["loss=dapo", "loss.epsilon_high=-0.5"], "loss.epsilon_high=-0.5 must be >= 0"),
    (["data.on_bad_row=Skip"], "data.on_bad_row='Skip' is not one of: error, skip"),
    (["lora.init_adapter=/nonexistent/adapter"], "lora.init_adapter='/nonexistent/adapter' is not a folder"),
    (["plan.prompt_text_tokens=-5"], "plan.prompt_text_tokens=-5 must be >= 1"),
    (["plan.image_tokens=-1"], "plan.image_tokens=-1 must be >= 1, or null"),
    (["plan.prompt_text_tokens=abc"], "plan.prompt_text_tokens='abc' is not a number"),
    (["seed=-1"], "seed=-1 must be an integer in [0, 2**32 - 1]"),
    (["seed=abc"], "^seed='abc' is not a number"),
    (["scheduler.num_warmup_steps=-5"], "scheduler.num_warmup_steps=-5 must be >= 0"),
    (["algorithm.min_new_tokens=-3"], "algorithm.min_new_tokens=-3 must be >= 0"),
    (["warm_start=none", "lora.target_modules=nothing_here"], "lora.target_modules='nothing_here' matches no module of model.name_or_path='tiny'"),
    (["model=qwen2vl-7b", "lora.target_modules=nothing_here"], "matches no module of model.name_or_path='qwen2vl-7b'"),
    (["warm_start.lora.target_modules=nothing_here"], "warm_start.lora.target_modules='nothing_here' matches no module"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "message"), CASES, ids=[" ".join(o) for o, _ in CASES])
def test_bad_setting_is_named_before_loading(overrides, message):
    with pytest.raises(ValueError) as error:
        validate(config(*overrides))
    if message.startswith("^"):  # named at the key the user sets, not where it is interpolated
        assert str(error.value).startswith(message[1:]), str(error.value)
    else:
        assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["task=detection", "task.strict=true"],
        ["task=grounding"],
        ["algorithm=sft"],
        ["+hw=rtx4090", "precision=int4"],
        ["trainer.max_steps=-1", "trainer.max_epochs=1"],  # the floors themselves: -1 is "no limit"
        ["scheduler=cosine"],
        ["algorithm.max_grad_norm=null"],
        ["trainer.devices=auto"],
        ["trainer.devices=-1"],
        ["trainer.devices=[0,1]"],
        ["trainer.devices='0,1'"],
        ["callbacks.checkpoint.every_n_train_steps=0"],
    ],
)
def test_good_settings_pass(overrides):
    validate(config(*overrides))


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "the file is empty"),
        (b"not a checkpoint\n", "not a torch.save archive"),
        (None, "a truncated torch.save archive"),
    ],
    ids=["empty", "text", "truncated"],
)
def test_unreadable_checkpoint_is_named(tmp_path, content, reason):
    path = tmp_path / "last.ckpt"
    if content is None:
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:500])
    else:
        path.write_bytes(content)
    with pytest.raises(
        ValueError, match=f"ckpt_path='{path}' is not a readable Lightning checkpoint \\({reason}\\)"
    ):
        validate(config(f"ckpt_path={path}"))


def test_checkpoint_of_something_else_is_named(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="holds no Lightning training state"):
        validate(config(f"ckpt_path={path}"))


@pytest.mark.parametrize(
    ("resumed", "message"),
    [
        ("lora.r=8", "was trained with lora.r=4 but this run has lora.r=8; resume with lora.r=4"),
        ("model=qwen2vl-2b", "was trained with model.name_or_path='tiny'"),
        ("precision=bf16", "was trained with precision._target_='vrft.precision.Fp32Precision'"),
        # Lightning restores the optimizer's state, learning rate included: the new one was silently ignored
        (
            "optimizer.lr=0.005",
            "was trained with optimizer.lr=0.0005 but this run has optimizer.lr=0.005; resume with "
            "optimizer.lr=0.0005, or start a new run from its adapter (lora.init_adapter=",
        ),
        ("optimizer=adamw8bit", "was trained with optimizer._target_='torch.optim.AdamW'"),
    ],
)
def test_resume_with_other_model_lora_precision_or_optimizer_is_refused(tmp_path, resumed, message):
    # without a warm start: the lora node's shape is the adapter's
    path = tmp_path / "last.ckpt"
    trained = ("warm_start=none", "lora.r=4")
    torch.save({"state_dict": {}, CHECKPOINT_KEY: resume_settings(config(*trained))}, path)
    validate(config(*trained, f"ckpt_path={path}"))  # the same settings resume
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        validate(config(*trained, resumed, f"ckpt_path={path}"))


def test_a_run_from_a_warm_start_records_and_resumes_with_the_adapters_shape(tmp_path):
    # The warm start's recipe (r=16, lm_head too) is the adapter GRPO trains, whatever lora.r says: the
    # checkpoint records that shape, and is compared with it before the warm start is made again.
    settings = resume_settings(config("lora.r=4"))
    assert (settings["lora.r"], settings["lora.alpha"], settings["lora.starts_from"]) == (16, 32, "adapter")
    assert settings["lora.target_modules"].endswith("|lm_head")
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, CHECKPOINT_KEY: settings}, path)
    validate(config(f"ckpt_path={path}"))  # lora.r=64, the node's default: not what the adapter has
    with pytest.raises(ValueError) as error:
        validate(config("warm_start=none", f"ckpt_path={path}"))  # a fresh r=64 adapter
    assert (
        "was trained with lora.r=16 but this run has lora.r=64; resume with the adapter its run started from "
        "(the same lora.init_adapter, or the same warm_start)"
    ) in str(error.value)


def test_a_run_from_an_adapter_folder_records_that_adapters_shape(tmp_path):
    from peft import LoraConfig

    LoraConfig(r=8, lora_alpha=24, target_modules=["q_proj", "v_proj"]).save_pretrained(tmp_path)
    settings = resume_settings(config(f"lora.init_adapter={tmp_path}"))
    assert settings["lora.r"] == 8 and settings["lora.alpha"] == 24
    assert settings["lora.target_modules"] == ["q_proj", "v_proj"]  # peft's set, in a stable order


def test_an_older_checkpoint_of_a_warm_started_run_still_resumes(tmp_path):
    # Its record (no lora.starts_from) holds the lora node's r=64 where the adapter had the warm start's 16.
    settings = resume_settings(config())
    settings |= {"lora.r": 64, "lora.alpha": 128}
    del settings["lora.starts_from"]
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, CHECKPOINT_KEY: settings}, path)
    validate(config(f"ckpt_path={path}"))


def test_resume_from_a_checkpoint_already_at_max_steps_is_refused(tmp_path):
    # Lightning would load it and stop at once: no training, no checkpoint, exit 0
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "global_step": 4, CHECKPOINT_KEY: resume_settings(config())}, path)
    validate(config("trainer.max_steps=5", f"ckpt_path={path}"))
    validate(config("trainer.max_steps=-1", "trainer.max_epochs=3", f"ckpt_path={path}"))  # by epochs
    for steps in (4, 2):
        with pytest.raises(ValueError) as error:
            validate(config(f"trainer.max_steps={steps}", f"ckpt_path={path}"))
        assert (
            f"is at step 4 and trainer.max_steps={steps}: nothing is left to train; raise trainer.max_steps"
            in str(error.value)
        )


def test_resume_compares_with_the_run_folder_config_of_an_older_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    OmegaConf.save(config("warm_start=none", "lora.r=4"), tmp_path / "config.yaml")
    path = tmp_path / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}}, path)  # written before checkpoints carried their settings
    with pytest.raises(ValueError, match="was trained with lora.r=4 but this run has lora.r=16"):
        validate(config("warm_start=none", "lora.r=16", f"ckpt_path={path}"))


def test_fresh_run_over_an_earlier_runs_checkpoints_is_refused(tmp_path):
    cfg = config()
    cfg.run_dir = str(tmp_path)
    check_fresh_run(cfg)  # an empty folder
    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": {}}, tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(
        ValueError, match=r"already holds checkpoints .* resume it with ckpt_path='.*last.ckpt'"
    ):
        check_fresh_run(cfg)
    cfg.ckpt_path = str(tmp_path / "checkpoints" / "last.ckpt")
    check_fresh_run(cfg)  # resuming into its own folder


def test_fresh_run_over_an_earlier_runs_final_adapter_or_with_a_file_for_checkpoints_is_refused(tmp_path):
    # an earlier run that kept no checkpoint still left its adapter; a file where the checkpoints go would
    # fail only after training
    cfg = config()
    cfg.run_dir = str(tmp_path)
    (tmp_path / "adapter" / "final").mkdir(parents=True)
    check_fresh_run(cfg)  # an empty folder: nothing to lose
    (tmp_path / "adapter" / "final" / "adapter_model.safetensors").write_bytes(b"weights")
    with pytest.raises(ValueError, match=r"adapter/final' already holds the final adapter of an earlier run"):
        check_fresh_run(cfg)
    cfg.ckpt_path = str(tmp_path / "last.ckpt")
    check_fresh_run(cfg)  # resuming: the run goes on and writes its adapter again
    other = config()
    other.run_dir = str(tmp_path / "other")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "checkpoints").write_text("not a folder")
    with pytest.raises(ValueError, match=r"callbacks.checkpoint.dirpath='.*checkpoints' is a file"):
        check_fresh_run(other)


def test_unquoted_equals_in_a_value_names_the_quoting():
    with pytest.raises(ValueError, match="""quote the value: "ckpt_path='runs/lr=1e-3/last.ckpt'\""""):
        check_command_line(["ckpt_path=runs/lr=1e-3/last.ckpt"])
    check_command_line(["ckpt_path='runs/lr=1e-3/last.ckpt'", "-m", "optimizer.lr=1e-3,1e-4"])


def run_cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "VRFT_TRACEBACK"}
    # the overrides first: Hydra's parser takes its flags (`-m`) only before the first override
    command = [sys.executable, "-m", "vrft.train", *overrides, f"hydra.run.dir={cwd / 'run'}"]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer.lr=fast"], "optimizer.lr='fast' is not a number"),
        (["ckpt_path=runs/lr=1e-3/last.ckpt"], "quote the value"),
        (
            ["precision=in4"],
            "vrft: error: precision=in4: no such option in conf/precision; choose one of auto, bf16, fp16, "
            "fp32, int4, int4_qat, int8, mixed, mixed_tiny; did you mean int4?\n",
        ),
    ],
    ids=["typed value", "unquoted equals", "no such option"],
)
def test_cli_exits_2_with_one_line(tmp_path, overrides, message):
    result = run_cli(*overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "vrft: error: " in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr


def test_every_job_of_a_sweep_is_checked_before_the_first_starts(tmp_path):
    # Hydra composes a job when it starts: a bad value in the last job was found after the others trained
    started = []

    def check(cfg):
        started.append((cfg.optimizer.lr, cfg.seed))
        validate(cfg)

    sweep = ["-m", "seed=0,1", "optimizer.lr=1e-3,-1", f"hydra.sweep.dir={tmp_path}"]
    with pytest.raises(ValueError) as error:
        check_sweep("train", sweep, check)
    assert str(error.value).startswith(
        f"2 of the sweep's 4 jobs would fail (checked before any starts): job 1 (seed=0 optimizer.lr=-1 "
        f"hydra.sweep.dir={tmp_path}): optimizer.lr=-1 must be > 0"
    )
    assert f"; job 3 (seed=1 optimizer.lr=-1 hydra.sweep.dir={tmp_path}): optimizer.lr=-1 must" in str(
        error.value
    )
    assert started == [(1e-3, 0), (-1, 0), (1e-3, 1), (-1, 1)]  # each job composed, and checked
    started.clear()
    check_sweep("train", ["-m", "seed=0,1", "optimizer.lr=1e-3,1e-4"], check)
    assert len(started) == 4
    check_sweep("train", ["seed=0", "optimizer.lr=-1"], check)  # not a sweep: validate() checks it in the run
    assert len(started) == 4


def test_a_sweep_names_an_added_key_nothing_reads_before_any_job_starts():
    # validate() reads a run's `+key` additions from the running Hydra job, and before a sweep starts there
    # is none: each job failed only as it started, after the ones before it had trained.
    with pytest.raises(ValueError) as error:
        check_sweep("train", ["-m", "seed=0,1", "+max_steps=5"], validate)
    typo = "max_steps is not a vrft setting (+max_steps=5 adds a key nothing reads); did you mean trainer.max_steps?"
    assert str(error.value) == (
        f"2 of the sweep's 2 jobs would fail (checked before any starts): job 0 (seed=0 +max_steps=5): {typo}; "
        f"job 1 (seed=1 +max_steps=5): {typo}"
    )
    checked = []
    check_sweep(
        "train", ["-m", "seed=0,1", "++trainer.max_steps=5", "+hw=rtx4090", "precision=int4"], checked.append
    )
    assert len(checked) == 2  # a key something reads, and a config group, pass


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ("optimizer.lr=1e-3,-1", "1 of the sweep's 2 jobs would fail (checked before any starts): job 1"),
        ("+max_steps=1,2", "job 0 (+max_steps=1 hydra.sweep.dir="),
    ],
    ids=["bad value", "added key nothing reads"],
)
def test_a_sweep_with_a_bad_job_exits_2_before_any_job_starts(tmp_path, sweep, message):
    result = run_cli("-m", sweep, f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "vrft: error: " in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "sweep").exists()  # job 0 did not start


def test_a_run_folder_that_is_a_file_is_named_before_hydra_makes_it(tmp_path):
    # Hydra made the folder before vrft's code ran: mkdir's FileExistsError traceback, exit 1
    (tmp_path / "run").write_text("notes")
    result = run_cli(cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"vrft: error: hydra.run.dir '{tmp_path / 'run'}' is a file; pass hydra.run.dir=<a folder>" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    with pytest.raises(ValueError, match=r"hydra.run.dir '.*run/sub' is under '.*run', which is a file"):
        check_composes("evaluate", [f"hydra.run.dir={tmp_path / 'run' / 'sub'}"])
    check_composes("train", [f"hydra.run.dir={tmp_path / 'new' / 'run'}"])  # folders still to make


def test_a_cache_folder_that_is_a_file_is_named_by_its_variable(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("notes")
    for cache, where in (
        ("cache", "is a file"),
        ("cache/vrft", f"is under '{tmp_path / 'cache'}', which is a file"),
    ):
        monkeypatch.setenv("VRFT_CACHE", str(tmp_path / cache))
        with pytest.raises(ValueError) as error:
            cache_root()
        assert str(error.value) == (
            f"the cache folder (VRFT_CACHE) '{tmp_path / cache}' {where}; set VRFT_CACHE=<a folder>"
        )
    monkeypatch.setenv("VRFT_CACHE", str(tmp_path / "new"))
    assert cache_root() == tmp_path / "new"


def test_a_prompt_template_field_that_is_not_a_column_is_named_before_loading(tmp_path):
    # each prompt is template.format(**row): `{question}` used to stop the run at its first prompt ("vrft:
    # error: question"), after the model had loaded and the warm start had trained
    import datasets

    from vrft.train import check_prompt_fields

    rows = {"image": ["a.png"], "problem": ["what?"], "solution": ["<answer>x</answer>"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "data"))
    disk = ("data=disk", f"data.path={tmp_path / 'data'}")
    check_prompt_fields(config(*disk))  # {problem}
    check_prompt_fields(config(*disk, "algorithm.prompt_template='Q: {problem} ({solution!r:.3})'"))
    with pytest.raises(ValueError) as error:
        check_prompt_fields(config(*disk, "algorithm.prompt_template='{question}'"))
    assert str(error.value).startswith(
        "algorithm.prompt_template='{question}' asks for ['question'], not a column"
    )
    assert "(columns: ['image', 'problem', 'solution'])" in str(error.value)
    with pytest.raises(ValueError, match=r"algorithm.prompt_template='\{problem' is not a format string"):
        check_prompt_fields(config("algorithm.prompt_template='{problem'"))  # the synthetic data: braces only


def test_a_run_that_kept_no_checkpoint_does_not_print_a_checkpoints_folder(tmp_path, monkeypatch, capsys):
    # save_top_k=0 with save_last=false writes none: the line named an empty (or missing) folder
    import vrft.train

    def fitted(run_dir):
        summary = types.SimpleNamespace(
            summary={"checkpoint_dir": str(run_dir / "checkpoints")}, path="s.json"
        )
        return types.SimpleNamespace(callback_metrics={}), None, summary

    cfg = config()
    cfg.run_dir = str(tmp_path)
    monkeypatch.setattr(vrft.train, "fit", lambda cfg: fitted(tmp_path))
    vrft.train.train(cfg)
    assert "  checkpoints: none kept (callbacks.checkpoint: save_top_k, save_last" in capsys.readouterr().out
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    vrft.train.train(cfg)
    assert f"  checkpoints: {tmp_path / 'checkpoints'}\n" in capsys.readouterr().out


def test_an_export_output_under_a_file_is_named_before_the_merge(tmp_path, capsys, monkeypatch):
    # makedirs' NotADirectoryError traceback came after the base had loaded and the adapter merged
    import vrft.export

    def merges(*args):
        raise AssertionError("the merge ran")

    monkeypatch.setattr(vrft.export, "export", merges)
    (tmp_path / "notes").write_text("kept")
    with pytest.raises(SystemExit) as exit_info:
        vrft.export.main([str(tmp_path / "adapter"), str(tmp_path / "notes" / "merged")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"vrft: error: output '{tmp_path / 'notes' / 'merged'}' is under '{tmp_path / 'notes'}', which is a "
        "file; pass a new folder\n"
    )


def test_a_cache_folder_with_a_quoted_tilde_or_an_empty_value_is_read_as_meant(tmp_path, monkeypatch):
    # VRFT_CACHE='~/cache' (quoted: no shell expands it) was written under the home folder but renamed
    # into place as './~/cache', which failed and left a .partial folder; VRFT_CACHE= built it in the cwd
    from vrft.data.datamodule import VisualRFTDataModule

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("VRFT_CACHE", "~/cache")
    assert cache_root() == tmp_path / "cache"
    module = VisualRFTDataModule(synthetic={"task": "classification", "num_train": 2, "num_test": 1})
    folder = module.dataset_path()
    assert folder.parent == tmp_path / "cache" and (folder / "dataset_dict.json").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]  # no .partial left
    monkeypatch.setenv("VRFT_CACHE", "")
    assert cache_root() == tmp_path / ".cache" / "vrft"


def test_resume_with_precision_auto_compares_what_auto_picked(tmp_path, monkeypatch):
    # validation skips precision=auto (it resolves later, with the planner): a fp32 checkpoint resumed in
    # whatever auto picked (bf16 here: no memory budget on the CPU) went on without a word
    import vrft.train

    class Built(Exception):
        pass

    def build_run(cfg, *args, **kwargs):
        raise Built

    monkeypatch.setattr(vrft.train, "build_run", build_run)
    monkeypatch.setattr(vrft.train, "apply_warm_start", lambda cfg, splits: [])
    path = tmp_path / "last.ckpt"
    trained = ("warm_start=none", "lora.r=4", f"run_dir={tmp_path / 'run'}")
    torch.save({"state_dict": {}, CHECKPOINT_KEY: resume_settings(config(*trained))}, path)
    with pytest.raises(Built):
        vrft.train.fit(config(*trained, f"ckpt_path={path}"))  # the same precision resumes
    with pytest.raises(
        ValueError, match="was trained with precision._target_='vrft.precision.Fp32Precision'"
    ):
        vrft.train.fit(config(*trained, "precision=auto", f"ckpt_path={path}"))
