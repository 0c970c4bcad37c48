"""Grounding reward (GIoU + 1) against hand-computed values."""

from __future__ import annotations

import pytest

from vrft.rewards import GroundingReward, grounding_reward, reward_name

TRUTH = "<answer>(100,100),(200,200)</answer>"  # area 10000

# (completion, reward); reward = GIoU + 1 with GIoU = IoU - (enclosing - union) / enclosing.
CASES = [
    ("<think>t</think><answer>(100,100),(200,200)</answer>", 2.0),
    ("<answer>[100, 100, 200, 200]</answer>", 2.0),  # list form
    ("<answer>(200,200),(100,100)</answer>", 2.0),  # swapped corners
    ("<answer>( 100 , 100 ) , ( 200 , 200 )</answer>", 2.0),
    ("<answer>(100,100)(200,200)</answer>", 2.0),  # no comma between the corners
    ("<answer>(100.0,100.0),(200.0,200.0)</answer>", 2.0),
    ("<answer>(100,100),(200,200)", 2.0),  # cut-off </answer>
    ("<answer>box: (100,100),(200,200) and (0,0),(10,10)</answer>", 2.0),  # first box counts
    # Half overlap: inter 5000, union 15000, IoU 1/3; enclosing 15000 -> GIoU 1/3.
    ("<answer>(150,100),(250,200)</answer>", 4 / 3),
    # Inside: inter 2500, union 10000, IoU 1/4; enclosing = the truth -> GIoU 1/4.
    ("<answer>(125,125),(175,175)</answer>", 1.25),
    # Disjoint neighbour: IoU 0; enclosing 30000, union 20000 -> GIoU -1/3.
    ("<answer>(300,100),(400,200)</answer>", 2 / 3),
    # Far away: IoU 0; enclosing 900 * 900 = 810000, union 20000 -> GIoU -79/81.
    ("<answer>(900,900),(1000,1000)</answer>", 2 / 81),
    # The first of two boxes is (0,0),(10,10): union 10100, enclosing 40000 -> GIoU -0.7475.
    ("<answer>(0,0),(10,10),(100,100),(200,200)</answer>", 0.2525),
    # A point inside: IoU 0, enclosing = the truth = union -> GIoU 0.
    ("<answer>(150,150),(150,150)</answer>", 1.0),
    # Negative corner: inter 10000, union = enclosing = 90000 -> GIoU 1/9.
    ("<answer>(-100,-100),(200,200)</answer>", 10 / 9),
    ("<answer>(0,0),(1e300,1e300)</answer>", 0.0),  # areas overflow: GIoU -1, not NaN
    ("<answer>(nan,100),(200,200)</answer>", 0.0),  # non-finite: unreadable
    ("<answer>[100, 100, 200]</answer>", 0.0),  # three numbers
    ("<answer>not sure</answer>", 0.0),
    ("<answer></answer>", 0.0),
    ("", 0.0),
    ("(100,100),(200,200)", 0.0),  # default mode needs <answer>
]


@pytest.mark.parametrize(("completion", "expected"), CASES)
def test_grounding_reward_cases(completion, expected):
    assert grounding_reward([completion], [TRUTH]) == [pytest.approx(expected)]


def test_ground_truth_in_list_form():
    assert grounding_reward(
        ["<answer>(100,100),(200,200)</answer>"], ["<answer>[100, 100, 200, 200]</answer>"]
    ) == [2.0]


def test_compat_reads_whole_completion():
    assert GroundingReward(compat=True)(["(100,100),(200,200)"], [TRUTH]) == [2.0]


def test_coord_max_clamps_prediction():
    # (-100,100),(200,200) clamps to (0,100),(200,200): IoU 1/2, enclosing = union -> 1.5 (unclamped 4/3).
    completion = ["<answer>(-100,100),(200,200)</answer>"]
    assert GroundingReward(coord_max=1000)(completion, [TRUTH]) == [pytest.approx(1.5)]
    assert GroundingReward()(completion, [TRUTH]) == [pytest.approx(4 / 3)]


def test_name():
    assert reward_name(grounding_reward) == "grounding"
