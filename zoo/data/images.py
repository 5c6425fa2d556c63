"""Image classification data: built-in synthetic shapes-and-textures, or an ImageFolder tree, served by
`ImagesDataModule` to `zoo.tasks.classification.ImageClassification`.

Built-in data (`root=None`, no download): class k of `num_classes` (2..12) is shape `SHAPES[k % 4]`
filled with texture `TEXTURES[k // 4]` (names like "triangle/stripes"). Each image draws, from a
generator seeded by (seed, split, index) only: a shape radius (18-32 % of the side), a center keeping
the shape inside, a rotation, a stripe/checker period and orientation, and three colors, uniform per
channel: background c0, shape c1 = (c0 + U(0.3, 0.7)) mod 1, second texture color c2 = (c1 + U(0.3,
0.7)) mod 1 (so the shape always contrasts with the background), plus N(0, 0.03) pixel noise. Every
color is uniform on [0, 1] whatever the class, so the class-conditional mean image is the same
(0.5 everywhere) for every class: a linear model on pixels is at chance, while the class is plain to
a model that detects edges and compares them (tests check the linear part). Labels cycle through
the classes (index % num_classes), so splits are balanced.

Folder data (`root`): `root/train/<class>/<image>` and `root/val/<class>/<image>` (torchvision
ImageFolder; class names are the training subfolders, in sorted order, as many as `num_classes`; a
validation class missing from training is an error; files that are not images, or not in a class
folder, are skipped with a warning naming them). Training uses timm's `create_transform`
(random-resized crop, flip, color jitter), validation and predict timm's eval transform (resize,
center crop `crop_pct`), both without normalization.

Images of more than 8 bits (16-bit, 32-bit integer or float: PIL modes I;16, I, F, all grayscale) keep
their real values (`zoo.data.segmentation.read_rgb`), the gray channel repeated to 3; the color jitter
acts on such an image's values mapped from its own [min, max] to [0, 1] and back (torchvision clips
float images to [0, 1]), where an 8-bit image's are clipped to [0, 255].

Batches hold raw images, float32 (8-bit images in [0, 255]): train/val {"image": (B, 3, S, S), "label":
(B,) int64}; predict {"image": (B, 3, S, S), "name": [str]}. `self.scaler` (a `zoo.scaling.InputScaler` of kind
`input_norm`) is fitted on training images in `setup`; the model applies it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import ColorJitter

from zoo.data.contract import DataInfo, ZooDataModule
from zoo.data.sampling import EpochSampler, seeded_generator, seeded_item, split_item, training_seed
from zoo.data.segmentation import IMAGE_SUFFIXES, PredictImages, list_images, read_rgb, warn_skipped
from zoo.scaling import SCALER_KINDS, InputScaler

__all__ = ["SHAPES", "TEXTURES", "shape_class_names", "make_shapes", "ShapesDataset",
           "FolderImages", "PredictImages", "ImagesDataModule"]

SHAPES = ("disk", "square", "triangle", "cross")
TEXTURES = ("solid", "stripes", "checker")
MAX_CLASSES = len(SHAPES) * len(TEXTURES)
_SPLITS = {"train": 0, "val": 1, "test": 2}
_AUGMENT = 3  # seed stream of the training augmentation, apart from the splits' streams


def shape_class_names(num_classes: int) -> list[str]:
    """["disk/solid", "square/solid", ...]: class k is shape k % 4 with texture k // 4."""
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes={num_classes} must be in 2..{MAX_CLASSES} for the built-in shapes data")
    return [f"{SHAPES[k % len(SHAPES)]}/{TEXTURES[k // len(SHAPES)]}" for k in range(num_classes)]


