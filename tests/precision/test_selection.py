"""Keep-rule paths: whole dotted segments, `*` for one level, with or without peft/Lightning prefixes."""

from __future__ import annotations

import pytest

from vrft.precision.selection import KeepRules, decoder_layer_count, path_pattern

NAMES = [
    "policy.base_model.model.model.visual.blocks.0.attn.qkv",
    "policy.base_model.model.model.visual.merger.mlp.0",
    "policy.base_model.model.model.language_model.layers.1.mlp.down_proj.base_layer",
    "policy.base_model.model.model.language_model.layers.10.mlp.down_proj.base_layer",
    "policy.base_model.model.model.language_model.layers.1.self_attn.q_proj.base_layer",
    "policy.base_model.model.lm_head",
]


@pytest.mark.parametrize(
    ("path", "matched"),
    [
        ("visual", [0, 1]),
        ("visual.merger", [1]),
        ("model.visual.merger", [1]),
        ("layers.1", [2, 4]),  # not layers.10
        ("layers.*.mlp.down_proj", [2, 3]),
        ("lm_head", [5]),
        ("merger.mlp", [1]),
        ("erger", []),  # segments match whole, never part of a name
        (".lm_head.", [5]),
    ],
)
def test_path_pattern_matches_whole_segments(path, matched):
    pattern = path_pattern(path.strip("."))
    assert [i for i, name in enumerate(NAMES) if pattern.search(name)] == matched


def test_decoder_layer_count_reads_the_largest_index():
    names = [
        "m.language_model.layers",
        "m.language_model.layers.0",
        "m.language_model.layers.11",
        "m.visual.blocks.40",
    ]
    assert decoder_layer_count(names) == 12
    assert decoder_layer_count(["m.visual.blocks.0"]) == 0


def test_keep_first_and_last_layers_become_patterns():
    names = [f"m.language_model.layers.{i}" for i in range(6)]
    labels = KeepRules(vision=False, merger=False, lm_head=False, first_layers=2, last_layers=1).patterns(
        names
    )
    assert list(labels) == ["decoder layer 0", "decoder layer 1", "decoder layer 5"]


def test_keep_layers_without_decoder_layers_is_an_error():
    with pytest.raises(ValueError, match=r"keep_first_layers=1 .* this model has none"):
        KeepRules(first_layers=1).patterns(["m.visual.blocks.0"])


@pytest.mark.parametrize("entry", ["", "..", 3])
def test_keep_modules_entries_must_be_paths(entry):
    with pytest.raises(ValueError, match=r"keep_modules entry .* is not a module path"):
        KeepRules(modules=(entry,))
