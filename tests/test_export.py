"""`python -m vrft.export` refuses what it cannot merge in one line (exit 2), before the base model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vrft.export

TINY_CONFIG = {
    "model_type": "qwen2_vl",
    "vision_config": {"depth": 1},
    "text_config": {"hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 320},
}
Q_PROJ = "base_model.model.model.language_model.layers.0.self_attn.q_proj"


@pytest.fixture
def no_load(monkeypatch):
    """Every refusal here must come before the merge: loading the base (minutes for 7B) fails the test."""
    monkeypatch.setattr(vrft.export, "load_base_model", lambda *args: pytest.fail("the base loaded"))
    monkeypatch.setattr(vrft.export, "merged_model", lambda *args: pytest.fail("the merge started"))


def export_error(capsys, *arguments: str | Path) -> str:
    """What `python -m vrft.export` prints when it refuses `arguments` (exit 2)."""
    with pytest.raises(SystemExit) as exit_info:
        vrft.export.main([str(argument) for argument in arguments])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    return error


def write_adapter(
    folder: Path, base: str, r: int, in_features: int, rank_in_weights: int | None = None
) -> Path:
    """A peft adapter folder with one LoRA pair on layer 0's q_proj (`in_features` wide, `r` in its config)."""
    folder.mkdir(parents=True)
    config = {"base_model_name_or_path": base, "peft_type": "LORA", "r": r, "lora_alpha": 2 * r}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    rank = rank_in_weights or r
    weights = {
        f"{Q_PROJ}.lora_A.weight": torch.zeros(rank, in_features),
        f"{Q_PROJ}.lora_B.weight": torch.zeros(in_features, rank),
    }
    save_file(weights, folder / "adapter_model.safetensors")
    return folder


def test_a_run_folder_or_checkpoint_names_the_runs_adapter(tmp_path, capsys, no_load):
    # both said "has no adapter_config.json; pass a peft adapter folder such as <run>/adapter/final"
    run = tmp_path / "run"
    for name in ("final", "step-20", "step-100"):
        (run / "adapter" / name).mkdir(parents=True)
        (run / "adapter" / name / "adapter_config.json").write_text("{}")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    final = run / "adapter" / "final"
    assert export_error(capsys, run, tmp_path / "out") == (
        f"vrft: error: '{run}' is a run folder, not an adapter folder; pass its adapter '{final}' (or one of "
        "its 2 step-N adapters)\n"
    )
    assert export_error(capsys, run / "checkpoints" / "last.ckpt", tmp_path / "out") == (
        f"vrft: error: '{run / 'checkpoints' / 'last.ckpt'}' is a Lightning checkpoint, not an adapter folder; "
        f"pass its adapter '{final}' (or one of its 2 step-N adapters)\n"
    )
    (final / "adapter_config.json").unlink()
    final.rmdir()
    assert export_error(capsys, run, tmp_path / "out") == (
        f"vrft: error: '{run}' is a run folder, not an adapter folder; it has no adapter/final (it stopped "
        f"before the end): pass its latest, '{run / 'adapter' / 'step-100'}'\n"
    )
    assert "does not exist; pass a peft adapter folder" in export_error(
        capsys, run / "typo", tmp_path / "out"
    )
    assert not (tmp_path / "out").exists()


def test_an_output_that_cannot_be_made_is_named_before_the_merge(tmp_path, capsys, no_load):
    # the merge ran first and ended in "[Errno 2] No such file or directory: '/proc/vrft-probe'"
    adapter = write_adapter(tmp_path / "adapter", "qwen2vl-2b", r=4, in_features=1536)
    assert export_error(capsys, adapter, "/proc/vrft-probe/merged") == (
        "vrft: error: output '/proc/vrft-probe/merged' cannot be made (No such file or directory); pass a new "
        "folder in a place you can write\n"
    )


