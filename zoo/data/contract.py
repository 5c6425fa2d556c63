"""The one contract between a datamodule and its task.

Data -> task: after `setup`, a `ZooDataModule` hands its task a `DataInfo` (`info()`): what it fitted
or found on its training split. A task reads it through `ZooModule.data_info()` and nothing else of
the datamodule. A datamodule that is not a `ZooDataModule` (a user's own) hands an empty `DataInfo`.

Task -> data: a task states `ZooModule.input_context` (pixels of context per side its network consumes
beyond its output; 0 for most), which the segmentation datamodule adds around its training crops.

Values both sides are configured with (`num_classes`, `block_size`, `max_seq_len`) are set once, on
the data, and the model follows (`zoo.cli.link_data_to_model`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import lightning as L

if TYPE_CHECKING:
    from zoo.data.text import Tokenizer
    from zoo.scaling import InputScaler


@dataclass
class DataInfo:
    """What a datamodule hands its task once `setup` has run; None: not provided by this data."""

    scaler: Optional[InputScaler] = None  # fitted on the training split; the task carries a copy
    classes: Optional[list[str]] = None  # class names, index = label
    tokenizers: Optional[dict[str, Tokenizer]] = None  # fitted on the training split: "text", or "src" / "tgt"
    chars_per_token: Optional[float] = None  # validation characters per token (bits per character)
    scale_factor: Optional[float] = None  # sketch offsets are divided by it (training split statistic)
    seq_len: Optional[int] = None  # the longest sequence a batch holds (LM window; longest sketch + 1)
    # what `predict` generates per prompt: predict-time options live in the datamodule, because
    # LightningCLI restores a checkpoint's model hparams over the command line
    max_new_tokens: Optional[int] = None
    greedy: Optional[bool] = None


class ZooDataModule(L.LightningDataModule):
    """A LightningDataModule that states what it hands its task (`info`)."""

    # Arguments that do not change what `fit` trains on (how batches are loaded, what predict reads or
    # writes): a resumed fit may change them without a warning (`zoo.cli.resume_settings`).
    resume_free: tuple[str, ...] = ("num_workers", "predict_dir", "predict_path", "max_new_tokens", "greedy",
                                    "cache_dir")

    def info(self) -> DataInfo:
        """The `DataInfo` of the data set up so far (fields not provided stay None)."""
        return DataInfo()
