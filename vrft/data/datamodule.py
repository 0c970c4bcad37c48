"""The Lightning data module: Visual-RFT rows, validated before the first step, batched as lists of dicts."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal, get_args

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from vrft.data.loading import check_problem, decode_image, load_visual_rft
from vrft.data.prompt_length import PromptBudget, length_faults
from vrft.data.sampler import ResumableSampler
from vrft.data.synthetic import write_synthetic_dataset
from vrft.paths import cache_key, cache_root

log = logging.getLogger(__name__)
# What a bad row does; a Literal so that vrft.validation reads the choices from the signature before loading.
OnBadRow = Literal["error", "skip"]


def text_faults(table, count: int, check_solution: Callable[[str], None] | None) -> dict[int, str]:
    """The rows among the first `count` of `table` that the data module refuses by their text, each with why:
    a missing, blank or non-string problem (`check_problem`), or a solution the task's `check_solution` cannot
    parse. The one rule for which rows are bad: `vrft.train` checks the validation rows the data module keeps
    against the task's metric before anything loads, so the two read it here rather than each its own copy."""
    text = table.select_columns(["problem", "solution"])[:count]
    faults = {}
    for index, (problem, solution) in enumerate(zip(text["problem"], text["solution"], strict=True)):
        try:
            check_problem(problem)
            if check_solution is not None:
                check_solution(solution)
        except ValueError as error:
            faults[index] = str(error)
    return faults


class RowDataset(Dataset):
    """Rows of one split as dicts with a decoded RGB `image`; `indices` selects the rows kept."""

    def __init__(self, table, indices: list[int]):
        self.table = table
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        row_index = self.indices[index]
        row = dict(self.table[row_index])
        row["image"] = decode_image(row["image"])
        # Evaluation needs to know which row and what image size a completion answers.
        row["row_index"] = row_index
        row["image_size"] = row["image"].size
        return row


def _as_list(batch: list[dict]) -> list[dict]:
    # Rows stay Python dicts: the policy's processor turns them into tensors (it owns the image budget).
    return batch


