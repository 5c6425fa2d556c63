"""Segmentation data: a folder loader for real images and `CellsDataModule`, the LightningDataModule
that serves the built-in synthetic cells (`zoo.data.cells`) or such folders to the U-Net task.

Folder layout (`root`):

    root/train/images/<stem>.<ext>      images, any size, grayscale or RGB, 8 or more bits
    root/train/masks/<stem>.<ext>       class ids (single channel), same size
    root/train/instances/<stem>.<ext>   optional: instance ids (0 = none)
    root/val/...   (same)          root/test/...   (optional, same)

<ext> is one of IMAGE_SUFFIXES (torchvision ImageFolder's: .jpg .jpeg .png .ppm .bmp .pgm .tif .tiff
.webp, any case); files with other suffixes are skipped with a warning naming them (hidden files
silently). Images keep their real values (16-bit, 32-bit and float images too). Every image needs a
mask with the same stem and size (and an instances file, if that folder exists), all images of a
dataset the same number of channels (RGBA drops alpha, palette images are converted to RGB);
otherwise ValueError naming the file. Without `instances/`, the cells the weight map's border term
refers to are the 4-connected components of each non-background class
(`zoo.data.cells.connected_components`), which is exact for cells separated by background membranes
(touching cells of the same class with no background between them merge into one component, and then
get no border term between them).

Weight maps (paper Eq. 2, `zoo.data.cells.weight_map`) are computed once per image in `setup`, on
the whole image, with class weights w_c(k) = N / (P n_k) from the training masks' pixel counts
(`zoo.data.cells.class_weights`; mean 1 over training pixels, absent classes 1) for every split.

A training sample (`TrainCrops`), drawn from a generator seeded by (seed, epoch, index):
1. the whole image, mask and weight map are augmented jointly (`augment=True`): one resampling
   through rotation + shift + the paper's 3x3-grid elastic field (image and weight bilinear, mask
   nearest, mirror-reflected beyond the border), then gray-value changes of the image;
2. a uniformly random S x S target window is cut from the mask and weight map;
3. the image window of (S + 2c) x (S + 2c) centred on it is cut from the image mirror-extended by
   c px per side (numpy "reflect", repeated when c exceeds the image), so the valid-convolution
   U-Net's output covers exactly the target window.

Batches (see docs/design.md): train {"image": (B, C, S+2c, S+2c) float32 raw, "mask": (B, S, S)
int64, "weight": (B, S, S) float32}; val/test {"image": (1, C, H, W), "mask": (1, H, W), "weight":
(1, H, W), "name": [str]}; predict {"image": (1, C, H, W), "name": [str]}.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.datasets.folder import IMG_EXTENSIONS

from zoo.data.augment import WeightMap, paper_augmentation, set_generator
from zoo.data.cells import class_weights, connected_components, make_cell, weight_map
from zoo.data.contract import DataInfo, ZooDataModule
from zoo.data.sampling import EpochSampler, seeded_generator, split_item, training_seed
from zoo.scaling import SCALER_KINDS, InputScaler

__all__ = [
    "CellsDataModule", "SegmentationSplit", "TrainCrops", "EvalImages", "PredictImages", "EpochSampler",
    "read_image", "read_rgb", "read_mask", "read_split", "list_images", "check_folder", "warn_skipped",
    "reflect_index", "IMAGE_SUFFIXES",
]

# The classifier's ImageFolder takes these, so every folder of the zoo takes the same files.
IMAGE_SUFFIXES = tuple(IMG_EXTENSIONS)

# Seed streams of the synthetic splits and of the per-epoch training randomness.
_TRAIN, _VAL, _TEST, _CROPS = 0, 1, 2, 10


@contextlib.contextmanager
def _one_thread():
    """Build data single-threaded: the work is many small tensor ops, which on a 2-core machine shared
    with another busy process run 10-20x slower with 2 intra-op threads (and ~1.5x faster when idle)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------- #
