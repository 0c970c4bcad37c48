"""Classification accuracy reward: default (fixed) and reference-compatible behaviour."""

from __future__ import annotations

import pytest

from vrft.rewards import AccuracyReward, accuracy_reward, normalize_label, reward_name

DAISY = "<answer>daisy</answer>"
PRIMROSE = "<answer>pink primrose</answer>"

# (completion, solution, default reward, compat reward)
CASES = [
    ("<think>petals</think><answer>daisy</answer>", DAISY, 1.0, 1.0),
    ("<answer>Daisy</answer>", DAISY, 1.0, 1.0),  # lowercased
    ("<answer> pink primrose </answer>", "<answer>pink_primrose</answer>", 1.0, 1.0),  # both "pinkprimrose"
    (
        "<answer>primrose</answer>",
        PRIMROSE,
        0.0,
        1.0,
    ),  # compat: "primrose" in "pinkprimrose"; part of a label
    ("<answer>a pink primrose flower</answer>", PRIMROSE, 1.0, 1.0),  # truth inside the answer
    ("<answer>DAISY_FLOWER</answer>", DAISY, 1.0, 1.0),  # the word "daisy" / "daisyflower" contains "daisy"
    ("<answer>d</answer>", DAISY, 0.0, 1.0),  # compat: "d" in "daisy"; a letter is no label
    ("<answer>daisies</answer>", DAISY, 1.0, 0.0),  # plural
    ("<answer>pinkprimroses</answer>", PRIMROSE, 1.0, 1.0),  # written without a space, plural
    ("<answer>daisy rose</answer>", DAISY, 1.0, 1.0),  # "rose" is no known class of this batch
    ("<answer>daisyish</answer>", DAISY, 0.0, 1.0),  # not a whole word
    ("<answer>rose</answer>", DAISY, 0.0, 0.0),
    ("<answer>Pink-Primrose</answer>", PRIMROSE, 1.0, 0.0),  # compat removes spaces, not hyphens
    ("<answer>pink\tprimrose</answer>", PRIMROSE, 1.0, 0.0),  # compat removes spaces, not tabs
    ("<answer>rose</answer><answer>daisy</answer>", DAISY, 0.0, 0.0),  # the first answer counts
    ("<answer>\ndaisy\n</answer>", DAISY, 1.0, 1.0),  # compat: no one-line match, whole text contains daisy
    # The loophole: an empty answer "contains" nothing, so the reference scores it 1.
    ("<answer></answer>", DAISY, 0.0, 1.0),
    ("<answer>   </answer>", DAISY, 0.0, 1.0),
    ("<answer>_ _</answer>", DAISY, 0.0, 1.0),  # normalises to ""
    ("", DAISY, 0.0, 1.0),  # compat reads the whole (empty) completion
    # No answer tag: the default needs one, the reference reads the whole completion.
    ("daisy", DAISY, 0.0, 1.0),
    ("I think it's a daisy", DAISY, 0.0, 1.0),  # "ithinkit'sadaisy" contains "daisy"
    ("<answer>daisy", DAISY, 0.0, 1.0),  # unclosed: compat reads "<answer>daisy" whole
    ("<ANSWER>daisy</ANSWER>", DAISY, 0.0, 1.0),  # tags are case-sensitive
    ("I think it's a rose", DAISY, 0.0, 0.0),
    ("<answer>daisy</answer>", "daisy", 0.0, 1.0),  # ground truth without tags: only compat falls back
    ("<answer>daisy</answer>", "<answer></answer>", 0.0, 1.0),  # empty ground truth
]


@pytest.mark.parametrize(("completion", "solution", "default", "compat"), CASES)
def test_accuracy_reward_cases(completion, solution, default, compat):
    assert accuracy_reward([completion], [solution]) == [default]
    assert AccuracyReward(compat=True)([completion], [solution]) == [compat]


def test_empty_answer_loophole_only_in_compat_mode():
    completions = ["<think>no idea</think><answer></answer>"] * 2
    assert AccuracyReward(compat=False)(completions, [DAISY, PRIMROSE]) == [0.0, 0.0]
    assert AccuracyReward(compat=True)(completions, [DAISY, PRIMROSE]) == [1.0, 1.0]


def test_chat_message_completions_are_read():
    completion = [{"role": "assistant", "content": "<answer>daisy</answer>"}]
    assert accuracy_reward([completion], [DAISY]) == [1.0]


def test_batch_length_mismatch_names_the_fix():
    with pytest.raises(ValueError, match="group_size"):
        accuracy_reward(["<answer>a</answer>"] * 2, [DAISY])


def test_name_and_normalisation():
    assert reward_name(accuracy_reward) == "accuracy"
    assert normalize_label("  Pink_Prim rose ") == "pinkprimrose"
    assert "compat=True" in repr(AccuracyReward(compat=True))


def test_classes_given_as_one_string_are_refused():
    # task.classes="rose,tulip" made every letter a known class: "a daisy" named the class "a" and scored 0
    with pytest.raises(ValueError, match=r"task.classes='daisy,rose' is one string.*task.classes=\[daisy"):
        AccuracyReward(classes="daisy,rose")
    assert AccuracyReward(classes=["daisy", "rose"])(
        ["<answer>a daisy</answer>"], ["<answer>daisy</answer>"]
    ) == [1.0]
