"""Data sets as tensors: Fashion-MNIST, CIFAR-10/100, image folders, HMDB-51 frames."""

from gkpd.data import cifar, fashion_mnist
from gkpd.data.arrays import ImageArrayDataset
from gkpd.data.hmdb51 import HMDB51Dataset
from gkpd.data.image_folder import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset
from gkpd.data.registry import (
    DatasetInfo,
    build_dataset,
    build_loaders,
    dataset_names,
    get_info,
    register_dataset,
    sample_inputs,
)


def _fashion_mnist(split, data_dir, transform, augment):
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



def _cifar(num_classes):
    def build(split, data_dir, transform, augment):
        images, labels = cifar.load_arrays(num_classes, split, data_dir)
        return ImageArrayDataset(images, labels, transform)

    return build


register_dataset(
    DatasetInfo(
        name="cifar10",
        num_classes=10,
        in_channels=3,
        image_size=32,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        crop_padding=4,
        build=_cifar(10),
    )
)
register_dataset(
    DatasetInfo(
        name="cifar100",
        num_classes=100,
        in_channels=3,
        image_size=32,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        crop_padding=4,
        build=_cifar(100),
    )
)


def _imagefolder(split, data_dir, transform, augment):
    # The train split draws a random resized crop while decoding; the transform then flips
    # and normalizes (crop_padding 0 makes the registry's RandomCrop a no-op).
    return ImageFolderDataset(
        data_dir, split, transform, image_size=224, random_crop=augment
    )


register_dataset(
    DatasetInfo(
        name="imagefolder",
        num_classes=1000,  # ImageNet; other folders: len(dataset.classes)
        in_channels=3,
        image_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop_padding=0,
        build=_imagefolder,
    )
)


def _hmdb51(split, data_dir, transform, augment):
    # Official fold 1, 16-frame clips (3, 16, 224, 224); other folds: HMDB51Dataset(fold=k).
    return HMDB51Dataset(
        data_dir, split, transform, fold=1, num_frames=16, image_size=224,
        random_sampling=augment,
    )


register_dataset(
    DatasetInfo(
        name="hmdb51",
        num_classes=51,
        frames=16,
        in_channels=3,
        image_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop_padding=0,
        build=_hmdb51,
    )
)

__all__ = [
    "DatasetInfo",
    "HMDB51Dataset",
    "ImageArrayDataset",
    "ImageFolderDataset",
    "build_dataset",
    "build_loaders",
    "dataset_names",
    "get_info",
    "register_dataset",
    "sample_inputs",
]
