"""Synthetic touching cells and the U-Net loss weight map (Ronneberger et al. 2015, Eq. 2).

`make_cells` draws images like the ISBI EM / light-microscopy cell images the U-Net paper targets:
the plane is tessellated into cells (a power diagram of jittered seeds, so cell sizes vary, seen
through a smooth random warp, so membranes are wavy), touching cells are separated by thin
membranes (1-3 px, labelled background), some cells are missing (background gaps), and the image
gets per-cell brightness, texture, dark membranes, blur and noise. Each image is drawn from its own
generator seeded by (seed, index), so a dataset of any length is cheap and randomly accessible, and
the same (seed, index) always gives the same image.

`weight_map` is the paper's w(x) = w_c(x) + w0 exp(-(d1(x) + d2(x))^2 / (2 sigma^2)), with d1, d2
exact Euclidean distances from x to the nearest and second-nearest cell. The paper adds the border
term so that "the separating background labels between touching cells obtain a large weight in the
loss function" (Sec. 3), i.e. it is a weight on background pixels; on cell pixels only w_c applies.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from zoo.data.sampling import seeded_generator

__all__ = [
    "make_cells", "make_cell", "weight_map", "class_weights", "cell_distances", "connected_components",
    "DEFAULT_KNOBS",
]

# Difficulty knobs of the generator (all sizes in pixels, intensities on a 0-255 scale).
DEFAULT_KNOBS: dict = {
    "cell_size": 32.0,      # mean distance between cell centres
    "size_jitter": 0.4,     # spread of cell sizes (power-diagram radius, fraction of cell_size)
    "wobble": 0.12,         # amplitude of the smooth warp that makes membranes wavy (fraction of cell_size)
    "membrane": (1.0, 3.0),  # membrane width range; each image draws one width from it
    "missing": 0.1,         # fraction of cells left out (background gaps)
    "noise": 10.0,          # std of additive Gaussian noise
    "blur": 1.0,            # std of the Gaussian blur (0: none)
    "contrast": 1.0,        # scales the cell/membrane/background intensity differences
}


def _size(size) -> tuple[int, int]:
    if isinstance(size, numbers.Integral):
        size = (size, size)
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"size {size!r} must be positive (an int or (H, W))")
    return h, w


def _smooth_field(channels: int, h: int, w: int, cells: float, g: torch.Generator) -> torch.Tensor:
    """(channels, h, w) smooth N(0, 1)-ish noise: a random grid every `cells` px, bicubic upsampled."""
    gh, gw = max(2, math.ceil(h / cells) + 1), max(2, math.ceil(w / cells) + 1)
    coarse = torch.randn(1, channels, gh, gw, generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0]


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """(..., H, W) -> same shape, separable Gaussian blur with replicated borders."""
    if sigma <= 0:
        return image
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    shape = image.shape
    x = image.reshape(-1, 1, *shape[-2:])
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return x.reshape(shape)


def make_cell(index: int, size=256, seed=0, **knobs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One synthetic image. Returns image (1, H, W) float32 raw intensities in [0, 255], semantic
    (H, W) int64 in {0: background/membrane, 1: cell}, instances (H, W) int64 (0: none, 1..K cells).
    `seed` may be an int or a sequence of ints (a stream); see `make_cells` for the knobs."""
    unknown = set(knobs) - set(DEFAULT_KNOBS)
    if unknown:
        raise ValueError(f"unknown knob(s) {sorted(unknown)}; accepted: {sorted(DEFAULT_KNOBS)}")
    k = {**DEFAULT_KNOBS, **knobs}
    h, w = _size(size)
    g = seeded_generator(seed, index)
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    spacing = float(k["cell_size"])
    if spacing <= 0:
        raise ValueError(f"cell_size {spacing} must be > 0")

    # Seeds: one per grid cell, uniformly jittered inside it, with rings of seeds outside the image
    # so that cells are cut by the border. Power weights r^2 make cell sizes vary.
    ring = 3
    ny, nx = math.ceil(h / spacing) + 2 * ring, math.ceil(w / spacing) + 2 * ring
    gy, gx = torch.meshgrid(torch.arange(ny, dtype=torch.float32), torch.arange(nx, dtype=torch.float32),
                            indexing="ij")
    sy = ((gy - ring + u(ny, nx)) * spacing).flatten()
    sx = ((gx - ring + u(ny, nx)) * spacing).flatten()
    radius2 = (float(k["size_jitter"]) * spacing * u(ny * nx)) ** 2
    n_seeds = ny * nx

    # Pixel coordinates seen through a smooth random warp (wavy membranes).
    py, px = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    warp = _smooth_field(2, h, w, 2 * spacing, g) * (float(k["wobble"]) * spacing)
    qy = (py + warp[0]).clamp(-spacing, h + spacing).flatten()
    qx = (px + warp[1]).clamp(-spacing, w + spacing).flatten()

    # Power distance of every pixel to the seeds of the 4x4 grid cells around it: the pixel's cell,
    # one more on its near side and two on its far side along each axis. The nearest seed is always
    # among them for size_jitter <= 0.5 (any other is > 1.5 cells away, its power > 2 cell^2 >= that
    # of the pixel's own seed); the two smallest give the cell and its neighbour across the membrane.
    fy, fx = qy / spacing, qx / spacing
    cy = torch.floor(fy).long() + ring - 1 - (fy - torch.floor(fy) < 0.5).long()
    cx = torch.floor(fx).long() + ring - 1 - (fx - torch.floor(fx) < 0.5).long()
    # (the clamped warp keeps every 4x4 block inside the seed grid)
    oy, ox = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    top = torch.arange((ny - 3) * (nx - 3))
    top = (top // (nx - 3)) * nx + top % (nx - 3)  # top-left seed of every 4x4 block
    block = top[:, None] + (oy * nx + ox).flatten()[None]  # (blocks, 16) seed ids
    table = torch.stack([sy, sx, radius2], 1)[block]  # (blocks, 16, 3)
    base = cy * (nx - 3) + cx
    cand_xyz = table[base]  # (HW, 16, 3)
    power = (qy[:, None] - cand_xyz[..., 0]) ** 2 + (qx[:, None] - cand_xyz[..., 1]) ** 2 - cand_xyz[..., 2]
    cand = block[base]
    p1, j1 = power.min(1)
    power.scatter_(1, j1[:, None], math.inf)
    p2, j2 = power.min(1)
    i1, i2 = cand.gather(1, j1[:, None])[:, 0], cand.gather(1, j2[:, None])[:, 0]
    sep = torch.sqrt((sy[i1] - sy[i2]) ** 2 + (sx[i1] - sx[i2]) ** 2).clamp_min(1e-6)
    dist = ((p2 - p1) / (2 * sep)).view(h, w)  # distance to the separating (power) bisector
    label = i1.view(h, w)

    lo, hi = (float(v) for v in k["membrane"]) if isinstance(k["membrane"], Sequence) else (float(k["membrane"]),) * 2
    width = lo + (hi - lo) * float(u(()))
    membrane = dist < width / 2
    # Guarantee a separation of at least one pixel: mark one side of every 4-adjacent label change.
    membrane[:, :-1] |= label[:, :-1] != label[:, 1:]
    membrane[:-1, :] |= label[:-1, :] != label[1:, :]

    missing = u(n_seeds) < float(k["missing"])
    cell = ~membrane & ~missing[label]
    # A cell may be cut into pieces by the membrane bands (a pixel at a triple junction, a sliver);
    # keep the largest piece, the rest becomes background. Cells are then 4-connected, no two touch,
    # and instances == connected_components(semantic), numbered in raster order.
    pieces = connected_components(torch.where(cell, label + 1, 0))
    size = torch.bincount(pieces.flatten())
    owner = torch.zeros(len(size), dtype=torch.long).scatter_(0, pieces.flatten(), label.flatten())
    key = size * len(size) + torch.arange(len(size))
    best = torch.zeros(n_seeds, dtype=torch.long).scatter_reduce(0, owner[1:], key[1:], "amax")
    keep = key == best[owner]
    keep[0] = False
    cell = keep[pieces]
    _, inverse = torch.unique(pieces[cell], return_inverse=True)
    instances = torch.zeros(h, w, dtype=torch.int64)
    instances[cell] = inverse + 1
    semantic = cell.long()

    # Intensities: bright textured cells darkening towards their membrane, dark membranes,
    # mid-grey background gaps; then blur, noise and a global gain/offset.
    c = float(k["contrast"])
    base = 165 + 35 * (2 * u(n_seeds) - 1)
    texture = _smooth_field(2, h, w, 6.0, g)
    interior = base[label] - 30 * torch.exp(-dist / 2.0) + 10 * texture[0]
    gap = 90 + 8 * texture[1]
    membrane_level = 55 + 10 * (2 * u(()) - 1)
    img = torch.where(cell, interior, torch.where(missing[label], gap, membrane_level))
    img = 128 + c * (img - 128)
    img = gaussian_blur(img, float(k["blur"]))
    img = img + float(k["noise"]) * torch.randn(h, w, generator=g)
    img = (0.85 + 0.3 * u(())) * img + 15 * (2 * u(()) - 1)
    return img.clamp(0, 255).unsqueeze(0).float(), semantic, instances


def make_cells(num: int, size=256, seed=0, start: int = 0, **knobs) -> dict[str, torch.Tensor]:
    """`num` synthetic touching-cell images (indices start..start+num-1 of the stream `seed`).

    Args:
        num: number of images.
        size: int or (H, W).
        seed: int or sequence of ints; image i is drawn from its own generator seeded by (seed, i),
            so any image can be regenerated alone and the same seed gives identical data.
        start: index of the first image.
        knobs: difficulty knobs, defaults in `DEFAULT_KNOBS`: cell_size, size_jitter, wobble,
            membrane (width range), missing, noise, blur, contrast.

    Returns:
        {"images": (N, 1, H, W) float32 raw intensities (0-255, not scaled),
         "semantic": (N, H, W) int64 in {0: background/membrane, 1: cell},
         "instances": (N, H, W) int64 (0: none, 1..K cells)}
    """
    h, w = _size(size)
    out = [make_cell(start + i, (h, w), seed, **knobs) for i in range(num)]
    if not out:
        return {"images": torch.zeros(0, 1, h, w), "semantic": torch.zeros(0, h, w, dtype=torch.int64),
                "instances": torch.zeros(0, h, w, dtype=torch.int64)}
    images, semantic, instances = zip(*out)
    return {"images": torch.stack(images), "semantic": torch.stack(semantic), "instances": torch.stack(instances)}


# --------------------------------------------------------------------------------------------- #
# Weight map
# --------------------------------------------------------------------------------------------- #

def _boundary(instances: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: instance pixels with a 4-neighbour (inside the image) of another id. The pixel
    of an instance nearest to any outside point is always such a pixel."""
    inst = instances
    b = torch.zeros_like(inst, dtype=torch.bool)
    diff_h = inst[:, 1:] != inst[:, :-1]
    diff_v = inst[1:, :] != inst[:-1, :]
    b[:, 1:] |= diff_h
    b[:, :-1] |= diff_h
    b[1:, :] |= diff_v
    b[:-1, :] |= diff_v
    return b & (inst > 0)


def cell_distances(instances, where: torch.Tensor | None = None, radius: int = 16,
                   chunk: int = 1 << 21) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Euclidean distances from pixels to the nearest and second-nearest instance.

    Args:
        instances: (H, W) int ids, 0 = no instance.
        where: (H, W) bool, the pixels to compute (default: the pixels outside every instance).
        radius: first search radius (px); only affects speed.
        chunk: max number of pixel pairs compared at once (memory bound).

    Returns:
        d1, d2: (H, W) float32; d_i(x) = min over pixels y of the i-th nearest instance of |x - y|
        between pixel centres (0 for the instance x lies in). inf where fewer instances exist, and
        at pixels outside `where`.

    Exact, and local: instance k is compared (through its boundary pixels, which hold the pixel of
    k nearest to any outside point) only with the pixels within R of its bounding box. A pixel whose
    second-nearest instance found is within R is final (any instance not compared is farther than
    R); the others are redone with R four times larger, until R covers the image.
    """
    inst = torch.as_tensor(instances).long()
    if inst.ndim != 2:
        raise ValueError(f"instances must be (H, W), got shape {tuple(inst.shape)}")
    h, w = inst.shape
    where = (inst == 0) if where is None else torch.as_tensor(where, dtype=torch.bool)
    d1 = torch.full((h * w,), math.inf)
    d2 = torch.full((h * w,), math.inf)
    bmask = _boundary(inst)
    bpix = torch.nonzero(bmask)
    if len(bpix) == 0 or not bool(where.any()):
        return d1.view(h, w), d2.view(h, w)
    blab = inst[bmask]
    ids, k_of, counts = torch.unique(blab, return_inverse=True, return_counts=True)
    order = torch.argsort(k_of, stable=True)
    bpix, k_of = bpix[order], k_of[order]
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    counts = counts.tolist()
    n_k = len(ids)
    index = k_of[:, None].expand(-1, 2)
    lo = torch.full((n_k, 2), max(h, w), dtype=torch.long).scatter_reduce(0, index, bpix, "amin")
    hi = torch.full((n_k, 2), -1, dtype=torch.long).scatter_reduce(0, index, bpix, "amax")
    lo, hi, ids_l = lo.tolist(), hi.tolist(), ids.tolist()
    bpix_y, bpix_x = bpix[:, 0].float(), bpix[:, 1].float()
    inst_flat = inst.flatten()

    todo = where.clone()
    r = max(1, int(radius))
    while True:
        covers = r >= max(h, w)
        b1 = torch.full((h * w,), math.inf)
        b2 = torch.full((h * w,), math.inf)
        for k in range(n_k):
            y0, x0 = max(0, lo[k][0] - r), max(0, lo[k][1] - r)
            y1, x1 = min(h, hi[k][0] + r + 1), min(w, hi[k][1] + r + 1)
            nz = torch.nonzero(todo[y0:y1, x0:x1])
            if len(nz) == 0:
                continue
            nz[:, 0] += y0
            nz[:, 1] += x0
            flat = nz[:, 0] * w + nz[:, 1]
            py, px = bpix_y[None, starts[k]:starts[k] + counts[k]], bpix_x[None, starts[k]:starts[k] + counts[k]]
            qy, qx = nz[:, :1].float(), nz[:, 1:].float()
            step = max(1, chunk // counts[k])
            dk = torch.cat([((qy[s:s + step] - py) ** 2 + (qx[s:s + step] - px) ** 2).amin(1)
                            for s in range(0, len(qy), step)])  # exact: integer coordinates
            dk = dk.masked_fill_(inst_flat[flat] == ids_l[k], 0.0)
            o1, o2 = b1[flat], b2[flat]
            b2[flat] = torch.minimum(o2, torch.maximum(o1, dk))
            b1[flat] = torch.minimum(o1, dk)
        todo_flat = todo.flatten()
        done = todo_flat & ((b2 <= r * r) | covers)
        d1[done], d2[done] = b1[done], b2[done]
        todo = (todo_flat & ~done).view(h, w)
        if covers or not bool(todo.any()):
            break
        r *= 4
    return d1.sqrt().view(h, w), d2.sqrt().view(h, w)


def class_weights(masks, num_classes: int) -> torch.Tensor:
    """Class-balancing weights w_c(k) = N / (P * n_k), from pixel counts n_k over `masks` (a tensor
    or an iterable of tensors of class ids), N = all pixels, P = number of classes present. Classes
    that are absent get 1. So the mean of w_c over the given pixels is 1, and each present class
    contributes the same total weight. Returns (num_classes,) float32."""
    if isinstance(masks, torch.Tensor):
        masks = [masks]
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for m in masks:
        m = torch.as_tensor(m).long().flatten()
        if len(m) and (int(m.min()) < 0 or int(m.max()) >= num_classes):
            bad = int(m.max()) if int(m.max()) >= num_classes else int(m.min())
            raise ValueError(f"mask value {bad} is not a class id in [0, {num_classes})")
        counts += torch.bincount(m, minlength=num_classes).double()
    present = counts > 0
    wc = torch.ones(num_classes, dtype=torch.float64)
    if present.any():
        wc[present] = counts.sum() / (present.sum() * counts[present])
    return wc.float()


def weight_map(semantic, instances, w0: float = 10.0, sigma: float = 5.0,
               class_weights: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
    """The U-Net loss weight map (paper Eq. 2).

    w(x) = w_c(semantic(x)) + [semantic(x) == 0] * w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

    Args:
        semantic: (H, W) class ids, 0 = background (membranes / gaps between cells).
        instances: (H, W) instance ids, 0 = none; the "cells" the distances refer to.
        w0, sigma: border term amplitude and width (paper: 10 and about 5 px).
        class_weights: (num_classes,) w_c per class (see `class_weights`); None -> all 1.

    Returns:
        (H, W) float32. d1, d2 are exact Euclidean distances to the nearest and second-nearest
        instance; with fewer than two instances d2 = inf and the border term is 0. The border term
        is applied to background pixels only: the paper weights "the separating background labels
        between touching cells"; on a cell pixel d1 = 0 and the term would just blur cell edges.
    """
    semantic = torch.as_tensor(semantic).long()
    instances = torch.as_tensor(instances).long()
    if semantic.shape != instances.shape or semantic.ndim != 2:
        raise ValueError(f"semantic {tuple(semantic.shape)} and instances {tuple(instances.shape)} must be "
                         "the same (H, W)")
    if sigma <= 0:
        raise ValueError(f"sigma {sigma} must be > 0")
    if class_weights is None:
        wc = torch.ones(semantic.shape, dtype=torch.float32)
    else:
        cw = torch.as_tensor(class_weights, dtype=torch.float32)
        if semantic.numel() and int(semantic.max()) >= len(cw):
            raise ValueError(f"class id {int(semantic.max())} has no class weight ({len(cw)} given)")
        wc = cw[semantic]
    background = semantic == 0
    if w0 == 0 or not bool(background.any()):
        return wc.float()
    d1, d2 = cell_distances(instances, where=background)
    border = w0 * torch.exp(-((d1 + d2) ** 2) / (2 * sigma ** 2))
    return (wc + torch.where(background, border, torch.zeros(()))).float()


# --------------------------------------------------------------------------------------------- #
# Connected components
# --------------------------------------------------------------------------------------------- #

def connected_components(labels) -> torch.Tensor:
    """4-connected components of each non-zero value of `labels` ((H, W) ints): two pixels share a
    component when they have the same non-zero value and are joined by a 4-connected path of that
    value. Returns (H, W) int64, 0 where labels == 0 and 1..K numbered in raster order of each
    component's first pixel. (4-connectivity, so a 1-px diagonal membrane separates two cells.)

    Vectorised in torch: horizontal runs are labelled by a cumulative sum, then runs joined by
    vertical same-value neighbours are merged by min-label propagation with pointer jumping.
    """
    labels = torch.as_tensor(labels).long()
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {tuple(labels.shape)}")
    h, w = labels.shape
    fg = labels != 0
    out = torch.zeros(h, w, dtype=torch.int64)
    if not bool(fg.any()):
        return out
    start = fg.clone()
    start[:, 1:] &= labels[:, 1:] != labels[:, :-1]
    run = (torch.cumsum(start.flatten(), 0) - 1).view(h, w)  # run id of every fg pixel
    n_runs = int(start.sum())
    same_v = fg[:-1] & (labels[:-1] == labels[1:])
    a, b = run[:-1][same_v], run[1:][same_v]
    parent = torch.arange(n_runs)
    if len(a):
        key = torch.unique(a * n_runs + b)
        a, b = key // n_runs, key % n_runs
        while True:
            m = torch.minimum(parent[a], parent[b])
            new = parent.scatter_reduce(0, a, m, "amin").scatter_reduce_(0, b, m, "amin")
            while True:  # pointer jumping: every run points at its current root
                jumped = new[new]
                if torch.equal(jumped, new):
                    break
                new = jumped
            if torch.equal(new, parent):
                break
            parent = new
    _, comp = torch.unique(parent, return_inverse=True)
    out[fg] = comp[run[fg]] + 1
    return out
