"""Synthetic touching cells, the U-Net weight map (paper Eq. 2) and connected components."""
import math
from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zoo.data.cells import (
    DEFAULT_KNOBS, cell_distances, class_weights, connected_components, make_cell, make_cells, weight_map,
)


# ----------------------------------------------------------------------------- generator

def test_make_cells_shapes_dtypes_and_determinism():
    a = make_cells(3, size=(40, 56), seed=5)
    b = make_cells(3, size=(40, 56), seed=5)
    assert a["images"].shape == (3, 1, 40, 56) and a["images"].dtype == torch.float32
    assert a["semantic"].shape == a["instances"].shape == (3, 40, 56)
    assert a["semantic"].dtype == a["instances"].dtype == torch.int64
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Raw intensities on a 0-255 scale, not scaled to [0, 1].
    assert a["images"].min() >= 0 and a["images"].max() <= 255 and a["images"].max() > 100
    # Random access: image i alone equals image i of the batch.
    img, sem, inst = make_cell(2, (40, 56), 5)
    assert torch.equal(img, a["images"][2]) and torch.equal(sem, a["semantic"][2])
    assert torch.equal(inst, a["instances"][2])
    c = make_cells(1, size=(40, 56), seed=5, start=1)
    assert torch.equal(c["images"][0], a["images"][1])
    # Different index or seed -> different image; seed streams are distinct.
    assert not torch.equal(a["images"][0], a["images"][1])
    assert not torch.equal(make_cells(1, 40, seed=6)["images"], make_cells(1, 40, seed=5)["images"])
    assert not torch.equal(make_cell(0, 40, [5, 1])[0], make_cell(0, 40, [5, 0])[0])
    assert make_cells(0, 16)["images"].shape == (0, 1, 16, 16)


def test_cells_classes_instances_and_membranes():
    data = make_cells(4, size=128, seed=0)
    for sem, inst in zip(data["semantic"], data["instances"]):
        frac = sem.float().mean().item()
        assert 0.4 < frac < 0.95  # both classes, cells dominate
        assert set(sem.unique().tolist()) == {0, 1}
        assert torch.equal(sem, (inst > 0).long())
        k = int(inst.max())
        assert k >= 8 and set(inst.unique().tolist()) == set(range(k + 1))
        # No two different cells touch (4-adjacency) and every cell is one 4-connected piece:
        # the instances are exactly the connected components of the semantic mask.
        assert torch.equal(connected_components(sem), inst)
        # Membranes: some background pixels have two different cells within 3 px.
        big = inst.max() + 1
        hi = F.max_pool2d(inst[None, None].float(), 7, 1, 3)[0, 0]
        lo = -F.max_pool2d(-torch.where(inst > 0, inst, big)[None, None].float(), 7, 1, 3)[0, 0]
        between = (sem == 0) & (hi != lo) & (lo < big)
        assert between.sum() > 0.05 * (sem == 0).sum()


def test_knobs():
    with pytest.raises(ValueError, match="unknown knob"):
        make_cell(0, 32, 0, bogus=1)
    empty = make_cells(1, 48, seed=0, missing=1.0)
    assert empty["instances"].max() == 0 and empty["semantic"].max() == 0
    small = make_cells(1, 96, seed=0, cell_size=12.0)["instances"].max()
    large = make_cells(1, 96, seed=0, cell_size=40.0)["instances"].max()
    assert small > 3 * large
    thick = make_cells(2, 96, seed=0, membrane=(3.0, 3.0))["semantic"].float().mean()
    thin = make_cells(2, 96, seed=0, membrane=(1.0, 1.0))["semantic"].float().mean()
    assert thin > thick
    assert set(DEFAULT_KNOBS) >= {"cell_size", "membrane", "missing", "noise", "blur"}


# ----------------------------------------------------------------------------- weight map

