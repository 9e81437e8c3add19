"""
sources/: where training items come from, part of the core (data.py builds datasets from these readers). Each reader
follows the item protocol of data.py's docstring and imports nothing from nanoCEP's top level.

    builtin.py            the built-in dataset: coloured discs and crosses drawn from (index, seed), with captions
    folders.py            ImageNet-layout class folders (ADM centre crop), the protocol's helpers (flip_key, to_tensor,
                          as_item) and DatasetView, the base of views that change a dataset's items
    captions.py           captioned images (img2dataset folders, path<TAB>caption tables) and the token view (--cond text)
    shards.py             WebDataset .tar shards (img2dataset output): indexed once, then read at random by member offset
    torchvision_sets.py   MNIST, Fashion-MNIST, KMNIST, CIFAR-10/100 through torchvision.datasets (--data mnist, ...)
    digits.py             scikit-learn's bundled 8x8 handwritten digits (--data digits): pool / judge / fresh parts
    control.py            ControlNet's control maps: Canny edges of each item, or same-stem maps made elsewhere
    download.py           downloads checked by sha256, atomic: how weights/ and scoring/ fetch released files
    tokenizer.py          the caption tokenizer (tiktoken: offline bytes, GPT-2 BPE, or a local .tiktoken file)
"""
