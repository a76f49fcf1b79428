"""The data of ``densenet-fused train``: a CIFAR-10/100 root or an ImageFolder root, read with
torchvision (never downloaded), and scikit-learn's digits written as an ImageFolder."""
import hashlib
import os
from dataclasses import dataclass
from typing import List, Optional

import torch

from .config import TrainError, first_line

CIFAR_DIRS = {"cifar-10-batches-py": ("CIFAR10", 10), "cifar-100-python": ("CIFAR100", 100)}
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Data:
    kind: str                     # "CIFAR10", "CIFAR100" or "ImageFolder"
    train: object
    val: object
    classes: List[str]
    image_size: int

    def digest(self) -> str:
        """A fingerprint of both splits' sample lists: labels and file names (an ImageFolder's, relative
        to its split folder) or labels in order (CIFAR); the same data moved elsewhere keeps it."""
        h = hashlib.sha256()
        for split in (self.train, self.val):
            if hasattr(split, "samples"):
                for path, label in split.samples:
                    h.update(f"{label}\t{os.path.relpath(path, split.root)}\n".encode())
            else:
                h.update(repr(list(split.targets)).encode())
            h.update(b"--\n")
        return h.hexdigest()[:16]


class UnreadableImage(TrainError):
    """An image of the data set that PIL cannot read: one line naming the file."""

    def one_line(self) -> str:
        """The message, also when a DataLoader worker raised it (then the last line of the worker's
        traceback, which the loader re-raises as this class with the traceback as its message)."""
        text = str(self).strip()
        last = text.splitlines()[-1] if text else ""
        return last.split(f"{type(self).__name__}: ", 1)[-1]


def read_image(path: str):
    """torchvision's ImageFolder loader (PIL, converted to RGB), with a file PIL cannot read reported
    as :class:`UnreadableImage` naming it."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for broken files
        raise UnreadableImage(f"--data: cannot read the image {path} ({first_line(exc)})") from None


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s augmentation in ``epoch`` (0-based): SplitMix64 of the three."""
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ epoch) ^ index)


