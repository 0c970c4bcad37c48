"""The `small` preset (issue 18) builds with the intended shape, and the small-parity matrix expands to its 45
cells. Built on the meta device: no weights are allocated."""

import importlib.util
from pathlib import Path

import torch

from vrft.models.policy import ModelSpec
from vrft.models.presets import CACHED_PRESETS, QWEN2_VOCAB, model_class, preset_config

ROOT = Path(__file__).resolve().parents[1]


def _run_matrix():
    spec = importlib.util.spec_from_file_location("run_matrix", ROOT / "bench/learning/run_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_preset_shape():
    config = preset_config("small")
    with torch.device("meta"):
        model = model_class(config)._from_config(config)
    language = model.model.language_model
    decoder = sum(p.numel() for p in language.layers.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    assert language.embed_tokens.weight.shape == (QWEN2_VOCAB, 512)
    assert len(language.layers) == 8
    # The counts stated in presets.py: 22.6M decoder ("tens of millions"), 5.0M vision tower.
    assert 20e6 < decoder < 25e6
    assert 4e6 < vision < 6e6
    assert "small" in CACHED_PRESETS and not ModelSpec(name_or_path="small").is_random_preset


def test_small_parity_matrix_has_45_cells():
    run_matrix = _run_matrix()
    axes, fixed = run_matrix.MATRICES["small-parity"]
    cells = run_matrix.cells(axes, fixed)
    assert len(cells) == 45
    names = {run_matrix.cell_name(cell, fixed) for cell in cells}
    assert len(names) == 45  # every cell has its own run folder
    for task in ("classification", "detection", "grounding"):
        assert (ROOT / f"conf/experiment/small_parity_{task}.yaml").exists()
        assert sum(f"small_parity_{task}" in name for name in names) == 15
