"""Datasets as uint8 arrays, their on-disk artifact, safe archive/pickle reading, deterministic batches."""

from bockd.data.archive import safe_extract
from bockd.data.augment import augment_batch, crop_flip, pad_for, to_model_input
from bockd.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES, load_cifar
from bockd.data.dataset import ImageDataset, ImageSplit
from bockd.data.digits import load_digits_dataset
from bockd.data.idx import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES, load_fashion_mnist, read_idx
from bockd.data.imagefolder import load_imagefolder
from bockd.data.loaders import BatchLoader, batch_seed, epoch_permutation, mix_seed
from bockd.data.registry import DATASET_NAMES, canonical_name, check_source, load_dataset
from bockd.data.resize import resize_images
from bockd.data.safe_pickle import safe_loads
from bockd.data.splits import stratified_split

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR100_CLASSES",
    "DATASET_NAMES",
    "DEBIAN_FASHION_MNIST",
    "FASHION_MNIST_CLASSES",
    "BatchLoader",
    "ImageDataset",
    "ImageSplit",
    "augment_batch",
    "batch_seed",
    "canonical_name",
    "check_source",
    "crop_flip",
    "epoch_permutation",
    "load_cifar",
    "load_dataset",
    "load_digits_dataset",
    "load_fashion_mnist",
    "load_imagefolder",
    "mix_seed",
    "pad_for",
    "read_idx",
    "resize_images",
    "safe_extract",
    "safe_loads",
    "stratified_split",
    "to_model_input",
]