def brute_distances(inst: np.ndarray):
    """For every pixel: sorted distances to every instance (min over all its pixels), by loops."""
    h, w = inst.shape
    ids = [i for i in np.unique(inst) if i > 0]
    d = np.full((max(len(ids), 2), h, w), np.inf)
    for a, i in enumerate(ids):
        pts = np.argwhere(inst == i)
        for y in range(h):
            for x in range(w):
                d[a, y, x] = min(math.hypot(y - py, x - px) for py, px in pts)
    d.sort(axis=0)
    return d[0], d[1]


def brute_weight(sem, inst, w0, sigma, cw):
    d1, d2 = brute_distances(inst)
    out = np.zeros(sem.shape)
    for y in range(sem.shape[0]):
        for x in range(sem.shape[1]):
            out[y, x] = cw[sem[y, x]]
            if sem[y, x] == 0:
                out[y, x] += w0 * math.exp(-((d1[y, x] + d2[y, x]) ** 2) / (2 * sigma ** 2))
    return out


@pytest.mark.parametrize("index", [0, 1, 2])
def test_weight_map_matches_brute_force(index):
    _, sem, inst = make_cell(index, (18, 23), 7, cell_size=8.0, missing=0.3)
    assert inst.max() >= 2
    cw = torch.tensor([1.7, 0.6])
    got = weight_map(sem, inst, w0=10.0, sigma=3.0, class_weights=cw)
    want = brute_weight(sem.numpy(), inst.numpy(), 10.0, 3.0, cw.numpy())
    assert got.dtype == torch.float32 and got.shape == sem.shape
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_cell_distances_match_brute_force_everywhere():
    _, _, inst = make_cell(3, (20, 17), 1, cell_size=7.0)
    d1, d2 = cell_distances(inst, where=torch.ones_like(inst, dtype=torch.bool), radius=1)
    r1, r2 = brute_distances(inst.numpy())
    np.testing.assert_allclose(d1.numpy(), r1, rtol=1e-6)
    np.testing.assert_allclose(d2.numpy(), r2, rtol=1e-6)
    assert (d1[inst > 0] == 0).all()
    # Outside `where`: inf.
    d1, _ = cell_distances(inst)
    assert torch.isinf(d1[inst > 0]).all() and torch.isfinite(d1[inst == 0]).all()


def test_weight_map_hand_computed_gap():
    # Two cells spanning all rows, columns <= 9 and >= 15: a 5 px background gap (columns 10..14).
    # Boundary pixel centres are 6 px apart, so for every gap pixel d1 + d2 = 6, and at the midpoint
    # column 12, d1 = d2 = 3.
    inst = torch.zeros(12, 25, dtype=torch.long)
    inst[:, :10] = 1
    inst[:, 15:] = 2
    sem = (inst > 0).long()
    d1, d2 = cell_distances(inst)
    assert d1[5, 12] == d2[5, 12] == 3.0 and d1[5, 10] == 1.0 and d2[5, 10] == 5.0
    cw = torch.tensor([2.0, 0.5])
    w = weight_map(sem, inst, w0=10.0, sigma=5.0, class_weights=cw)
    expect = 2.0 + 10.0 * math.exp(-(6.0 ** 2) / (2 * 5.0 ** 2))
    assert w[:, 10:15].allclose(torch.full((12, 5), expect))
    assert (w[:, :10] == 0.5).all() and (w[:, 15:] == 0.5).all()  # no border term on cells
    assert (weight_map(sem, inst)[:, :10] == 1).all()  # class_weights None -> 1


@pytest.mark.parametrize("n_cells", [0, 1])
def test_weight_map_without_two_cells_has_no_border_term(n_cells):
    inst = torch.zeros(16, 16, dtype=torch.long)
    if n_cells:
        inst[4:9, 3:12] = 1
    sem = (inst > 0).long()
    cw = torch.tensor([1.5, 0.75])
    w = weight_map(sem, inst, class_weights=cw)
    assert torch.isfinite(w).all()
    assert torch.equal(w, cw[sem])
    d1, d2 = cell_distances(inst)
    assert torch.isinf(d2).all()