def _shape_distance(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance-like field in units of the radius (< 0 inside) of a shape of radius 1."""
    if shape == "disk":
        return torch.sqrt(u**2 + v**2) - 1
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) - 0.8
    if shape == "triangle":  # equilateral, circumradius 1: three half-planes at distance 0.5
        sides = [u * math.cos(a) + v * math.sin(a) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
        return torch.stack(sides).amax(0) - 0.5
    bar1 = torch.maximum(u.abs() - 1, v.abs() - 0.33)
    bar2 = torch.maximum(v.abs() - 1, u.abs() - 0.33)
    return torch.minimum(bar1, bar2)


def _draw(index: int, size: int, seed) -> tuple[torch.Tensor, torch.Tensor]:
    """The random draws of image `index`: (16,) parameters and (3, size, size) noise."""
    g = seeded_generator(seed, index)
    p = torch.rand(16, generator=g)
    return p, 0.03 * torch.randn(3, size, size, generator=g)


def _render(labels: torch.Tensor, params: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Images (n, 3, S, S) uint8 from labels (n,), parameters (n, 16) in [0, 1) and noise (n, 3, S, S)."""
    n, size = len(labels), noise.shape[-1]
    col = lambda i: params[:, i, None, None]  # noqa: E731  (n, 1, 1)
    radius = (0.18 + 0.14 * col(0)) * size
    cy, cx = radius + (size - 2 * radius) * col(1), radius + (size - 2 * radius) * col(2)
    angle, stripe_angle = 2 * math.pi * col(3), 2 * math.pi * col(4)
    period = size / (6 + 6 * col(5))
    c0 = params[:, 6:9]
    c1 = (c0 + 0.3 + 0.4 * params[:, 9:12]) % 1
    c2 = (c1 + 0.3 + 0.4 * params[:, 12:15]) % 1

    coords = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = coords[None, :, None], coords[None, None, :]
    dy, dx = y - cy, x - cx
    u = (dx * angle.cos() + dy * angle.sin()) / radius
    v = (-dx * angle.sin() + dy * angle.cos()) / radius
    dist = torch.empty(n, size, size)
    shape_of = labels % len(SHAPES)
    for k, shape in enumerate(SHAPES):
        m = shape_of == k
        if m.any():
            dist[m] = _shape_distance(shape, u[m], v[m])
    cover = (0.5 - dist * radius).clamp(0, 1)  # 1 px anti-aliased edge
    phase = (x * stripe_angle.cos() + y * stripe_angle.sin()) * (2 * math.pi / period)
    phase2 = (-x * stripe_angle.sin() + y * stripe_angle.cos()) * (2 * math.pi / period)
    texture_of = (labels // len(SHAPES))[:, None, None]
    wave = torch.where(texture_of == 2, torch.sin(phase) * torch.sin(phase2), torch.sin(phase))
    second = torch.where(texture_of == 0, torch.zeros(()), (0.5 + 2 * wave).clamp(0, 1))[:, None]
    fg = c1[..., None, None] * (1 - second) + c2[..., None, None] * second
    img = c0[..., None, None] * (1 - cover[:, None]) + fg * cover[:, None] + noise
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def make_shapes(n: int, size: int, num_classes: int, seed: int = 0, split: str = "train", start: int = 0):
    """Images start..start+n-1 of a split: ((n, 3, size, size) uint8, (n,) int64 labels). Image i
    depends only on (seed, split, i, size, num_classes)."""
    if split not in _SPLITS:
        raise ValueError(f"split {split!r} is not one of {tuple(_SPLITS)}")
    shape_class_names(num_classes)
    labels = torch.arange(start, start + n) % num_classes
    images = []
    for lo in range(0, n, 256):  # rendered in blocks to bound memory
        draws = [_draw(start + i, size, [seed, _SPLITS[split]]) for i in range(lo, min(n, lo + 256))]
        images.append(_render(labels[lo:lo + 256], torch.stack([p for p, _ in draws]),
                              torch.stack([z for _, z in draws])))
    return torch.cat(images), labels


class ShapesDataset(Dataset):
    """In-memory images (N, 3, S, S) uint8 and labels; items {"image": (3, S, S) float32, "label"},
    indexed by i or (epoch, i) (`EpochSampler`). With `hflip`, each item is mirrored left-right with
    probability 1/2 (flips keep the class), drawn from a generator seeded by (seed, epoch, i)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, hflip: bool = False, seed: int = 0):
        self.images, self.labels, self.hflip, self.seed = images, labels, hflip, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item) -> dict:
        epoch, i = split_item(item)
        img = self.images[i].float()
        if self.hflip and torch.rand((), generator=seeded_generator([self.seed, _AUGMENT, epoch], i)) < 0.5:
            img = img.flip(-1)
        return {"image": img, "label": self.labels[i]}


class _JitterInRange:
    """A ColorJitter that takes float tensors of any range too (images of more than 8 bits): torchvision
    clips float images to [0, 1], so the image's own [min, max] is mapped to [0, 1] and back around it."""

    def __init__(self, jitter: ColorJitter):
        self.jitter = jitter

    def __call__(self, img):
        if not isinstance(img, torch.Tensor):
            return self.jitter(img)
        lo, hi = img.min(), img.max()
        span = (hi - lo).clamp_min(1e-12)
        return self.jitter((img - lo) / span) * span + lo


class FolderImages(Dataset):
    """One ImageFolder split with the training split's classes; items {"image": (3, S, S) float32 (8-bit
    images in [0, 255]), "label"}, indexed by i or (epoch, i); the transform's random draws are seeded
    by (seed, epoch, i). Files it skips (not images, or not in a class folder) are named in a warning."""

    def __init__(self, folder: Path, classes: list[str], transform, seed: int = 0):
        self.seed = seed
        not_images = []

        def is_image(path: str) -> bool:
            if path.lower().endswith(IMAGE_SUFFIXES):
                return True
            if not Path(path).name.startswith("."):
                not_images.append(str(Path(path).relative_to(folder)))
            return False

        self.folder = ImageFolder(str(folder), transform=transform, loader=read_rgb, is_valid_file=is_image,
                                  allow_empty=True)
        warn_skipped(folder, sorted(not_images), f"that are not images ({', '.join(IMAGE_SUFFIXES)})")
        loose = [p.name for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")]
        warn_skipped(folder, sorted(loose), "that are not in a class folder")
        unknown = sorted(set(self.folder.classes) - set(classes))
        if unknown:
            raise ValueError(f"{folder} has class folders {unknown} that the training split lacks "
                             f"(training classes: {classes})")
        self.remap = torch.tensor([classes.index(c) for c in self.folder.classes], dtype=torch.long)
        if not len(self.folder):
            raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) in class subfolders")

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, item) -> dict:
        epoch, i = split_item(item)
        with seeded_item([self.seed, _AUGMENT, epoch], i):
            img, label = self.folder[i]
        return {"image": img.float(), "label": self.remap[label]}


CROP_PCT = 0.875  # timm's default evaluation crop (DEFAULT_CROP_PCT)


class ImagesDataModule(ZooDataModule):
    """Image classification data: built-in shapes (root=None) or an ImageFolder tree (module docstring).

    Args:
        root: folder with train/ and val/ class subfolders; None -> synthetic shapes and textures.
        input_norm: `zoo.scaling.InputScaler` kind fitted on training images in `setup` (`self.scaler`).
        image_size: S, the side of every image a batch holds (synthetic: generated at this size).
        num_classes: the classes: synthetic, 2..12; a folder's must equal its training class folders'
            count (checked in `setup`).
        num_train, num_val: synthetic split sizes.
        batch_size: training and validation batch size.
        augment: training augmentation: synthetic, random horizontal flips; folder, timm's train transform.
        crop_pct, interpolation: folder data's eval transform (resize to S / crop_pct, center crop S;
            crop_pct None: timm's 0.875); the synthetic data's image files (predict_dir) are only resized
            (`eval_crop_pct`), so crop_pct is refused there.
        scaler_images: number of training images the scaler is fitted on (evenly spaced; synthetic: all).
        seed: seed of the synthetic data; with the run's seed (`training_seed`), of the training order
            and augmentation.
        num_workers: DataLoader workers.
        predict_dir: folder of images to classify; None -> the validation images.
    """

    def __init__(self, root: str | None = None, input_norm: str = "zscore", image_size: int = 64,
                 num_classes: int = 8, num_train: int = 4000, num_val: int = 512, batch_size: int = 64,
                 augment: bool = True, crop_pct: float | None = None, interpolation: str = "bicubic",
                 scaler_images: int = 512, seed: int = 0, num_workers: int = 0, predict_dir: str | None = None):
        super().__init__()
        if input_norm not in SCALER_KINDS:
            raise ValueError(f"input_norm {input_norm!r} is not one of {SCALER_KINDS}")
        for name, value, least in (("image_size", image_size, 8), ("num_train", num_train, 1),
                                   ("num_val", num_val, 1), ("batch_size", batch_size, 1),
                                   ("scaler_images", scaler_images, 1), ("num_workers", num_workers, 0),
                                   ("seed", seed, 0)):
            if int(value) < least:
                raise ValueError(f"{name}={value} must be >= {least}")
        if crop_pct is not None and not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct={crop_pct} must be in (0, 1]")
        if root is None and crop_pct is not None:
            raise ValueError(f"crop_pct={crop_pct} is for folder data (root): the synthetic images are made at "
                             "image_size and never cropped, so image files given to them are only resized")
        if root is None:
            shape_class_names(num_classes)
        self.save_hyperparameters()
        self.scaler: InputScaler | None = None
        self.classes: list[str] | None = shape_class_names(num_classes) if root is None else None
        self.train_set = self.val_set = self.predict_set = None

    # ------------------------------------------------------------------ transforms

    def _transform(self, training: bool):
        hp = self.hparams
        if training:
            t = create_transform(hp.image_size, is_training=True, interpolation=hp.interpolation,
                                 normalize=False, no_aug=not hp.augment)
            t.transforms = [_JitterInRange(s) if isinstance(s, ColorJitter) else s for s in t.transforms]
            return t
        return create_transform(hp.image_size, is_training=False, interpolation=hp.interpolation,
                                crop_pct=self.eval_crop_pct(hp), normalize=False)

    @staticmethod
    def eval_crop_pct(init_args) -> float:
        """The center crop of the evaluation transform for these init args: `crop_pct` for folder data;
        1 (none) for the synthetic images, which the model saw uncropped at image_size, so that an
        image file of them is predicted as the validation image is."""
        return 1.0 if init_args.get("root") is None else init_args.get("crop_pct") or CROP_PCT

    # ------------------------------------------------------------------ setup

    def _folder(self, split: str) -> Path:
        folder = Path(self.hparams.root) / split
        if not folder.is_dir():
            raise ValueError(f"the {split} split folder {folder} does not exist (root={self.hparams.root})")
        return folder

    def _setup_train(self) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        if hp.root is None:
            images, labels = make_shapes(hp.num_train, hp.image_size, hp.num_classes, hp.seed, "train")
            self.train_set = ShapesDataset(images, labels, hflip=hp.augment, seed=training_seed(hp.seed))
            fit_on = [images.float()]
        else:
            folder = self._folder("train")
            self._class_names()
            self.train_set = FolderImages(folder, self.classes, self._transform(True), training_seed(hp.seed))
            plain = FolderImages(folder, self.classes, self._transform(False))
            picks = np.linspace(0, len(plain) - 1, min(hp.scaler_images, len(plain))).round().astype(int)
            fit_on = (plain[int(i)]["image"][None] for i in np.unique(picks))
        self.scaler = InputScaler(3, kind=hp.input_norm).fit(fit_on)

    def _setup_val(self) -> None:
        if self.val_set is not None:
            return
        hp = self.hparams
        if hp.root is None:
            images, labels = make_shapes(hp.num_val, hp.image_size, hp.num_classes, hp.seed, "val")
            self.val_set = ShapesDataset(images, labels)
        else:
            self._class_names()
            self.val_set = FolderImages(self._folder("val"), self.classes, self._transform(False))

    def info(self) -> DataInfo:
        return DataInfo(scaler=self.scaler, classes=self.classes)

    def _class_names(self) -> list[str]:
        if self.classes is None:
            folder, n = self._folder("train"), self.hparams.num_classes
            classes = ImageFolder(str(folder)).classes
            if len(classes) != n:
                raise ValueError(f"{folder} has {len(classes)} class folders ({', '.join(classes[:10])}"
                                 f"{', ...' if len(classes) > 10 else ''}) but num_classes={n}; pass "
                                 f"--data.num_classes {len(classes)}")
            self.classes = classes
        return self.classes

    def setup(self, stage: str | None = None) -> None:
        """fit: train (+ the scaler) and val; validate: val; predict: predict_dir or val."""
        if stage in (None, "fit"):
            self._setup_train()
        if stage in (None, "fit", "validate", "test"):
            self._setup_val()
        if stage in (None, "predict"):
            self._setup_predict()

    def _setup_predict(self) -> None:
        if self.predict_set is not None:
            return
        d = self.hparams.predict_dir
        if d is None:
            self._setup_val()
            if isinstance(self.val_set, ShapesDataset):
                names = [f"shapes_val_{i:05d}" for i in range(len(self.val_set))]
                self.predict_set = PredictImages(names, images=self.val_set.images)
            else:
                files = [Path(p) for p, _ in self.val_set.folder.samples]
                self.predict_set = PredictImages([f.name for f in files], files=files, transform=self._transform(False))
            return
        files = list_images(Path(d), "predict_dir")
        if not files:
            raise ValueError(f"predict_dir {d} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        paths = [files[s] for s in sorted(files)]
        self.predict_set = PredictImages([p.name for p in paths], files=paths, transform=self._transform(False))

    # ------------------------------------------------------------------ loaders

    def _loader(self, dataset, train: bool) -> DataLoader:
        w, bs = self.hparams.num_workers, self.hparams.batch_size
        sampler = EpochSampler.for_training(self, len(dataset), training_seed(self.hparams.seed), bs) if train else None
        # training drops a last short batch: a batch of one would break batch norm
        return DataLoader(dataset, batch_size=bs, sampler=sampler, num_workers=w, persistent_workers=w > 0,
                          drop_last=train and len(dataset) > bs)

    def train_dataloader(self) -> DataLoader:
        self._setup_train()
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        self._setup_val()
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        self._setup_predict()
        return self._loader(self.predict_set, train=False)
