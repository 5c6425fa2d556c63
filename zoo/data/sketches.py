"""Sketch data for Sketch-RNN: the published QuickDraw `.npz` files (downloaded by category name, or
local files), built-in pen strokes (Hershey font glyphs from the installed `hershey-fonts` wheel, and
a deterministic generator of simple drawings), stroke formats, augmentation, writers (.npz, SVG, PNG)
and `SketchDataModule`.

Formats:
    stroke-3  (L, 3) rows [dx, dy, pen_lifted]: offsets from the previous point (the first from the
              origin); pen_lifted = 1 on the last point of each stroke (and of the sketch).
    stroke-5  (B, N + 1, 5) rows [dx, dy, p1, p2, p3]: row 0 is S0 = (0, 0, 1, 0, 0); point rows have
              p2 = pen_lifted, p1 = 1 - p2; every row after a sketch has p3 = 1 (end of sketch).

A sketch-rnn `.npz` holds `train`, `valid` and `test`, each a 1-D object array of int16 stroke-3
arrays (QuickDraw classes: 70000 / 2500 / 2500), pickled by Python 2. `read_npz` unpickles them
with an unpickler that can build numpy arrays and dtypes and nothing else, so a crafted file cannot
run code. Several files are several classes.

The published files are `<QUICKDRAW_URL>/<category>.npz`, one per QuickDraw category (the 345 names
of the quickdraw-dataset's categories.txt, `QUICKDRAW_CATEGORIES`); `quickdraw_files` fetches them
into a cache through `zoo.data.download` (resumed, locked, sha256 recorded and checked on reuse).
The dataset states no checksums for them, so the first download is trusted and later changes are caught.

Preprocessing as magenta's sketch_rnn: offsets clamped to +-1000 (with a warning counting them),
sketches longer than `max_seq_len` dropped (with a warning counting them), one scale factor = the
standard deviation of all dx and dy of the training split. Batches carry raw offsets (the design
contract: data flows out unscaled); the model divides by the scale factor it stores in its checkpoint.
"""
from __future__ import annotations

import difflib
import logging
import math
import pickle
import urllib.parse
import zipfile
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from zoo.data.contract import DataInfo, ZooDataModule
from zoo.data.download import cache_dir, download
from zoo.data.sampling import EpochSampler, split_item, training_seed

__all__ = ["SPLITS", "SketchSet", "read_npz", "write_npz", "load_sketch_files", "QUICKDRAW_URL",
           "QUICKDRAW_CATEGORIES", "check_categories", "quickdraw_files", "preprocess", "scale_factor",
           "polylines_to_stroke3", "stroke3_to_polylines", "stroke3_to_stroke5", "stroke5_to_stroke3",
           "random_scale", "augment_strokes", "hershey_sketches", "HERSHEY_CLASSES", "synthetic_sketches",
           "SYNTHETIC_CLASSES", "render_sketches", "sketches_to_svg", "SketchDataset",
           "SketchDataModule"]

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
_SPLIT_NAMES = {"train": "training", "valid": "validation ('valid')", "test": "test"}
CLAMP = 1000  # magenta's DataLoader limit on |offset|


# --------------------------------------------------------------------------------------------- #
# Reading and writing sketch-rnn .npz files
# --------------------------------------------------------------------------------------------- #

def _check_record(seq, where: str) -> np.ndarray:
    """One stroke-3 record -> float32 (L, 3); ValueError naming `where` if it is malformed."""
    if not isinstance(seq, np.ndarray) or seq.dtype == object:
        raise ValueError(f"{where}: expected a numeric (L, 3) array of [dx, dy, pen_lifted], got "
                         f"{type(seq).__name__}{'' if not isinstance(seq, np.ndarray) else ' of objects'}")
    if seq.ndim != 2 or seq.shape[1] != 3:
        raise ValueError(f"{where}: expected an (L, 3) array of [dx, dy, pen_lifted], got shape {seq.shape}")
    if seq.shape[0] == 0:
        raise ValueError(f"{where}: the sketch has no points (shape {seq.shape})")
    if seq.dtype.kind not in "iuf":
        raise ValueError(f"{where}: expected numbers, got dtype {seq.dtype}")
    out = seq.astype(np.float32)
    if not np.isfinite(out).all():
        bad = int(np.argwhere(~np.isfinite(out))[0, 0])
        raise ValueError(f"{where}: row {bad} holds NaN or inf: {seq[bad].tolist()}")
    pen = out[:, 2]
    if not np.isin(pen, (0.0, 1.0)).all():
        bad = int(np.argwhere(~np.isin(pen, (0.0, 1.0)))[0, 0])
        raise ValueError(f"{where}: row {bad} has pen_lifted = {seq[bad, 2]}; it must be 0 or 1")
    return out


def _records(arr, where: str) -> list:
    if isinstance(arr, np.ndarray) and arr.dtype == object and arr.ndim == 1:
        return list(arr)
    if isinstance(arr, np.ndarray) and arr.dtype != object and arr.ndim == 3:
        return list(arr)  # equal-length sketches that numpy stacked into one (n, L, 3) array
    shape = getattr(arr, "shape", None)
    raise ValueError(f"{where}: expected a 1-D object array of (L, 3) stroke-3 sketches, got "
                     f"{type(arr).__name__} with shape {shape} and dtype {getattr(arr, 'dtype', None)}")