# Reading files
# --------------------------------------------------------------------------------------------- #

def _open(path: Path, what: str) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError...
        raise ValueError(f"cannot read {what} file {path}: {type(e).__name__}: {e}") from e
    pages = getattr(img, "n_frames", 1)
    if pages > 1:  # e.g. ISBI 2012's stacks: reading page 1 only would drop the rest silently
        raise ValueError(f"{what} file {path} holds {pages} pages (a stack); save one file per page")
    return img


def read_image(path) -> torch.Tensor:
    """An image file -> (C, H, W) float32 raw values (C = 1 grayscale, 3 color; alpha dropped)."""
    path = Path(path)
    return _image_tensor(_open(path, "image"), path)


def read_rgb(path):
    """An image file for the classifier's transforms: an 8-bit image as a PIL RGB image; an image of more
    bits (PIL modes I;16*, I, F: single-channel) as a (3, H, W) float32 tensor of its real values, the
    gray channel repeated, because PIL's convert("RGB") clips those to 255."""
    path = Path(path)
    img = _open(path, "image")
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _image_tensor(img, path).expand(3, -1, -1).contiguous()
    return img.convert("RGB")


def _image_tensor(img: Image.Image, path: Path) -> torch.Tensor:
    if img.mode == "P":
        img = img.convert("RGB")
    elif img.mode in ("1", "LA"):
        img = img.convert("L")
    elif img.mode in ("RGBA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
        img = img.convert("RGB")
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        arr = arr.transpose(2, 0, 1)
    else:
        raise ValueError(f"image file {path} has unsupported shape {arr.shape} (mode {img.mode})")
    return torch.from_numpy(arr.astype(np.float32, copy=True))


def read_mask(path, what: str = "mask") -> torch.Tensor:
    """A single-channel label file (class or instance ids) -> (H, W) int64."""
    path = Path(path)
    img = _open(path, what)
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise ValueError(f"{what} file {path} must be single-channel ids, got mode {img.mode} with shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{what} file {path} holds non-integer values; expected integer ids")
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    return torch.from_numpy(arr.astype(np.int64))


def check_folder(folder, what: str = "folder") -> Path:
    """`folder` as a Path; ValueError / NotADirectoryError (naming it as `what`) if it is missing or a file."""
    folder = Path(folder)
    if folder.is_file():
        raise NotADirectoryError(f"{what} {folder} is a file; expected a folder of images "
                                 f"({', '.join(IMAGE_SUFFIXES)})")
    if not folder.is_dir():
        raise ValueError(f"{what} {folder} does not exist")
    return folder


def warn_skipped(folder, names: list[str], why: str) -> None:
    """One warning for files of `folder` that are not read: their count, why, and the first few names."""
    if names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        warnings.warn(f"{folder}: skipped {len(names)} file(s) {why}: {shown}")


def list_images(folder, what: str = "folder") -> dict[str, Path]:
    """stem -> path of the image files (IMAGE_SUFFIXES, case-insensitive) in `folder`; warns about the
    other files (`warn_skipped`), leaving out hidden ones and subfolders."""
    folder = check_folder(folder, what)
    out: dict[str, Path] = {}
    skipped = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(p.name)
            continue
        if p.stem in out:
            raise ValueError(f"two files with the stem {p.stem!r} in {folder}: {out[p.stem].name} and {p.name}")
        out[p.stem] = p
    warn_skipped(folder, skipped, f"that are not images ({', '.join(IMAGE_SUFFIXES)})")
    return out


def read_split(folder, num_classes: int) -> dict[str, Any]:
    """Read `folder/images`, `folder/masks` (and `folder/instances` if present).

    Returns {"names": [file name], "images": [(C, H, W) float32], "masks": [(H, W) int64],
    "instances": [(H, W) int64] or None}, sorted by stem. Raises ValueError naming the file for a
    missing counterpart, a size mismatch, an unreadable file, a mask value outside [0, num_classes)
    or mixed channel counts.
    """
    folder = Path(folder)
    images = list_images(folder / "images")
    masks = list_images(folder / "masks")
    inst_dir = folder / "instances"
    instances = list_images(inst_dir) if inst_dir.is_dir() else None
    if not images:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder / 'images'}")
    for stem in sorted(set(images) | set(masks)):
        if stem not in masks:
            raise ValueError(f"image {images[stem]} has no mask: expected {folder / 'masks' / stem}.<ext>")
        if stem not in images:
            raise ValueError(f"mask {masks[stem]} has no image: expected {folder / 'images' / stem}.<ext>")
        if instances is not None and stem not in instances:
            raise ValueError(f"image {images[stem]} has no instances file: expected {inst_dir / stem}.<ext>")
    out: dict[str, Any] = {"names": [], "images": [], "masks": [], "instances": [] if instances is not None else None}
    channels = None
    for stem in sorted(images):
        img = read_image(images[stem])
        if channels is None:
            channels = (img.shape[0], images[stem])
        elif img.shape[0] != channels[0]:
            raise ValueError(f"image {images[stem]} has {img.shape[0]} channel(s) but {channels[1]} has "
                             f"{channels[0]}: all images must have the same number of channels")
        mask = read_mask(masks[stem])
        if tuple(mask.shape) != tuple(img.shape[1:]):
            raise ValueError(f"size mismatch: image {images[stem]} is {tuple(img.shape[1:])} (H, W) but mask "
                             f"{masks[stem]} is {tuple(mask.shape)}")
        lo, hi = int(mask.min()), int(mask.max())
        if lo < 0 or hi >= num_classes:
            bad = hi if hi >= num_classes else lo
            raise ValueError(f"mask {masks[stem]} holds the value {bad}, not a class id in [0, {num_classes}) "
                             f"(num_classes={num_classes})")
        if instances is not None:
            inst = read_mask(instances[stem], "instances")
            if tuple(inst.shape) != tuple(img.shape[1:]):
                raise ValueError(f"size mismatch: image {images[stem]} is {tuple(img.shape[1:])} (H, W) but "
                                 f"instances {instances[stem]} is {tuple(inst.shape)}")
            if int(inst.min()) < 0:
                raise ValueError(f"instances {instances[stem]} holds negative ids ({int(inst.min())})")
            out["instances"].append(inst)
        out["names"].append(images[stem].name)
        out["images"].append(img)
        out["masks"].append(mask)
    return out


