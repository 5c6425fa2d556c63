"""Data for the zoo: synthetic touching cells, the U-Net weight map, the paper's augmentation, and
the segmentation folder loader + LightningDataModule."""
from zoo.data.augment import ElasticGrid, GrayValue, RandomRigid, RandomWarp, WeightMap, paper_augmentation
from zoo.data.cells import class_weights, connected_components, make_cell, make_cells, weight_map
from zoo.data.segmentation import CellsDataModule, read_split

__all__ = [
    "CellsDataModule", "make_cells", "make_cell", "weight_map", "class_weights", "connected_components",
    "ElasticGrid", "RandomRigid", "RandomWarp", "GrayValue", "WeightMap", "paper_augmentation", "read_split",
]
