"""
sources/: where training items come from, part of the core (data.py builds datasets from these readers). Each reader
follows the item protocol of data.py's docstring and imports nothing from nanoCEP's top level.

    folders.py     ImageNet-layout class folders (ADM centre crop), and the protocol's helpers (flip_key, to_tensor)
    captions.py    captioned images (img2dataset folders, path<TAB>caption tables) and the token view for --cond text
    shards.py      WebDataset .tar shards (img2dataset output): indexed once, then read at random by member offset
    tokenizer.py   the caption tokenizer (tiktoken: offline bytes, GPT-2 BPE, or a local .tiktoken file)
"""