# --------------------------------------------------------------------------------------------- #
# Datasets
# --------------------------------------------------------------------------------------------- #

class SegmentationSplit:
    """One split held in memory: names, images (C, H, W) float32 raw, masks (H, W) (stored compact,
    served int64), weight maps (H, W) float32."""

    def __init__(self, names: list[str], images: list[torch.Tensor], masks: list[torch.Tensor],
                 weights: list[torch.Tensor]):
        self.names, self.images, self.weights = names, images, weights
        self.masks = [m.to(torch.uint8) if int(m.max()) < 256 else m for m in masks]

    def __len__(self) -> int:
        return len(self.images)

    def mask(self, i: int) -> torch.Tensor:
        return self.masks[i].long()


def reflect_index(index: torch.Tensor, n: int) -> torch.Tensor:
    """Map integer positions (any, also far outside [0, n)) into [0, n) by mirror reflection about
    the first and last pixel (the edge is not repeated, numpy's "reflect"), repeated as needed."""
    if n == 1:
        return torch.zeros_like(index)
    period = 2 * (n - 1)
    m = torch.remainder(index, period)
    return torch.where(m < n, m, period - m)


class TrainCrops(Dataset):
    """Training samples: the whole image, mask and weight map augmented jointly (if `augment`),
    then a random S x S target window and the (S + 2c) x (S + 2c) image window around it, taken
    from the image mirror-extended by c (`reflect_index`). Index with (epoch, i) (see EpochSampler)
    or i (epoch 0). Returns {"image": (C, S+2c, S+2c) float32, "mask": (S, S) int64,
    "weight": (S, S) float32}."""

    def __init__(self, split: SegmentationSplit, crop_size: int, context: int = 0, augment=None, seed: int = 0):
        if context < 0:
            raise ValueError(f"context {context} must be >= 0")
        for name, img in zip(split.names, split.images):
            h, w = img.shape[-2:]
            if crop_size > min(h, w):
                raise ValueError(f"crop_size {crop_size} is larger than training image {name} of size "
                                 f"{h}x{w} (H x W); crop_size must be <= {min(h, w)}")
        self.split, self.crop_size, self.context, self.augment, self.seed = split, crop_size, context, augment, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item) -> dict[str, torch.Tensor]:
        epoch, i = split_item(item)
        g = seeded_generator([self.seed, _CROPS, int(epoch)], int(i))
        image, mask, weight = self.split.images[i], self.split.mask(i), self.split.weights[i]
        if self.augment is not None:
            set_generator(self.augment, g)
            out = self.augment({"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask),
                                "weight": WeightMap(weight)})
            image = out["image"].as_subclass(torch.Tensor)
            mask = out["mask"].as_subclass(torch.Tensor)
            weight = out["weight"].as_subclass(torch.Tensor)[0]
        s, c = self.crop_size, self.context
        h, w = image.shape[-2:]
        y0 = int(torch.randint(0, h - s + 1, (), generator=g))
        x0 = int(torch.randint(0, w - s + 1, (), generator=g))
        rows = reflect_index(torch.arange(y0 - c, y0 + s + c), h)
        cols = reflect_index(torch.arange(x0 - c, x0 + s + c), w)
        return {"image": image[:, rows[:, None], cols[None, :]].float().contiguous(),
                "mask": mask[y0:y0 + s, x0:x0 + s].long().contiguous(),
                "weight": weight[y0:y0 + s, x0:x0 + s].float().contiguous()}


