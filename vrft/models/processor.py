"""Loading the Qwen2-VL / Qwen2.5-VL processor without torchvision.

transformers' Qwen2-VL processor insists on a video processor whose class needs torchvision, which some
installs (CPU builds of torch) cannot import. vrft trains on images only, so it builds the processor from the
tokenizer and the PIL image processor alone.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from vrft.models.tokenizer import QWEN2_VL_CHAT_TEMPLATE


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """A Qwen2-VL processor for images and text; asking it for video raises."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def load_processor(folder: str | Path, min_pixels: int, max_pixels: int) -> ImageOnlyQwen2VLProcessor:
    """The processor of a local checkpoint folder, with the image budget (pixels) of the run."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(
        folder, min_pixels=min_pixels, max_pixels=max_pixels
    )
    chat_template = getattr(tokenizer, "chat_template", None) or _folder_chat_template(Path(folder))
    return ImageOnlyQwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=chat_template or QWEN2_VL_CHAT_TEMPLATE,
    )


def _folder_chat_template(folder: Path) -> str | None:
    # Released checkpoints keep the template in chat_template.json(or .jinja) next to the processor config.
    import json

    for name in ("chat_template.jinja", "chat_template.json"):
        path = folder / name
        if path.exists():
            text = path.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None
