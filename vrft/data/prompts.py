"""The Visual-RFT questions, verbatim: detection, classification and reasoning grounding prompts."""

from __future__ import annotations

from vrft.rewards.boxes import check_coord_convention


def chat_prompt(processor, question: str) -> str:
    """`question` as the model reads it: a user turn of one image placeholder then the question, in the
    processor's chat template, up to where the answer begins. The processor widens the placeholder to the
    image's tokens; the rollout and the data module's length check both start from this text."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# The reference prompts, verbatim (including "tags.The" and, for grounding, "grouding" and the stray
# ")"): the published checkpoints were trained on exactly this text.
_DETECTION_PROMPT = (
    "Detect all objects belonging to the category '{category}' in the image, and provide the bounding boxes "
    "({range}) and confidence (between 0 and 1, with two decimal places). If no object belonging to the "
    "category '{category}' in the image, return 'No Objects'. Output the thinking process in <think> </think> "
    "and final answer in <answer> </answer> tags.The output answer format should be as follows: <think> ... "
    "</think> <answer>[{{'Position': [x1, y1, x2, y2], 'Confidence': number}}, ...]</answer> Please strictly "
    "follow the format."
)
_BOX_RANGE = {"qwen2vl": "between 0 and 1000, integer", "absolute": "in pixels, integer"}
_CLASSIFICATION_PROMPT = (
    "This is an image containing a {subject}. Please identify the {question} based on the image. Output the "
    "thinking process in <think> </think> and final answer in <answer> </answer> tags. The output answer "
    "format should be as follows: <think> ... </think> <answer>{answer_hint}</answer> Please strictly follow "
    "the format."
)
_GROUNDING_PROMPT = (
    "Output the bounding box in the image corresponding to the instruction: {instruction} Output the thinking "
    'process in <think> </think> and your grouding box. Following "<think> thinking process </think>\n'
    '<answer>(x1,y1),(x2,y2)</answer>)" format.'
)


def detection_prompt(category: str, coord_convention: str = "qwen2vl") -> str:
    """The Visual-RFT detection question for one category (the 0..1000 wording for "qwen2vl")."""
    check_coord_convention(coord_convention)
    return _DETECTION_PROMPT.format(category=category, range=_BOX_RANGE[coord_convention])


def classification_prompt(
    subject: str = "plant", question: str = "species of the plant", answer_hint: str = "species name"
) -> str:
    """The Visual-RFT classification question; the defaults give the Flowers102 prompt verbatim."""
    return _CLASSIFICATION_PROMPT.format(subject=subject, question=question, answer_hint=answer_hint)


def grounding_prompt(instruction: str) -> str:
    """The Visual-RFT reasoning-grounding question for one referring instruction."""
    return _GROUNDING_PROMPT.format(instruction=instruction)
