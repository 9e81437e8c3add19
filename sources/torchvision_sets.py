"""
torchvision's standard small datasets (MNIST, Fashion-MNIST, KMNIST, CIFAR-10/100) as nanoCEP datasets: the item
protocol of data.py's docstring, images ADM-centre-cropped (resized) to any side down to 8 px, greyscale as RGB.

    python train_dit.py --data mnist --data-root ~/data --image-size 16 --items-per-class 5

The files are read through torchvision.datasets from the root; if they are not there, torchvision downloads them
there once (the machines that run our tests are offline: the tests write small files in the same formats).
Nothing to run here; data.build_dataset picks the reader.
"""
import numpy as np
import torch

from sources.folders import as_item, center_crop_arr, flip_key

# --data name -> torchvision.datasets class name
TORCHVISION_SETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST", "cifar10": "CIFAR10",
                    "cifar100": "CIFAR100"}


def open_torchvision(name: str, root: str, train: bool = True):
    """The torchvision dataset `name` under root (its train or test split), downloading it there if absent."""
    import torchvision.datasets as tvd
    cls = getattr(tvd, TORCHVISION_SETS[name])
    try:
        return cls(root, train=train, download=False)
    except RuntimeError:                                   # not there (or corrupted): let torchvision fetch it once
        try:
            return cls(root, train=train, download=True)
        except Exception as e:                             # offline: URLError, RuntimeError, ... -> one line
            raise FileNotFoundError(f"--data {name}: not found under {root} and the download failed "
                                    f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); put the "
                                    f"torchvision files under {root} or pass --data-root") from None


class TorchvisionDataset(torch.utils.data.Dataset):
    """A torchvision classification set (train or test split) resized to `size`, RGB, flip chosen by the key."""

    def __init__(self, name: str, root: str, size: int = 16, train: bool = True):
        self.tv = open_torchvision(name, root, train)
        self.name, self.image_size, self.channels, self.captions = name, size, 3, None
        self.labels = np.asarray(self.tv.targets, dtype=np.int64)
        self.class_names = [str(c) for c in self.tv.classes]
        self.num_classes = len(self.class_names)

    def __len__(self):
        return len(self.labels)

    def render(self, index: int) -> np.ndarray:
        """Item `index` as uint8 (size, size, 3): RGB (greyscale replicated), ADM centre crop to the size."""
        img, _ = self.tv[index]                               # a PIL image (mode L or RGB)
        return center_crop_arr(img.convert("RGB"), self.image_size)

    def __getitem__(self, key: int):
        index, flip = flip_key(int(key))
        return as_item(self.render(index), flip, self.labels[index])