class VisualRFTDataModule(L.LightningDataModule):
    """Visual-RFT data (columns `image`, `problem`, `solution`) for training and validation.

    Args:
        path: a `save_to_disk` folder, parquet file/folder or JSON/JSONL file (see `load_visual_rft`).
        synthetic: instead of `path`, settings for `vrft.data.synthetic.write_synthetic_dataset`; the set is
            generated once into the vrft cache and then read from disk like any other.
        batch_size: prompts per training batch (the GRPO rollout batch).
        check_solution: the task's solution checker; raises `ValueError` for a ground truth the reward
            cannot parse.
        on_bad_row: `error` stops before training and lists the bad rows; `skip` drops them and logs the count.
        verify_images: decode every image of the training and validation splits once at setup, so a bad file is
            found before step one.
        max_train_rows / max_val_rows: use only the first rows of each split (quick runs).
        prompt_budget: returns what a prompt may take of the model's context (`PromptBudget`); rows past it
            are bad rows. Called once at setup, before the model loads (`vrft.setup.build_run` passes the
            policy module's); None checks no lengths.
    """

    def __init__(
        self,
        path: str | None = None,
        synthetic: dict | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        batch_size: int = 2,
        val_batch_size: int = 8,
        check_solution: Callable[[str], None] | None = None,
        on_bad_row: OnBadRow = "error",
        verify_images: bool = True,
        max_train_rows: int | None = None,
        max_val_rows: int | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        prompt_budget: Callable[[], PromptBudget | None] | None = None,
    ):
        super().__init__()
        if (path is None) == (synthetic is None):
            raise ValueError(
                "set exactly one of data.path (a dataset on disk) or data.synthetic (generated data)"
            )
        if on_bad_row not in get_args(OnBadRow):
            raise ValueError(f"data.on_bad_row='{on_bad_row}' is not one of: {', '.join(get_args(OnBadRow))}")
        self.path = path
        self.synthetic = dict(synthetic) if synthetic is not None else None
        self.train_split = train_split
        self.val_split = val_split
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.check_solution = check_solution
        self.on_bad_row = on_bad_row
        self.verify_images = verify_images
        self.max_rows = {"train": max_train_rows, "val": max_val_rows}
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.prompt_budget = prompt_budget
        self.skipped_rows: dict[str, int] = {}
        self.splits: dict[str, RowDataset] = {}
        self._resume: dict | None = None  # {"epoch", "batches"} from a checkpoint, applied to the next loader

    def dataset_path(self) -> Path:
        """Where the data is read from (generating the synthetic set on first use)."""
        if self.synthetic is None:
            return Path(self.path)
        key = cache_key(json.dumps(self.synthetic, sort_keys=True))
        folder = cache_root() / f"synthetic-{self.synthetic.get('task', 'data')}-{key}"
        if not (folder / "dataset_dict.json").exists():
            log.info("writing synthetic dataset %s to %s (once)", self.synthetic, folder)
            # Written aside and renamed into place: runs started together (a parallel sweep) never read a
            # half-written folder, and the first rename wins.
            partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
            write_synthetic_dataset(partial, **self.synthetic)
            try:
                partial.rename(folder)
            except OSError:
                shutil.rmtree(partial, ignore_errors=True)
                if not (folder / "dataset_dict.json").exists():
                    raise
        return folder

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        path = self.dataset_path()
        dataset = load_visual_rft(path)
        budget = None if self.prompt_budget is None else self.prompt_budget()
        for role, split in (("train", self.train_split), ("val", self.val_split)):
            if split is None:
                continue
            if split not in dataset:
                raise ValueError(
                    f"dataset '{path}' has no split '{split}' (splits: {list(dataset)}); set data.{role}_split"
                )
            table = dataset[split]
            limit = self.max_rows[role]
            count = len(table) if limit is None else min(limit, len(table))
            if count == 0:
                raise ValueError(
                    f"split '{split}' of dataset '{path}' is empty; point data.path at a dataset with rows"
                )
            # the validation split's images too: a bad one stopped the run at the first validation, after
            # training steps, even with data.on_bad_row=skip
            self.splits[role] = RowDataset(table, self._good_rows(table, count, split, role, budget))
        train = self.splits.get("train")
        if train is not None and len(train) < self.batch_size:
            raise ValueError(
                f"split '{self.train_split}' has {len(train)} usable row(s), fewer than one batch of "
                f"{self.batch_size} prompts; lower algorithm.rollout_batch_size or add data"
            )

    def _good_rows(self, table, count: int, split: str, role: str, budget: PromptBudget | None) -> list[int]:
        faults = text_faults(table, count, self.check_solution)
        sizes: dict[int, tuple[int, int]] = {}  # of the images decoded here: the length check reuses them
        for index in range(count):
            if index not in faults and self.verify_images:
                try:
                    sizes[index] = decode_image(table[index]["image"]).size
                except ValueError as error:
                    faults[index] = str(error)
        if budget is not None:
            good = [index for index in range(count) if index not in faults]
            faults.update(length_faults(table, good, budget, role, sizes))
        bad = sorted(faults.items())
        if bad and self.on_bad_row == "error":
            listed = "; ".join(f"row {i}: {reason}" for i, reason in bad[:5])
            raise ValueError(
                f"{len(bad)} bad row(s) in split '{split}': {listed}. Fix the data, or set data.on_bad_row=skip "
                "to drop them (the count is logged)"
            )
        if bad:
            log.warning(
                "skipping %d bad row(s) of split '%s' (data.on_bad_row=skip); first: %s",
                len(bad),
                split,
                bad[0],
            )
        self.skipped_rows[split] = len(bad)
        skipped = {i for i, _ in bad}
        kept = [i for i in range(count) if i not in skipped]
        if not kept:
            raise ValueError(f"every row of split '{split}' is bad; first problem: {bad[0][1]}")
        return kept

    def train_dataloader(self) -> DataLoader:
        # One seeded order of the rows per epoch, dealt to the ranks in turn; Lightning keeps it under DDP (it
        # is a DistributedSampler). Lightning's own DistributedSampler would not resume.
        seed = torch.initial_seed() % 2**62
        trainer = self.trainer
        sampler = ResumableSampler(
            len(self.splits["train"]),
            seed,
            self.shuffle,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
        )
        if self._resume is not None:
            sampler.resume_at(self._resume["epoch"], self._resume["rows"])
            self._resume = None
        return DataLoader(
            self.splits["train"],
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=_as_list,
            num_workers=self.num_workers,
            # Its own generator: a loader without one draws its workers' base seed from the global RNG at
            # every new iterator, and a resumed run makes one more iterator than a straight run.
            generator=torch.Generator().manual_seed(seed),
        )

    def state_dict(self) -> dict:
        """Where training is in the data: the epoch and how many of its batches were trained on.

        Read from the fit loop's progress (the batches training steps finished), not from the loader,
        which has already fetched the next batch when a checkpoint is written.
        """
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        # Rows of the epoch's order trained on by all ranks together: resumable on any number of ranks.
        rows = progress.processed * self.batch_size * trainer.world_size
        return {"epoch": trainer.current_epoch, "batches": progress.processed, "rows": rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = dict(state_dict) if state_dict else None
        if self._resume is not None and "rows" not in self._resume:  # saved by one process before "rows"
            self._resume["rows"] = self._resume.get("batches", 0) * self.batch_size

    def val_dataloader(self) -> DataLoader | list:
        if "val" not in self.splits:
            return []
        return DataLoader(
            self.splits["val"],
            batch_size=self.val_batch_size,
            collate_fn=_as_list,
            num_workers=self.num_workers,
        )