def test_a_failed_merge_leaves_no_half_written_output(tmp_path, monkeypatch):
    # only FileNotFoundError and ValueError removed the output: any other error left a folder that looks whole
    def fails_midway(adapter, output, *args):
        output.mkdir(exist_ok=True)  # as save_pretrained makes it
        (output / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(vrft.export, "export", fails_midway)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        vrft.export.main([str(tmp_path / "adapter"), str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()


def test_an_adapter_of_another_model_or_rank_is_refused_before_the_base_loads(tmp_path, capsys, monkeypatch):
    # peft printed a page of "size mismatch for ..." once the whole base had loaded
    monkeypatch.setattr(vrft.export, "load_base_model", lambda *args: pytest.fail("the base loaded"))
    other = write_adapter(tmp_path / "other", "qwen2vl-2b", r=4, in_features=64)
    assert export_error(capsys, other, tmp_path / "out") == (
        f"vrft: error: adapter '{other}' does not fit base 'qwen2vl-2b': "
        f"'{Q_PROJ.removeprefix('base_model.model.')}' has in_features=1536, the adapter's lora_A has 64; "
        "pass --base <the model it was trained on>\n"
    )
    mixed = write_adapter(tmp_path / "mixed", "qwen2vl-2b", r=4, in_features=1536, rank_in_weights=16)
    assert export_error(capsys, mixed, tmp_path / "out").startswith(
        f"vrft: error: adapter '{mixed}': its lora_A of '{Q_PROJ.removeprefix('base_model.model.')}' has rank "
        "16, its adapter_config.json says r=4;"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("config", "weights", "problem"),
    [
        ('{"model_type": "qwen2_vl",', True, "has a config.json that cannot be read (Expecting"),
        (
            '{"model_type": "llama", "hidden_size": 64}',
            True,
            "is a 'llama' checkpoint (config.json's model_type)",
        ),
        (
            '{"model_type": "qwen2_vl", "hidden_size": 64}',
            True,
            "has a partial config.json (no vision_config,",
        ),
        (
            json.dumps(TINY_CONFIG),
            False,
            "has a config.json but no weights (*.safetensors or pytorch_model*.bin)",
        ),
    ],
)
def test_a_base_folder_vrft_cannot_load_is_named_by_its_option(
    tmp_path, capsys, no_load, config, weights, problem
):
    # an OSError, an AttributeError ('LlamaConfig' has no 'vision_config') or "no file named model.safetensors"
    # from deep in transformers, or, for the partial config, the 2B defaults merged in silently
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(config)
    if weights:
        (base / "model.safetensors").write_bytes(b"")
    adapter = write_adapter(tmp_path / "adapter", str(base), r=4, in_features=64)
    error = export_error(capsys, adapter, tmp_path / "out", "--base", base)
    assert error.startswith(f"vrft: error: --base '{base}' {problem}"), error
    assert error.endswith("pass --base <a local Qwen2-VL / Qwen2.5-VL checkpoint folder>\n")


def test_the_4bit_export_keeps_the_vision_tower_and_lm_head_in_bf16(tmp_path):
    # llm_int8_skip_modules=["visual"] matched no module name ("model.visual.blocks.0.attn.qkv"): the vision
    # tower was quantised as well, and bitsandbytes' CPU forward failed on its first image
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from vrft.models.presets import tiny_checkpoint

    base = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint(), dtype=torch.float32)
    torch.manual_seed(0)
    adapter = get_peft_model(base, LoraConfig(r=2, target_modules=r".*language_model.*\.q_proj"))
    adapter.save_pretrained(tmp_path / "adapter")
    merged = vrft.export.export(tmp_path / "adapter", tmp_path / "merged-int4", int4=True)
    with safe_open(str(merged / "model.safetensors"), framework="pt") as weights:
        names = list(weights.keys())  # noqa: SIM118 (a safetensors file has no __iter__)
    quantised = {name.removesuffix(".weight.absmax") for name in names if name.endswith(".absmax")}
    assert quantised and all(".layers." in name for name in quantised), sorted(quantised)[:3]
    assert not any(name.startswith(("visual", "model.visual", "lm_head")) for name in quantised)


def test_an_adapter_without_its_weights_is_named_with_exports_own_words(tmp_path, capsys, no_load):
    # "point adapters= at a peft adapter folder": evaluate's option, which export does not have
    adapter = write_adapter(tmp_path / "adapter", "qwen2vl-2b", r=4, in_features=1536)
    (adapter / "adapter_model.safetensors").unlink()
    assert export_error(capsys, adapter, tmp_path / "out") == (
        f"vrft: error: adapter '{adapter}' has no adapter_model.safetensors (its weights; a copy cut short?); "
        "pass a whole peft adapter folder such as <run>/adapter/final\n"
    )


def test_a_tiny_run_moved_to_another_machine_is_told_to_pass_the_preset(tmp_path, capsys, no_load):
    # its adapter records the vrft cache folder it was trained in ("/root/.cache/vrft/tiny-91f30f707d30"):
    # "does not exist; pass --base <a local Qwen2-VL / Qwen2.5-VL checkpoint folder>" named no folder to pass
    adapter = write_adapter(
        tmp_path / "adapter", str(tmp_path / "cache" / "tiny-91f30f707d30"), r=4, in_features=64
    )
    assert export_error(capsys, adapter, tmp_path / "out") == (
        f"vrft: error: adapter '{adapter}' records base model '{tmp_path / 'cache' / 'tiny-91f30f707d30'}', which "
        "does not exist; pass --base tiny (the built-in preset it was trained on, built again from its seed)\n"
    )
