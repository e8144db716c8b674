"""The data layer: product lines in MVTec-AD layout, torch datasets, importers, demo lines."""

from redi.data.dataset import ImageDataset, load_images, load_masks
from redi.data.mvtec import MVTecCategory, Sample, ValidationReport, split_train_val

__all__ = ["ImageDataset", "MVTecCategory", "Sample", "ValidationReport", "load_images",
           "load_masks", "split_train_val"]