# What a pickled object array of int16 arrays references: numpy 1.x writes numpy.core.multiarray,
# numpy 2.x numpy._core.multiarray; Python 3 protocol-2 pickles spell bytes as _codecs.encode(s, "latin1").
_reconstruct = np.empty(0).__reduce__()[0]  # numpy's array-unpickling function, whatever its module


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    if encoding != "latin1":  # the only encoding pickle uses for bytes
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
}


class _Refused(ValueError):
    """A sketch file whose pickle names something other than numpy's array machinery."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays only: any other global (a function, a class) is refused, so nothing in the
    file is ever called. `where` names the file and member in the error."""

    def __init__(self, file, where: str):
        super().__init__(file, encoding="latin1")  # Python 2 str (the array bytes) -> latin1 str
        self.where = where

    def find_class(self, module, name):
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"{self.where} pickles {module + '.' + name!r}, which is not a numpy array; "
                           "refused (only arrays of numbers are read)") from None


def _read_npy(fp, where: str) -> np.ndarray:
    """One .npy member -> array. Numeric arrays are read as numpy does with pickles disallowed; object
    arrays go through `_ArrayUnpickler` and must come out as object arrays of numeric arrays."""
    fmt = np.lib.format
    header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(fmt.read_magic(fp))
    if header is None or not header(fp)[2].hasobject:
        fp.seek(0)  # numbers only (or a newer header version, which numpy reads without pickle)
        return fmt.read_array(fp, allow_pickle=False)
    arr = _ArrayUnpickler(fp, where).load()
    if type(arr) is not np.ndarray or arr.dtype != object:
        raise _Refused(f"{where} holds a pickled {type(arr).__name__}, not an array of sketches; refused")
    for i, item in enumerate(arr.flat):
        if type(item) is not np.ndarray or item.dtype.kind not in "biufc":
            raise _Refused(f"{where} element {i} is {type(item).__name__}"
                           f"{' of ' + str(item.dtype) if isinstance(item, np.ndarray) else ''}, "
                           "not an array of numbers; refused")
    return arr


