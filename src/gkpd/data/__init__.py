"""Data sets as tensors: Fashion-MNIST, CIFAR-10/100, image folders, HMDB-51 frames."""

from gkpd.data import fashion_mnist
from gkpd.data.arrays import ImageArrayDataset
from gkpd.data.registry import (
    DatasetInfo,
    build_dataset,
    build_loaders,
    dataset_names,
    get_info,
    register_dataset,
)


def _fashion_mnist(split, data_dir, transform):
    images, labels = fashion_mnist.load_arrays(split, data_dir)
    return ImageArrayDataset(images, labels, transform)


register_dataset(
    DatasetInfo(
        name="fashion-mnist",
        num_classes=10,
        in_channels=1,
        image_size=28,
        mean=(0.2860,),
        std=(0.3530,),
        crop_padding=2,
        build=_fashion_mnist,
    )
)

__all__ = [
    "DatasetInfo",
    "ImageArrayDataset",
    "build_dataset",
    "build_loaders",
    "dataset_names",
    "get_info",
    "register_dataset",
]
