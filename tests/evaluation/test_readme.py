"""The README's evaluation commands, run as written: annotations -> eval split -> before/after table.

The user's files are stood in for by a COCO-format file of two images over the 8 categories of `coco-8`, the
tiny preset saved where the README's local model folder is, and a random-weight adapter where the README's
training run leaves its adapter. The only additions to the README's command are budgets that keep the
random tiny model's garbage short.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.evaluation.support import ROOT, local_model, random_adapter
from vrft.data.eval_splits import CATEGORY_SETS

FAST = ["max_new_tokens=8", "batch_size=16"]


def readme_commands() -> list[list[str]]:
    """The commands of the README block marked `<!-- evaluation commands -->`, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- evaluation commands -->\s*```bash\n(.*?)```", text, re.DOTALL).group(1)
    commands = block.replace("\\\n", " ").strip().splitlines()
    return [[sys.executable if w == ".venv/bin/python" else w for w in shlex.split(c)] for c in commands]


def readme_output(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(rf"<!-- {name} output -->\s*```text\n(.*?)```", text, re.DOTALL).group(1)


def write_user_files(cwd: Path) -> None:
    """coco/annotations/instances_val2017.json + coco/val2017/, models/Qwen2-VL-2B-Instruct, the adapter."""
    images = cwd / "coco" / "val2017"
    images.mkdir(parents=True)
    entries = []
    for image_id, color in ((1, (200, 40, 40)), (2, (40, 40, 200))):
        name = f"{image_id:012d}.jpg"
        Image.new("RGB", (64, 56), color).save(images / name)
        entries.append({"id": image_id, "file_name": name, "width": 64, "height": 56})
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(CATEGORY_SETS["coco-8"])]
    annotations = [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 5,
            "bbox": [8, 8, 32, 24],
            "area": 768,
            "iscrowd": 0,
        },  # a cat
        {
            "id": 2,
            "image_id": 2,
            "category_id": 6,
            "bbox": [16, 4, 40, 40],
            "area": 1600,
            "iscrowd": 0,
        },  # a dog
    ]
    (cwd / "coco" / "annotations").mkdir()
    coco = {"images": entries, "annotations": annotations, "categories": categories}
    (cwd / "coco" / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    local_model(cwd / "models" / "Qwen2-VL-2B-Instruct")
    random_adapter(cwd / "outputs" / "coco8_4shot" / "adapter" / "final")


def test_readme_evaluation_commands_run_as_written(tmp_path):
    write_user_files(tmp_path)
    build, evaluate = readme_commands()
    built = subprocess.run(build, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    assert built.stdout == readme_output("build")

    run_dir = tmp_path / "outputs" / "eval"
    command = [*evaluate, *FAST, f"hydra.run.dir={run_dir}"]
    evaluated = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    table = (run_dir / "results.md").read_text()
    assert table in evaluated.stdout
    assert "| metric (%) | base | outputs/coco8_4shot/adapter/final | Δ vs base |" in table
    predictions = (run_dir / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 2 * 16  # base and adapter, 2 images x 8 categories each