def read_npz(path: Union[str, Path], splits: Sequence[str] = SPLITS) -> dict[str, list[np.ndarray]]:
    """A sketch-rnn .npz -> {split: [float32 (L, 3) stroke-3 arrays]}. Raises ValueError naming the
    file (and split and record) when it cannot be read, lacks a split, holds a malformed sketch, or
    pickles anything but numpy arrays of numbers (nothing in the file is run)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"sketch file {str(path)!r} is a folder; expected a sketch-rnn .npz file")
    if not path.is_file():
        raise FileNotFoundError(f"sketch file {str(path)!r} does not exist")
    with path.open("rb") as f:
        if f.read(6) == b"\x93NUMPY":
            raise ValueError(f"{str(path)!r} is a single .npy array, not a sketch-rnn .npz with {', '.join(splits)}")
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"cannot read {str(path)!r} as a sketch-rnn .npz: {type(e).__name__}: {e}") from None
    with zf:
        members = {n[:-len(".npy")] if n.endswith(".npy") else n: n for n in zf.namelist()}
        missing = [s for s in splits if s not in members]
        if missing:
            raise ValueError(f"{str(path)!r} lacks the split(s) {missing}; found {sorted(members)}, "
                             f"a sketch-rnn .npz holds {', '.join(SPLITS)}")
        out = {}
        for split in splits:
            try:
                with zf.open(members[split]) as fp:
                    arr = _read_npy(fp, f"sketch file {str(path)!r} member {split!r}")
            except _Refused:
                raise
            except Exception as e:  # noqa: BLE001 - numpy and zipfile raise many kinds for corrupt members
                raise ValueError(f"cannot read split {split!r} of {str(path)!r}: {type(e).__name__}: {e}") from None
            records = _records(arr, f"{path}, split {split!r}")
            out[split] = [_check_record(seq, f"{path}, split {split!r}, record {i}") for i, seq in enumerate(records)]
    return out


def write_npz(path: Union[str, Path], splits: dict[str, Sequence[np.ndarray]]) -> Path:
    """Writes {split: [stroke-3 arrays]} as a sketch-rnn .npz (int16 object arrays, compressed).

    Offsets must be integers within int16, as the published files; ValueError otherwise."""
    path = Path(path)
    arrays = {}
    for split, seqs in splits.items():
        a = np.empty(len(seqs), dtype=object)  # np.array(list) would stack equal-length sketches into 3-D
        for i, seq in enumerate(seqs):
            seq = np.asarray(seq)
            _check_record(seq, f"split {split!r}, record {i}")
            if not np.array_equal(seq, np.rint(seq)) or np.abs(seq).max() > np.iinfo(np.int16).max:
                raise ValueError(f"split {split!r}, record {i}: offsets must be integers within int16 to write "
                                 "a sketch-rnn .npz; round or rescale them first")
            a[i] = seq.astype(np.int16)
        arrays[split] = a
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


class SketchSet:
    """Sketches of one split: `sketches` (float32 stroke-3 arrays) and `labels` (class index each)."""

    def __init__(self, sketches: list[np.ndarray], labels: list[int]):
        self.sketches, self.labels = sketches, labels

    def __len__(self) -> int:
        return len(self.sketches)

    def lengths(self) -> np.ndarray:
        return np.array([len(s) for s in self.sketches], dtype=np.int64)


def load_sketch_files(paths: Sequence[Union[str, Path]]) -> tuple[dict[str, SketchSet], list[str]]:
    """One .npz per class -> ({split: SketchSet}, class names (file stems)). ValueError for a file
    listed twice or two files with the same stem (two classes of one name)."""
    stems: dict[str, Path] = {}
    for path in map(Path, paths):
        if path.stem in stems:
            first = stems[path.stem]
            raise ValueError(f"sketch file {str(path)!r} is listed twice" if path.resolve() == first.resolve() else
                             f"sketch files {str(first)!r} and {str(path)!r} would both be class {path.stem!r} "
                             "(a class is named by its file's stem); rename one")
        stems[path.stem] = path
    sets = {s: SketchSet([], []) for s in SPLITS}
    names = []
    for k, path in enumerate(paths):
        data = read_npz(path)
        names.append(Path(path).stem)
        for split in SPLITS:
            sets[split].sketches += data[split]
            sets[split].labels += [k] * len(data[split])
    return sets, names


# The sketch-rnn files of the quickdraw-dataset README ("Sketch-RNN QuickDraw Dataset"): the public
# bucket gs://quickdraw_dataset/sketchrnn/ over HTTPS. `<category>.full.npz` beside them hold every
# drawing of a category, not read here.
QUICKDRAW_URL = "https://storage.googleapis.com/quickdraw_dataset/sketchrnn"
QUICKDRAW_CATEGORIES = tuple(name.strip() for name in """
    aircraft carrier, airplane, alarm clock, ambulance, angel, animal migration, ant, anvil, apple, arm,
    asparagus, axe, backpack, banana, bandage, barn, baseball, baseball bat, basket, basketball, bat,
    bathtub, beach, bear, beard, bed, bee, belt, bench, bicycle, binoculars, bird, birthday cake,
    blackberry, blueberry, book, boomerang, bottlecap, bowtie, bracelet, brain, bread, bridge, broccoli,
    broom, bucket, bulldozer, bus, bush, butterfly, cactus, cake, calculator, calendar, camel, camera,
    camouflage, campfire, candle, cannon, canoe, car, carrot, castle, cat, ceiling fan, cello, cell phone,
    chair, chandelier, church, circle, clarinet, clock, cloud, coffee cup, compass, computer, cookie,
    cooler, couch, cow, crab, crayon, crocodile, crown, cruise ship, cup, diamond, dishwasher, diving board,
    dog, dolphin, donut, door, dragon, dresser, drill, drums, duck, dumbbell, ear, elbow, elephant,
    envelope, eraser, eye, eyeglasses, face, fan, feather, fence, finger, fire hydrant, fireplace,
    firetruck, fish, flamingo, flashlight, flip flops, floor lamp, flower, flying saucer, foot, fork, frog,
    frying pan, garden, garden hose, giraffe, goatee, golf club, grapes, grass, guitar, hamburger, hammer,
    hand, harp, hat, headphones, hedgehog, helicopter, helmet, hexagon, hockey puck, hockey stick, horse,
    hospital, hot air balloon, hot dog, hot tub, hourglass, house, house plant, hurricane, ice cream,
    jacket, jail, kangaroo, key, keyboard, knee, knife, ladder, lantern, laptop, leaf, leg, light bulb,
    lighter, lighthouse, lightning, line, lion, lipstick, lobster, lollipop, mailbox, map, marker, matches,
    megaphone, mermaid, microphone, microwave, monkey, moon, mosquito, motorbike, mountain, mouse,
    moustache, mouth, mug, mushroom, nail, necklace, nose, ocean, octagon, octopus, onion, oven, owl,
    paintbrush, paint can, palm tree, panda, pants, paper clip, parachute, parrot, passport, peanut, pear,
    peas, pencil, penguin, piano, pickup truck, picture frame, pig, pillow, pineapple, pizza, pliers,
    police car, pond, pool, popsicle, postcard, potato, power outlet, purse, rabbit, raccoon, radio, rain,
    rainbow, rake, remote control, rhinoceros, rifle, river, roller coaster, rollerskates, sailboat,
    sandwich, saw, saxophone, school bus, scissors, scorpion, screwdriver, sea turtle, see saw, shark,
    sheep, shoe, shorts, shovel, sink, skateboard, skull, skyscraper, sleeping bag, smiley face, snail,
    snake, snorkel, snowflake, snowman, soccer ball, sock, speedboat, spider, spoon, spreadsheet, square,
    squiggle, squirrel, stairs, star, steak, stereo, stethoscope, stitches, stop sign, stove, strawberry,
    streetlight, string bean, submarine, suitcase, sun, swan, sweater, swing set, sword, syringe, table,
    teapot, teddy-bear, telephone, television, tennis racquet, tent, The Eiffel Tower,
    The Great Wall of China, The Mona Lisa, tiger, toaster, toe, toilet, tooth, toothbrush, toothpaste,
    tornado, tractor, traffic light, train, tree, triangle, trombone, truck, trumpet, t-shirt, umbrella,
    underwear, van, vase, violin, washing machine, watermelon, waterslide, whale, wheel, windmill,
    wine bottle, wine glass, wristwatch, yoga, zebra, zigzag