def test_weight_map_for_many_cells_matches_all_pairs_distances():
    # The local search (each cell compared with pixels near its bounding box, the radius grown where
    # the second-nearest cell is not yet found) against all pixel pairs, on 64 cells: a search that
    # stopped too early or skipped a cell would give a larger d1 / d2 somewhere. (Its speed is
    # printed by benchmarks/bench_unet.py, not asserted here.)
    _, sem, inst = make_cell(0, 96, 0, cell_size=12.0)
    assert inst.max() >= 50
    h, w = inst.shape
    yx = torch.cartesian_prod(torch.arange(h), torch.arange(w)).double()
    per_cell = [torch.cdist(yx, yx[inst.flatten() == k], compute_mode="donot_use_mm_for_euclid_dist").amin(1)
                for k in range(1, int(inst.max()) + 1)]
    r1, r2 = torch.stack(per_cell).sort(0).values[:2].float().view(2, h, w)
    bg = sem == 0
    for radius in (1, 16):  # 1: grown 4x per round until it covers the image; 16: the default
        d1, d2 = cell_distances(inst, radius=radius)
        torch.testing.assert_close(d1[bg], r1[bg])
        torch.testing.assert_close(d2[bg], r2[bg])
    expect = 1 + torch.where(bg, 10.0 * torch.exp(-((r1 + r2) ** 2) / (2 * 5.0 ** 2)), 0)
    torch.testing.assert_close(weight_map(sem, inst, w0=10.0, sigma=5.0), expect)


def test_weight_map_rejects_bad_input():
    with pytest.raises(ValueError, match="same"):
        weight_map(torch.zeros(4, 4), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="class weight"):
        weight_map(torch.full((4, 4), 2), torch.zeros(4, 4), class_weights=torch.ones(2))
    with pytest.raises(ValueError, match="sigma"):
        weight_map(torch.zeros(4, 4), torch.zeros(4, 4), sigma=0)


def test_class_weights_balance_frequencies():
    masks = [torch.tensor([[0, 1, 1, 1]]), torch.tensor([[1, 1, 1, 1]])]  # 1 background, 7 cell pixels
    cw = class_weights(masks, 3)
    # w_c(k) = N / (P n_k): N = 8 pixels, P = 2 classes present; class 2 absent -> 1.
    torch.testing.assert_close(cw, torch.tensor([8 / 2, 8 / 14, 1.0]))
    pixels = torch.cat([m.flatten() for m in masks])
    assert cw[pixels].mean().item() == pytest.approx(1.0)
    assert cw[0] * 1 == pytest.approx(cw[1] * 7)  # each present class has the same total weight
    with pytest.raises(ValueError, match="3"):
        class_weights([torch.tensor([[3]])], 3)


# ----------------------------------------------------------------------------- components

def brute_components(labels: np.ndarray) -> np.ndarray:
    h, w = labels.shape
    out = np.zeros((h, w), dtype=np.int64)
    k = 0
    for y in range(h):
        for x in range(w):
            if labels[y, x] == 0 or out[y, x]:
                continue
            k += 1
            out[y, x] = k
            todo = deque([(y, x)])
            while todo:
                cy, cx = todo.popleft()
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < h and 0 <= nx < w and not out[ny, nx] and labels[ny, nx] == labels[cy, cx]:
                        out[ny, nx] = k
                        todo.append((ny, nx))
    return out


def test_connected_components_match_bfs():
    rng = np.random.default_rng(0)
    for _ in range(5):
        labels = rng.integers(0, 3, (17, 23)) * (rng.random((17, 23)) < 0.7)
        got = connected_components(torch.from_numpy(labels)).numpy()
        np.testing.assert_array_equal(got, brute_components(labels))
    # A 1-px diagonal line separates (4-connectivity); a spiral is one component.
    diag = 1 - torch.eye(6, dtype=torch.long)
    assert connected_components(diag).max() == 2
    spiral = torch.zeros(9, 9, dtype=torch.long)
    spiral[0, :] = spiral[:, 8] = spiral[8, :] = spiral[2:, 0] = spiral[2, :7] = spiral[2:7, 6] = spiral[6, 2:7] = 1
    assert connected_components(spiral).max() == 1
    assert connected_components(torch.zeros(3, 3)).max() == 0
