"""
The model families nanoCEP trains, by checkpoint kind: the one interface through which evaluate.py and bench.py
rebuild a model (a checkpoint's "kind" and "config" entries are all they need).

    family = FAMILIES[ckpt["kind"]]                      # "dit" (train_dit.py) | "ldm" (train_ldm.py)
    cfg = family.config_from(ckpt["config"])
    model, diffusion = family.build(cfg)

Nothing to run here.
"""
import dataclasses
from typing import Callable, NamedTuple

import diffusion
import dit
import train_dit
import train_ldm
import unet


class Family(NamedTuple):
    script: str            # the train script that trains it
    config: type           # its config dataclass (config.TrainConfig + the model's fields)
    presets: dict          # the paper's recipes, by name
    resolve: Callable      # cfg -> the checked config, 'auto' decided
    build_model: Callable  # cfg -> the denoiser nn.Module (model(x, t, y), model.cond its condition encoder)

    def build(self, cfg) -> tuple:
        """(model, diffusion) of a resolved config; the diffusion is built alike for every family."""
        return self.build_model(cfg), diffusion.from_config(cfg)

    def config_from(self, stored: dict):
        """The config stored in a checkpoint as this family's dataclass (keys it does not know are ignored)."""
        names = {f.name for f in dataclasses.fields(self.config)}
        return self.config(**{k: v for k, v in stored.items() if k in names})


FAMILIES = {
    "dit": Family("train_dit.py", train_dit.DiTConfig, train_dit.PRESETS, train_dit.resolve, dit.from_config),
    "ldm": Family("train_ldm.py", train_ldm.LDMConfig, train_ldm.PRESETS, train_ldm.resolve, unet.from_config),
}