""".split(","))  # categories.txt of github.com/googlecreativelab/quickdraw-dataset


def check_categories(categories: Union[str, Sequence[str]]) -> list[str]:
    """"cat,bus" or ["cat", "bus"] -> ["cat", "bus"]; ValueError (one line) for an empty list, a name
    listed twice or one that is not a QuickDraw category (with the closest names)."""
    names = [c.strip() for c in categories.split(",")] if isinstance(categories, str) else list(categories)
    if not names or not all(names):
        raise ValueError(f"categories={categories!r}: expected QuickDraw category names, e.g. 'cat,bus'")
    for name in names:
        if name not in QUICKDRAW_CATEGORIES:
            close = difflib.get_close_matches(name, QUICKDRAW_CATEGORIES, n=5, cutoff=0.5)
            raise ValueError(f"unknown QuickDraw category {name!r}; "
                             f"{'closest: ' + ', '.join(close) if close else 'no close name'} "
                             f"(all {len(QUICKDRAW_CATEGORIES)}: zoo.data.sketches.QUICKDRAW_CATEGORIES)")
        if names.count(name) > 1:
            raise ValueError(f"QuickDraw category {name!r} is listed twice in categories={categories!r}")
    return names


def quickdraw_files(categories: Union[str, Sequence[str]], folder: Optional[Union[str, Path]] = None,
                    base_url: str = QUICKDRAW_URL) -> list[Path]:
    """The sketch-rnn .npz of each category (`check_categories`), downloaded from `base_url` into
    `folder` (default `cache_dir("quickdraw")`: $ZOO_CACHE/quickdraw or ~/.cache/zoo/quickdraw) unless
    already there with the recorded sha256; see `zoo.data.download.download` for what it raises."""
    folder = Path(folder).expanduser() if folder else cache_dir("quickdraw")
    paths = []
    for name in check_categories(categories):
        url = f"{base_url.rstrip('/')}/{urllib.parse.quote(name)}.npz"  # names hold spaces
        try:
            paths.append(download(url, folder / f"{name}.npz"))
        except PermissionError as e:
            raise PermissionError(f"{e}; choose another with --data.cache_dir DIR (cache_dir=) or the ZOO_CACHE "
                                  "environment variable") from None
    return paths


def preprocess(sets: dict[str, SketchSet], max_seq_len: int) -> dict[str, dict[str, int]]:
    """In place, as magenta's DataLoader: clamp offsets to +-1000, drop sketches longer than
    `max_seq_len`. Warns with the counts; returns {split: {"dropped": n, "clamped": n}}."""
    report = {}
    for split, s in sets.items():
        keep = [i for i, seq in enumerate(s.sketches) if len(seq) <= max_seq_len]
        dropped = len(s) - len(keep)
        clamped = 0
        sketches = []
        for i in keep:
            seq = s.sketches[i]
            over = np.abs(seq[:, :2]) > CLAMP
            if over.any():
                clamped += int(over.sum())
                seq = seq.copy()
                seq[:, :2] = np.clip(seq[:, :2], -CLAMP, CLAMP)
            sketches.append(seq)
        s.sketches, s.labels = sketches, [s.labels[i] for i in keep]
        if dropped:
            log.warning("%s: dropped %d of %d sketches longer than max_seq_len=%d points", split, dropped,
                        dropped + len(keep), max_seq_len)
        if clamped:
            log.warning("%s: clamped %d offsets to +-%d", split, clamped, CLAMP)
        report[split] = {"dropped": dropped, "clamped": clamped}
    return report


def scale_factor(sketches: Sequence[np.ndarray]) -> float:
    """The standard deviation of all dx and dy together (magenta's normalizing scale factor)."""
    if not sketches:
        raise ValueError("cannot compute the scale factor of an empty training split")
    offsets = np.concatenate([s[:, :2].reshape(-1) for s in sketches]).astype(np.float64)
    std = float(offsets.std())
    if not std > 0:
        raise ValueError("all training offsets are equal (std 0); the sketches cannot be normalized")
    return std


# --------------------------------------------------------------------------------------------- #
# Formats
# --------------------------------------------------------------------------------------------- #

def polylines_to_stroke3(polylines: Sequence[np.ndarray], origin=(0.0, 0.0)) -> np.ndarray:
    """Pen-down polylines [(n_i, 2) absolute points] -> int16 stroke-3 (positions rounded first, so
    rounding errors do not accumulate). The first offset is from `origin`."""
    pts, lifts = [], []
    for line in polylines:
        line = np.asarray(line, dtype=np.float64).reshape(-1, 2)
        if len(line) == 0:
            continue
        pts.append(line)
        lift = np.zeros(len(line))
        lift[-1] = 1
        lifts.append(lift)
    if not pts:
        raise ValueError("a sketch needs at least one point")
    absolute = np.rint(np.concatenate(pts))
    offsets = np.diff(absolute, axis=0, prepend=np.rint(np.asarray(origin, dtype=np.float64))[None])
    return np.concatenate([offsets, np.concatenate(lifts)[:, None]], 1).astype(np.int16)


def stroke3_to_polylines(seq: np.ndarray) -> list[np.ndarray]:
    """stroke-3 -> pen-down polylines of absolute points (float64)."""
    seq = np.asarray(seq, dtype=np.float64)
    absolute = np.cumsum(seq[:, :2], 0)
    ends = np.flatnonzero(seq[:, 2] > 0.5) + 1
    lines = np.split(absolute, ends)
    return [line for line in lines if len(line)]


def stroke3_to_stroke5(sketches: Sequence[np.ndarray], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[(L_i, 3)] -> stroke-5 batch (B, steps + 1, 5) float32 with S0 first, and lengths (B,).

    `steps` must exceed every L_i, so every sketch has at least one end-of-sketch row."""
    B = len(sketches)
    lengths = torch.tensor([len(s) for s in sketches], dtype=torch.long)
    if B and int(lengths.max()) >= steps:
        raise ValueError(f"a sketch of {int(lengths.max())} points does not fit {steps} steps with its end token")
    out = torch.zeros(B, steps + 1, 5)
    out[:, 0, 2] = 1
    for i, s in enumerate(sketches):
        n = len(s)
        s = torch.as_tensor(np.asarray(s, dtype=np.float32))
        out[i, 1:n + 1, :2] = s[:, :2]
        out[i, 1:n + 1, 3] = s[:, 2]
        out[i, 1:n + 1, 2] = 1 - s[:, 2]
        out[i, n + 1:, 4] = 1
    return out, lengths


def stroke5_to_stroke3(points: torch.Tensor, lengths: torch.Tensor) -> list[np.ndarray]:
    """Point rows (B, L, 5) (no S0 row) and lengths (B,) -> [float32 (length_i, 3) stroke-3]."""
    pts = points.detach().float().cpu().numpy()
    out = []
    for p, n in zip(pts, lengths.tolist()):
        out.append(np.concatenate([p[:n, :2], p[:n, 3:4]], 1).astype(np.float32))
    return out


# --------------------------------------------------------------------------------------------- #
# Augmentation (magenta's random_scale and augment_strokes)
# --------------------------------------------------------------------------------------------- #

def random_scale(seq: np.ndarray, random_scale_factor: float, rng: np.random.Generator) -> np.ndarray:
    """Scale dx and dy by independent factors from U[1 - f, 1 + f]."""
    sx, sy = (rng.random(2) - 0.5) * 2 * random_scale_factor + 1.0
    out = seq.copy()
    out[:, 0] *= sx
    out[:, 1] *= sy
    return out


def augment_strokes(seq: np.ndarray, prob: float, u: Optional[np.ndarray] = None,
                    rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """magenta's augment_strokes, vectorized: each pen-down point that is at least the 4th point of its
    stroke (and not the stroke's last) is merged, with probability `prob`, into the previous kept point
    (their offsets add, so the drawing keeps its end points). `u` (L,) are the uniform draws (one per
    point, as the official loop); otherwise drawn from `rng`."""
    if prob <= 0 or len(seq) < 4:
        return seq
    if u is None:
        u = rng.random(len(seq))
    lift = seq[:, 2] > 0.5
    idx = np.arange(len(seq))
    # first point after each lift (or 0): the official count restarts there
    starts = np.where(np.concatenate([[True], lift[:-1]]), idx, 0)
    count = idx - np.maximum.accumulate(starts)
    drop = ~lift & (count > 2) & (u < prob)
    if not drop.any():
        return seq
    group = np.cumsum(~drop) - 1  # index of the kept point each row merges into
    out = np.zeros((int(group[-1]) + 1, 3), dtype=seq.dtype)
    np.add.at(out[:, 0], group, seq[:, 0])
    np.add.at(out[:, 1], group, seq[:, 1])
    out[:, 2] = seq[~drop, 2]
    return out


# --------------------------------------------------------------------------------------------- #
# Built-in data
# --------------------------------------------------------------------------------------------- #

HERSHEY_CLASSES = ("futural", "greek", "cyrillic", "japanese")


def hershey_sketches(fonts: Sequence[str] = HERSHEY_CLASSES, unit: float = 4.0) -> dict[str, list[np.ndarray]]:
    """Glyphs of the Hershey vector fonts shipped in the `hershey-fonts` wheel as int16 stroke-3
    sketches: {font: [glyph sketch]}, one class per character set (font). Each glyph's pen-down
    polylines are scaled by `unit` (font units -> QuickDraw-like pixels); the first offset is from the
    glyph's origin. Glyphs without strokes (the space) are left out."""
    from HersheyFonts import HersheyFonts

    h = HersheyFonts()
    available = h.default_font_names
    out = {}
    for font in fonts:
        if font not in available:
            raise ValueError(f"unknown Hershey font {font!r}; available: {', '.join(available)}")
        h.load_default_font(font)
        glyphs = h.all_glyphs
        sketches = []
        for key in sorted(glyphs):
            lines = [np.asarray(s, dtype=np.float64) * unit for s in glyphs[key].strokes if len(s)]
            if lines:
                sketches.append(polylines_to_stroke3(lines))
        out[font] = sketches
    return out


SYNTHETIC_CLASSES = ("circle", "square", "triangle", "zigzag", "spiral", "star", "cross", "house")


def _polygon(rng, corners: np.ndarray, per_side: int) -> np.ndarray:
    pts = []
    for a, b in zip(corners, np.roll(corners, -1, 0)):
        t = np.linspace(0, 1, per_side, endpoint=False)[:, None]
        pts.append(a + t * (b - a))
    pts.append(corners[:1])
    return np.concatenate(pts)


def _synthetic_drawing(name: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Pen-down polylines (absolute, centred near 0, ~100 px) of one drawing of class `name`."""
    size = rng.uniform(35, 60)
    if name == "circle":
        n = int(rng.integers(12, 25))
        a = rng.uniform(0, 2 * np.pi) + np.linspace(0, 2 * np.pi, n + 1)
        lines = [np.stack([np.cos(a) * size, np.sin(a) * size * rng.uniform(0.7, 1.1)], 1)]
    elif name in ("square", "triangle", "star"):
        k = {"square": 4, "triangle": 3, "star": 10}[name]
        a = rng.uniform(-0.3, 0.3) + np.arange(k) * 2 * np.pi / k - np.pi / 2
        r = np.full(k, size) if name != "star" else np.where(np.arange(k) % 2 == 0, size, size * 0.45)
        corners = np.stack([np.cos(a) * r, np.sin(a) * r], 1)
        lines = [_polygon(rng, corners, int(rng.integers(1, 4)) if name != "star" else 1)]
    elif name == "zigzag":
        teeth = int(rng.integers(3, 8))
        x = np.linspace(-size, size, 2 * teeth + 1)
        y = np.where(np.arange(2 * teeth + 1) % 2 == 0, -1, 1) * size * rng.uniform(0.2, 0.5)
        lines = [np.stack([x, y], 1)]
    elif name == "spiral":
        turns = rng.uniform(1.5, 3)
        a = np.linspace(0, turns * 2 * np.pi, int(turns * 12))
        r = size * a / a[-1]
        lines = [np.stack([np.cos(a) * r, np.sin(a) * r], 1)]
    elif name == "cross":
        w = size * rng.uniform(0.6, 1.0)
        lines = [np.array([[-w, -w], [0, 0], [w, w]]), np.array([[w, -w], [0, 0], [-w, w]])]
    elif name == "house":
        w, hgt = size * rng.uniform(0.6, 0.9), size * rng.uniform(0.5, 0.8)
        body = np.array([[-w, -hgt / 2], [-w, hgt], [w, hgt], [w, -hgt / 2], [-w, -hgt / 2]])
        roof = np.array([[-w, -hgt / 2], [0, -hgt / 2 - size * rng.uniform(0.4, 0.8)], [w, -hgt / 2]])
        lines = [body, roof]
    else:
        raise ValueError(f"unknown synthetic class {name!r}; available: {', '.join(SYNTHETIC_CLASSES)}")
    return [line + rng.normal(0, 1.5, line.shape) for line in lines]


def synthetic_sketches(num_per_class: int, classes: Sequence[str] = SYNTHETIC_CLASSES,
                       seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Deterministic pen-drawn sketches (int16 stroke-3): {class: [num_per_class sketches]}, each with
    random size, rotation, point count and jitter drawn from a generator seeded by (seed, class)."""
    out = {}
    for k, name in enumerate(classes):
        if name not in SYNTHETIC_CLASSES:
            raise ValueError(f"unknown synthetic class {name!r}; available: {', '.join(SYNTHETIC_CLASSES)}")
        rng = np.random.default_rng([seed, SYNTHETIC_CLASSES.index(name)])
        out[name] = [polylines_to_stroke3(_synthetic_drawing(name, rng)) for _ in range(num_per_class)]
    return out


def _split_classes(per_class: dict[str, list[np.ndarray]], seed: int = 0) -> tuple[dict[str, SketchSet], list[str]]:
    """{class: sketches} -> fixed 80 / 10 / 10 % train / valid / test split per class (at least one
    sketch in valid and test)."""
    sets = {s: SketchSet([], []) for s in SPLITS}
    for k, (name, sketches) in enumerate(per_class.items()):
        if len(sketches) < 3:
            raise ValueError(f"class {name!r} has {len(sketches)} sketches; a split needs at least 3")
        order = np.random.default_rng([seed, k]).permutation(len(sketches))
        n_eval = max(1, len(sketches) // 10)
        parts = {"valid": order[:n_eval], "test": order[n_eval:2 * n_eval], "train": order[2 * n_eval:]}
        for split, idx in parts.items():
            sets[split].sketches += [sketches[i].astype(np.float32) for i in sorted(idx)]
            sets[split].labels += [k] * len(idx)
    return sets, list(per_class)


# --------------------------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------------------------- #

def _fit(lines: list[np.ndarray], size: float, margin: float) -> list[np.ndarray]:
    if not lines:
        return []
    pts = np.concatenate(lines)
    lo, hi = pts.min(0), pts.max(0)
    scale = (size - 2 * margin) / max(float((hi - lo).max()), 1e-6)
    centre = (lo + hi) / 2
    return [(line - centre) * scale + size / 2 for line in lines]


def render_sketches(sketches: Sequence[np.ndarray], columns: int = 8, cell: int = 96,
                    line_width: int = 2) -> np.ndarray:
    """Stroke-3 sketches -> (H, W, 3) uint8 grid image, each sketch scaled to fit its cell (pen-up
    moves not drawn, a single point drawn as a dot)."""
    n = max(len(sketches), 1)
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    img = Image.new("RGB", (columns * cell, rows * cell), "white")
    draw = ImageDraw.Draw(img)
    for k, seq in enumerate(sketches):
        ox, oy = (k % columns) * cell, (k // columns) * cell
        draw.rectangle([ox, oy, ox + cell - 1, oy + cell - 1], outline=(220, 220, 220))
        for line in _fit(stroke3_to_polylines(seq) if len(seq) else [], cell, 6):
            pts = [(float(x) + ox, float(y) + oy) for x, y in line]
            if len(pts) == 1:
                x, y = pts[0]
                draw.ellipse([x - line_width, y - line_width, x + line_width, y + line_width], fill="black")
            else:
                draw.line(pts, fill="black", width=line_width, joint="curve")
    return np.asarray(img)


def sketches_to_svg(sketches: Sequence[np.ndarray], columns: int = 8, cell: int = 96) -> str:
    """Stroke-3 sketches -> an SVG document with the same grid layout as `render_sketches`."""
    n = max(len(sketches), 1)
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{columns * cell}" height="{rows * cell}" '
             f'viewBox="0 0 {columns * cell} {rows * cell}">', '<rect width="100%" height="100%" fill="white"/>']
    for k, seq in enumerate(sketches):
        ox, oy = (k % columns) * cell, (k // columns) * cell
        paths = []
        for line in _fit(stroke3_to_polylines(seq) if len(seq) else [], cell, 6):
            d = " ".join(f"{'M' if i == 0 else 'L'}{x + ox:.2f},{y + oy:.2f}" for i, (x, y) in enumerate(line))
            paths.append(d + (" l0.01,0" if len(line) == 1 else ""))
        if paths:
            parts.append(f'<path d="{" ".join(paths)}" fill="none" stroke="black" stroke-width="2" '
                         'stroke-linecap="round" stroke-linejoin="round"/>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------- #
# Dataset and datamodule
# --------------------------------------------------------------------------------------------- #

class SketchDataset(Dataset):
    """Items (float32 stroke-3 (L, 3) raw offsets, label), indexed by i or (epoch, i) (`EpochSampler`);
    with augmentation (training), the official random scale and stroke dropping are drawn from a
    generator seeded by (seed, epoch, i)."""

    def __init__(self, data: SketchSet, random_scale_factor: float = 0.0, augment_stroke_prob: float = 0.0,
                 seed: int = 0):
        self.data, self.random_scale_factor, self.augment_stroke_prob = data, random_scale_factor, augment_stroke_prob
        self.seed = seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item):
        epoch, i = split_item(item)
        seq = self.data.sketches[i]
        if self.random_scale_factor > 0 or self.augment_stroke_prob > 0:
            rng = np.random.default_rng([self.seed, 1, epoch, i])
            if self.random_scale_factor > 0:
                seq = random_scale(seq, self.random_scale_factor, rng)
            seq = augment_strokes(seq, self.augment_stroke_prob, rng=rng)
        return seq, self.data.labels[i]


class _Collate:
    def __init__(self, steps: int):
        self.steps = steps

    def __call__(self, items):
        strokes, lengths = stroke3_to_stroke5([s for s, _ in items], self.steps)
        return {"strokes": strokes, "lengths": lengths, "label": torch.tensor([y for _, y in items])}


class SketchDataModule(ZooDataModule):
    """Sketch batches for Sketch-RNN.

    Args:
        path: one sketch-rnn .npz or a list of them (one class each, named by the file stem; stems
            must differ).
        categories: QuickDraw category names ("cat,bus" or a list), one class each: their published
            sketch-rnn files are downloaded (`quickdraw_files`) in `setup`. Not together with `path`.
        cache_dir: where the downloads are kept; None: $ZOO_CACHE/quickdraw, else ~/.cache/zoo/quickdraw.
        base_url: where the category files are downloaded from (`<base_url>/<category>.npz`).
        builtin: "hershey" (glyphs of the Hershey fonts, one class per font) or "synthetic"
            (generated drawings); used when neither `path` nor `categories` is given.
        classes: the built-in classes (fonts or synthetic class names); None: all defaults
            (HERSHEY_CLASSES or SYNTHETIC_CLASSES).
        num_per_class: sketches per synthetic class.
        max_seq_len: longer sketches are dropped (and counted); magenta's default 250. A split the
            stage needs that this leaves empty (or the training split below batch_size) is refused.
        batch_size: 100 as the official code; training drops the last partial batch.
        random_scale_factor, augment_stroke_prob: training augmentation (official 0.15, 0.10).
        num_workers: DataLoader workers.
        seed: of the built-in splits; with the run's seed (`training_seed`), of the training order and
            augmentation (epoch e, item i use generators seeded by (seed, e) and (seed, e, i): identical
            after resuming from a checkpoint).

    After setup: `scale_factor` (float, from the training split), `steps` (decoder steps = longest kept
    sketch of all splits + 1, so every sketch gets an end token), `class_names`, `report` (counts).
    Batches: {"strokes": (B, steps + 1, 5) float32 raw offsets, "lengths": (B,) int64, "label": (B,)}.
    """

    def __init__(self, path: Optional[Union[str, list[str]]] = None,
                 categories: Optional[Union[str, list[str]]] = None, cache_dir: Optional[str] = None,
                 base_url: str = QUICKDRAW_URL, builtin: str = "hershey", classes: Optional[list[str]] = None,
                 num_per_class: int = 200, max_seq_len: int = 250, batch_size: int = 100,
                 random_scale_factor: float = 0.15, augment_stroke_prob: float = 0.10, num_workers: int = 0,
                 seed: int = 0):
        super().__init__()
        if builtin not in ("hershey", "synthetic"):
            raise ValueError(f"builtin must be 'hershey' or 'synthetic', got {builtin!r}")
        if max_seq_len < 1 or batch_size < 1:
            raise ValueError(f"max_seq_len and batch_size must be >= 1, got {max_seq_len}, {batch_size}")
        if path and categories:
            raise ValueError("give either path (local .npz files) or categories (downloaded), not both")
        self.categories = check_categories(categories) if categories else None  # fails before any download
        self.save_hyperparameters()
        self.sets: Optional[dict[str, SketchSet]] = None

    def info(self) -> DataInfo:
        if self.sets is None:
            return DataInfo()
        return DataInfo(classes=list(self.class_names), scale_factor=self.scale_factor, seq_len=self.steps)

    def setup(self, stage: Optional[str] = None) -> None:
        """Read and preprocess the splits once; refuse a split the stage needs that is too small: the
        training split (always: it gives the scale factor), the validation split for fit / validate
        (empty, Lightning would never validate nor write a checkpoint), the test split for test / predict."""
        if self.sets is None:
            self._load()
        if stage in (None, "fit", "validate"):
            self._check_size(self.sets, "valid", 1)
        if stage in (None, "test", "predict"):
            self._check_size(self.sets, "test", 1)

    def _load(self) -> None:
        hp = self.hparams
        if self.categories:
            sets, names = load_sketch_files(quickdraw_files(self.categories, hp.cache_dir, hp.base_url))
            self.source = f"the QuickDraw categories {', '.join(self.categories)}"
        elif hp.path:
            paths = [hp.path] if isinstance(hp.path, (str, Path)) else list(hp.path)
            sets, names = load_sketch_files(paths)
            self.source = ", ".join(map(str, paths))
        elif hp.builtin == "hershey":
            sets, names = _split_classes(hershey_sketches(hp.classes or HERSHEY_CLASSES), hp.seed)
            self.source = "the built-in hershey sketches"
        else:
            sets, names = _split_classes(synthetic_sketches(hp.num_per_class, hp.classes or SYNTHETIC_CLASSES,
                                                            hp.seed), hp.seed)
            self.source = "the built-in synthetic sketches"
        self.report = preprocess(sets, hp.max_seq_len)
        self._check_size(sets, "train", hp.batch_size)
        longest = max(int(s.lengths().max()) for s in sets.values() if len(s))
        self.steps = longest + 1
        self.scale_factor = scale_factor(sets["train"].sketches)
        self.sets, self.class_names = sets, names

    def _check_size(self, sets: dict[str, SketchSet], split: str, least: int) -> None:
        """ValueError if `split` holds fewer than `least` sketches, saying how many max_seq_len dropped."""
        n, dropped, m = len(sets[split]), self.report[split]["dropped"], self.hparams.max_seq_len
        if n >= least:
            return
        what = f"the {_SPLIT_NAMES[split]} split of {self.source}"
        if n == 0 and dropped:
            raise ValueError(f"{what} is empty: max_seq_len={m} dropped all {dropped} of its sketches as longer; "
                             "raise --data.max_seq_len")
        if n == 0:
            raise ValueError(f"{what} is empty; it needs sketches (the {split!r} array of each .npz)")
        raise ValueError(f"{what} has {n} sketches{f' (max_seq_len={m} dropped {dropped})' if dropped else ''}, "
                         f"fewer than batch_size={least}; lower --data.batch_size"
                         f"{' or raise --data.max_seq_len' if dropped else ''}")

    def _loader(self, split: str, train: bool) -> DataLoader:
        hp = self.hparams
        seed = training_seed(hp.seed)
        ds = SketchDataset(self.sets[split], hp.random_scale_factor if train else 0.0,
                           hp.augment_stroke_prob if train else 0.0, seed=seed)
        sampler = EpochSampler.for_training(self, len(ds), seed, hp.batch_size) if train else None
        return DataLoader(ds, batch_size=hp.batch_size, sampler=sampler, drop_last=train,
                          num_workers=hp.num_workers, collate_fn=_Collate(self.steps),
                          persistent_workers=hp.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False)