class SeededSamples(torch.utils.data.Dataset):
    """``dataset[index]`` for keys ``(epoch, index)``, its random augmentation drawn from torch's CPU
    generator seeded by :func:`sample_seed` (and the generator's state put back): the same images in
    every process, with any number of loader workers, resumed or not."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        generator = torch.default_generator  # the CPU generator torchvision's transforms draw from
        state = generator.get_state()
        generator.manual_seed(sample_seed(self.seed, epoch, index))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


class EpochIndices(torch.utils.data.Sampler):
    """The keys ``(epoch, index)`` of :class:`SeededSamples`, in the order of ``sampler`` (a
    DistributedSampler: its order depends on its seed and epoch alone)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def _transforms(image_size: int, mean, std, resize: bool, flip: bool = True):
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(mean, std)]
    flips = [T.RandomHorizontalFlip()] if flip else []
    if image_size <= 64:  # CIFAR-style: random crop with padding, horizontal flip
        fix = [T.Resize((image_size, image_size))] if resize else []
        train = T.Compose(fix + [T.RandomCrop(image_size, padding=max(1, image_size // 8))] + flips + norm)
        val = T.Compose(fix + norm)
    else:  # ImageNet-style
        train = T.Compose([T.RandomResizedCrop(image_size)] + flips + norm)
        val = T.Compose([T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)] + norm)
    return train, val


def _find_cifar(path: str):
    """(root as torchvision's CIFAR classes take it, (class name, classes)) or (None, None)."""
    base = os.path.basename(path.rstrip(os.sep))
    if base in CIFAR_DIRS:
        return os.path.dirname(path), CIFAR_DIRS[base]
    found = [d for d in CIFAR_DIRS if os.path.isdir(os.path.join(path, d))]
    if found:
        return path, CIFAR_DIRS[found[0]]
    return None, None


def _load_cifar(path: str, root: str, name: str, image_size: Optional[int], flip: bool) -> Data:
    from torchvision import datasets

    size = image_size or 32
    train_tf, val_tf = _transforms(size, CIFAR_MEAN, CIFAR_STD, resize=size != 32, flip=flip)
    cls = getattr(datasets, name)
    try:
        train = cls(root, train=True, download=False, transform=train_tf)
        val = cls(root, train=False, download=False, transform=val_tf)
    except (RuntimeError, OSError, ValueError) as exc:
        raise TrainError(f"--data {path}: torchvision's {name} cannot read it ({first_line(exc)}); "
                         f"this command never downloads") from None
    return Data(name, train, val, list(train.classes), size)


def _load_imagefolder(path: str, image_size: Optional[int], flip: bool) -> Data:
    from torchvision import datasets

    try:
        probe = datasets.ImageFolder(os.path.join(path, "train"))
        probe_val = datasets.ImageFolder(os.path.join(path, "val"))
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        raise TrainError(f"--data {path}: not a readable ImageFolder ({first_line(exc)})") from None
    if probe.classes != probe_val.classes:
        raise TrainError(f"--data {path}: train/ and val/ must have the same class folders, got "
                         f"{probe.classes} and {probe_val.classes}")
    if len(probe.classes) < 2:
        raise TrainError(f"--data {path}: expected at least 2 class folders, got {probe.classes}")
    if image_size is None:
        w, h = read_image(probe.samples[0][0]).size
        image_size = max(w, h) if max(w, h) <= 64 else 224
    train_tf, val_tf = _transforms(image_size, IMAGENET_MEAN, IMAGENET_STD, resize=True, flip=flip)
    train = datasets.ImageFolder(os.path.join(path, "train"), transform=train_tf, loader=read_image)
    val = datasets.ImageFolder(os.path.join(path, "val"), transform=val_tf, loader=read_image)
    return Data("ImageFolder", train, val, list(train.classes), image_size)


def load_data(path: str, image_size: Optional[int] = None, flip: bool = True) -> Data:
    """The training and validation sets of a CIFAR root or an ImageFolder root (never downloads);
    ``flip=False`` leaves out the random horizontal flip (digits, text: orientation matters)."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise TrainError("reading data sets needs torchvision (pip install torchvision)") from None

    if not os.path.isdir(path):
        raise TrainError(f"--data {path}: no such directory")
    path = os.path.abspath(path)
    root, cifar = _find_cifar(path)
    if cifar is not None:
        return _load_cifar(path, root, cifar[0], image_size, flip)
    if not (os.path.isdir(os.path.join(path, "train")) and os.path.isdir(os.path.join(path, "val"))):
        raise TrainError(f"--data {path}: expected a CIFAR-10/100 root (holding cifar-10-batches-py/ or "
                         f"cifar-100-python/, as torchvision reads it) or an ImageFolder root with train/ "
                         f"and val/ class folders")
    return _load_imagefolder(path, image_size, flip)


def write_digits_imagefolder(root: str, size: int = 32, val_fraction: float = 0.2, seed: int = 0,
                             per_class: Optional[int] = None) -> dict:
    """scikit-learn's digits (1797 8x8 images, 10 classes, shipped with the package) upsampled
    to ``size`` x ``size`` (bilinear) and saved as an ImageFolder: ``root/{train,val}/<digit>/*.png``,
    a stratified split.  ``per_class`` keeps that many images of each class.  Returns the counts."""
    import numpy as np
    from PIL import Image
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise TrainError("the digits data set comes with scikit-learn (pip install scikit-learn)") from None
    digits = load_digits()
    rng = np.random.RandomState(seed)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        rng.shuffle(idx)
        if per_class is not None:
            idx = idx[:per_class]
        n_val = max(1, round(len(idx) * val_fraction))
        for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = os.path.join(root, split, str(label))
            os.makedirs(folder, exist_ok=True)
            for i in part:
                img = Image.fromarray((digits.images[i] * (255 / 16)).round().astype(np.uint8))  # 2-D uint8: mode L
                img.resize((size, size), Image.BILINEAR).save(os.path.join(folder, f"{i:04d}.png"))
                counts[split] += 1
    return counts