class EvalImages(Dataset):
    """Whole images: {"image": (C, H, W), "mask": (H, W) int64, "weight": (H, W), "name": str}."""

    def __init__(self, split: SegmentationSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.split
        return {"image": s.images[i], "mask": s.mask(i), "weight": s.weights[i], "name": s.names[i]}


class PredictImages(Dataset):
    """Images without labels, {"image": (C, H, W) float32 raw, "name": str}: given as tensors, or as
    files read by `read_rgb` with `transform` on access."""

    def __init__(self, names: list[str], images=None, files: list[Path] | None = None, transform=None):
        self.names, self.images, self.files, self.transform = names, images, files, transform

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.images is not None:
            return {"image": self.images[i].float(), "name": self.names[i]}
        return {"image": self.transform(read_rgb(self.files[i])).float(), "name": self.names[i]}


# --------------------------------------------------------------------------------------------- #
# DataModule
# --------------------------------------------------------------------------------------------- #

class CellsDataModule(ZooDataModule):
    """Touching-cell segmentation data for the U-Net: built-in synthetic cells, or a folder.

    Args:
        root: folder with train/ and val/ (optionally test/) subfolders (see the module docstring);
            None -> synthetic cells (`zoo.data.cells.make_cells`).
        input_norm: the `zoo.scaling.InputScaler` kind fitted on the training images in `setup`
            (`self.scaler`); batches stay raw, the model applies the scaler.
        batch_size: training batch size (val/test/predict use 1: whole images of any size).
        crop_size: S, side of the training target crop (the network's output size).
        context: c, context pixels per side added to training image crops; None -> the attached
            model's `input_context` (0 if there is none).
        num_train, num_val: synthetic split sizes (the test split has num_val images).
        image_size: synthetic image side.
        num_classes: class ids in masks are 0..num_classes-1, 0 = background.
        w0, sigma: border term of the weight map (paper Eq. 2).
        augment: paper augmentation (rotation, shift, 3x3-grid elastic deformation, gray values).
        elastic_std: std (px) of the elastic displacement vectors; 0 disables the elastic part.
        seed: seed of the synthetic data; with the run's seed (`training_seed`), of the training
            crops/augmentation (epoch e uses (seed, e), so resumed runs see the same samples).
        num_workers: DataLoader workers.
        predict_dir: folder of images to predict; None -> the validation images.
    """

    def __init__(
        self,
        root: str | None = None,
        input_norm: str = "zscore",
        batch_size: int = 4,
        crop_size: int = 100,
        context: int | None = None,
        num_train: int = 64,
        num_val: int = 8,
        image_size: int = 256,
        num_classes: int = 2,
        w0: float = 10.0,
        sigma: float = 5.0,
        augment: bool = True,
        elastic_std: float = 10.0,
        seed: int = 0,
        num_workers: int = 0,
        predict_dir: str | None = None,
    ):
        super().__init__()
        if input_norm not in SCALER_KINDS:
            raise ValueError(f"input_norm {input_norm!r} is not one of {SCALER_KINDS}")
        for name, value, least in (("batch_size", batch_size, 1), ("crop_size", crop_size, 1),
                                   ("num_train", num_train, 1), ("num_val", num_val, 1),
                                   ("image_size", image_size, 1), ("num_classes", num_classes, 2),
                                   ("num_workers", num_workers, 0), ("seed", seed, 0)):
            if int(value) < least:
                raise ValueError(f"{name}={value} must be >= {least}")
        if context is not None and context < 0:
            raise ValueError(f"context={context} must be >= 0 (or None: the model's input_context)")
        if sigma <= 0 or w0 < 0 or elastic_std < 0:
            raise ValueError(f"need sigma > 0, w0 >= 0, elastic_std >= 0; got {sigma}, {w0}, {elastic_std}")
        self.save_hyperparameters()
        self.scaler: InputScaler | None = None
        self.class_weights: torch.Tensor | None = None
        self.in_channels: int | None = None
        self.splits: dict[str, SegmentationSplit] = {}
        self._train_raw: dict[str, Any] | None = None
        self.predict_set: PredictImages | None = None

    # ------------------------------------------------------------------ building splits

    def _raw_split(self, which: str) -> dict[str, Any]:
        hp = self.hparams
        if hp.root is None:
            stream = {"train": _TRAIN, "val": _VAL, "test": _TEST}[which]
            n = hp.num_train if which == "train" else hp.num_val
            items = [make_cell(i, hp.image_size, [hp.seed, stream]) for i in range(n)]
            return {"names": [f"cells_{which}_{i:04d}" for i in range(n)],
                    "images": [t[0] for t in items], "masks": [t[1] for t in items],
                    "instances": [t[2] for t in items]}
        folder = Path(hp.root) / which
        if not folder.is_dir():
            raise ValueError(f"the {which} split folder {folder} does not exist (root={hp.root})")
        raw = read_split(folder, hp.num_classes)
        channels = raw["images"][0].shape[0]
        if self.in_channels is not None and channels != self.in_channels:
            raise ValueError(f"images in {folder} have {channels} channel(s), the training images {self.in_channels}")
        if raw["instances"] is None:
            raw["instances"] = [connected_components(m) for m in raw["masks"]]
        return raw

    def _finish(self, raw: dict[str, Any]) -> SegmentationSplit:
        hp = self.hparams
        weights = [weight_map(m, i, hp.w0, hp.sigma, self.class_weights)
                   for m, i in zip(raw["masks"], raw["instances"])]
        return SegmentationSplit(raw["names"], raw["images"], raw["masks"], weights)

    def _load_train(self) -> None:
        """Read (or generate) the training split once: sets `in_channels`, `class_weights` (from its
        masks) and `self.scaler` (fitted on its images only). Its weight maps wait for `_split`."""
        if self.class_weights is not None:
            return
        with _one_thread():
            raw = self._raw_split("train")
            self.in_channels = raw["images"][0].shape[0]
            self.class_weights = class_weights(raw["masks"], self.hparams.num_classes)
        self._train_raw = raw
        self.scaler = InputScaler(self.in_channels, kind=self.hparams.input_norm).fit(self.train_images())

    def _split(self, which: str) -> SegmentationSplit:
        if which not in self.splits:
            self._load_train()
            raw = self._train_raw if which == "train" else self._raw_split(which)
            with _one_thread():
                self.splits[which] = self._finish(raw)
            if which == "train":
                self._train_raw = None
        return self.splits[which]

    def train_images(self) -> list[torch.Tensor]:
        """The raw training images as (1, C, H, W) tensors: what `self.scaler` is fitted on."""
        self._load_train()
        images = self.splits["train"].images if "train" in self.splits else self._train_raw["images"]
        return [img[None] for img in images]

    def setup(self, stage: str | None = None) -> None:
        """Build what the stage needs. The training split comes first (except for predicting a
        `predict_dir`, which needs no labels): its masks give the class weights w_c
        (`zoo.data.cells.class_weights`) of every split's weight maps, and its images alone fit
        `self.scaler`. fit: train + val; validate: val; test: test; predict: predict_dir or val."""
        if stage in (None, "fit"):
            self._split("train")
        if stage in (None, "fit", "validate"):
            self._split("val")
        if stage in (None, "test"):
            self._split("test")
        if stage in (None, "predict"):
            self._prepare_predict()

    def _prepare_predict(self) -> None:
        if self.predict_set is not None:
            return
        d = self.hparams.predict_dir
        if d is None:
            val = self._split("val")
            self.predict_set = PredictImages(val.names, val.images)
            return
        folder = Path(d)
        files = list_images(folder, "predict_dir")
        if not files:
            raise ValueError(f"predict_dir {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        # Only a training folder fixes the channels here; without one (a checkpoint's model, trained on
        # data not given now) the images must agree with each other, and the model checks its own input.
        train_images = Path(self.hparams.root) / "train" / "images" if self.hparams.root else None
        if self.in_channels is None and train_images is not None and train_images.is_dir():
            first = list_images(train_images)
            if first:
                self.in_channels = read_image(next(iter(first.values()))).shape[0]
        names, images = [], []
        for stem in sorted(files):
            img = read_image(files[stem])
            if self.in_channels is None:
                self.in_channels = img.shape[0]
            if img.shape[0] != self.in_channels:
                raise ValueError(f"image {files[stem]} has {img.shape[0]} channel(s), expected {self.in_channels} "
                                 "(the training data's, or the other images')")
            names.append(files[stem].name)
            images.append(img)
        self.predict_set = PredictImages(names, images)

    # ------------------------------------------------------------------ loaders

    def info(self) -> DataInfo:
        return DataInfo(scaler=self.scaler)

    def training_context(self) -> int:
        """c: `context` if set, else the attached task's `input_context` (`zoo.data.contract`), else 0."""
        if self.hparams.context is not None:
            return int(self.hparams.context)
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        return int(getattr(module, "input_context", 0))  # a task that is not a ZooModule: no context

    def _loader(self, dataset, batch_size: int, sampler=None) -> DataLoader:
        w = self.hparams.num_workers
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=w,
                          persistent_workers=w > 0)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        split = self._split("train")
        augment = paper_augmentation(elastic_std=hp.elastic_std) if hp.augment else None
        seed = training_seed(hp.seed)
        data = TrainCrops(split, hp.crop_size, self.training_context(), augment, seed)
        return self._loader(data, hp.batch_size, EpochSampler.for_training(self, len(data), seed, hp.batch_size))

    def val_dataloader(self) -> DataLoader:
        return self._loader(EvalImages(self._split("val")), 1)

    def test_dataloader(self) -> DataLoader:
        return self._loader(EvalImages(self._split("test")), 1)

    def predict_dataloader(self) -> DataLoader:
        self._prepare_predict()
        return self._loader(self.predict_set, 1)
