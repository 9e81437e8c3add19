"""
pretrained.py: released diffusion weights -> nanoCEP's own modules (the DiT of dit.py, the LDM U-Net of unet.py,
the autoencoders of vae.py). No diffusers, timm or Lightning at run time: each foreign layout is a key map.

Sources:
  official DiT    DiT-XL-2-256x256.pt / -512x512.pt: a raw EMA state dict, or a DiT train.py dict with "ema"
  paper DiT-XL/2  DiffusionNoise/dit-xl-2_imagenet_*   diffusers DiTPipeline: transformer/ vae/ scheduler/
  paper LDM-4     DiffusionNoise/ldm_in1k_*            LDMClassToImagePipeline: unet/ class_embedder/ vqvae/ scheduler/
  CompVis LDM-4   cin256-v2 model.ckpt                 Lightning: model.diffusion_model.*, first_stage_model.*, ...
  paper CC3M LDMs DiffusionNoise/ldm_cc3m_*            refused in one line: their BERT text encoder is not implemented
A source is a local file or folder, an http(s):// or file:// URL, a Hugging Face repo id ("repo@revision" picks a
revision; fetched by huggingface_hub into its cache: HF_HUB_OFFLINE, HF_TOKEN, HF_ENDPOINT, HF_HUB_CACHE apply, see
sources/download.py) or a short name of RELEASES. Other URLs are cached in $NANOCEP_CACHE/pretrained/url.

    from weights import pretrained
    p = pretrained.load_pretrained("DiffusionNoise/dit-xl-2_imagenet_clean")
    eps = p["model"](x, t, y)                       # our DiT / LDM, eval mode
    images = p["vae"].decode(z)                     # [-1, 1]
    p["betas"], p["null_class"], p["config"]        # schedule, CFG null label, sampling conventions

Fine-tuning (train_dit.py / train_ldm.py --init-from SOURCE) goes through init_weights (config + weights) and
load_init (the class table re-initialised when the class count differs); SOURCE may also be a nanoCEP checkpoint.

Run:
    python -m weights.pretrained SOURCE                     # fetch if needed, load, print a summary
    python evaluate.py --pretrained SOURCE --cfg-scales 1.75 --ref REF   # the paper's 50K protocol
"""
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from config import OPTIMISER_FIELDS                   # the recipe a fine-tuning run takes from SOURCE
from plumbing import common
from sources.download import download as checked_download, hub_file, hub_location
from weights import vae as vae_lib

# ---- known releases ----


@dataclass(frozen=True)
class Release:
    url: str                      # one file
    about: str
    sha256: str | None = None     # checked when known; none of these publishes one, so none is filled in


RELEASES = {
    "DiT-XL-2-256": Release("https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt",
                            "official DiT-XL/2, 256px, EMA weights (DiT paper FID-50K 2.27)"),
    "DiT-XL-2-512": Release("https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt",
                            "official DiT-XL/2, 512px, EMA weights (DiT paper FID-50K 3.04)"),
    "cin256-v2": Release("https://ommer-lab.com/files/latent-diffusion/nitro/cin/model.ckpt",
                         "CompVis LDM-4 class-conditional ImageNet 256px (Lightning checkpoint, ~1.7 GB)"),
}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")   # in a diffusers component
TEXT_MODEL_ERROR = ("is a text-to-image LDM (the paper's CC3M models): its text encoder is a pre-trained "
                    "bert-base-uncased with a WordPiece tokenizer, which nanoCEP does not implement; "
                    "only the class-conditional releases load")
# diffusers pipeline class -> what nanoCEP reads from it (folders in a repo)
PIPELINES = {"DiTPipeline": ("dit", ("transformer", "vae", "scheduler")),
             "LDMClassToImagePipeline": ("ldm", ("unet", "class_embedder", "vqvae", "scheduler")),
             "LDMClasstoImagePipeline": ("ldm", ("unet", "class_embedder", "vqvae", "scheduler"))}  # the fork's typo

# ---- fetching: URLs and Hugging Face repos into the cache ----


def cache_dir(root=None) -> Path:
    """Where URL downloads go: $NANOCEP_CACHE (or ~/.cache/nanocep) / pretrained."""
    return common.cache_root(root) / "pretrained"


def fetch_url(url, root=None, sha256=None) -> Path:
    """The cached copy of a one-file URL (downloaded on first use); a huggingface.co file comes through the Hub's
    cache."""
    if (hub := hub_location(url)) is not None:
        repo_id, revision, filename = hub
        return hub_file(repo_id, filename, revision, vae_lib.hub_cache(root), sha256)
    name = re.sub(r"[^\w.-]", "_", url.split("://", 1)[-1])[-150:]
    dest = cache_dir(root) / "url" / name
    return dest if dest.is_file() else checked_download(url, dest, sha256)


def fetch_hf_repo(repo_id, revision="main", root=None) -> Path:
    """Fetch the files nanoCEP reads from a diffusers pipeline repo (model_index.json first, then the configs and
    weights of the components it needs, .safetensors or else .bin) into the Hub's cache and return the snapshot
    folder. model_index.json pins the revision's commit, so every file comes from the same one."""
    if "ldm_cc3m" in repo_id.lower():                     # refuse before fetching gigabytes
        raise ValueError(f"{repo_id} {TEXT_MODEL_ERROR}")
    cache = vae_lib.hub_cache(root)
    try:
        index = hub_file(repo_id, "model_index.json", revision, cache)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (is this a diffusers pipeline repo?)") from None
    folder = index.parent                                  # snapshots/<commit>/

    def get(name, required=True):
        try:
            return hub_file(repo_id, name, folder.name, cache)
        except (FileNotFoundError, ConnectionError):       # absent, or offline and not cached
            if required:
                raise
            return None

    _, components = pipeline_kind(json.loads(index.read_text()), repo_id)
    for comp in components:
        if comp == "scheduler":
            get("scheduler/scheduler_config.json", required=False)
            continue
        get(f"{comp}/config.json")
        if get(f"{comp}/{WEIGHT_FILES[0]}", required=False) is None:
            get(f"{comp}/{WEIGHT_FILES[1]}")
    return folder


def resolve(source, root=None, sha256=None) -> Path:
    """A local path for any kind of source (see the module docstring)."""
    source = str(source)
    if Path(source).exists():
        return Path(source)
    if source in RELEASES:
        r = RELEASES[source]
        return fetch_url(r.url, root, sha256 or r.sha256)
    if re.match(r"^(https?|file)://", source):
        return fetch_url(source, root, sha256)
    m = re.fullmatch(r"([\w.-]+/[\w.-]+)(?:@([\w./-]+))?", source)
    if m and not source.endswith((".pt", ".ckpt", ".bin", ".safetensors", ".pth")):
        return fetch_hf_repo(m[1], m[2] or "main", root)
    raise FileNotFoundError(f"pretrained source not found: {source} (a path, a URL, a Hugging Face repo id "
                            f"or one of {', '.join(RELEASES)})")


# ---- reading weight files (tensors only, never arbitrary unpickling) ----


def read_weights(path) -> dict:
    """A weights file -> {name: tensor}. safetensors, or a torch file read by vae.py's tensors-only loader.
    Unwraps a DiT train.py checkpoint ("ema") and a Lightning checkpoint ("state_dict")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    try:
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":        # torch zip, or a legacy raw pickle
            obj = vae_lib.load_tensors_only(path)
        elif len(head) >= 9 and head[8:9] == b"{":                  # safetensors: u64 header size, then JSON
            from safetensors.torch import load_file
            obj = load_file(str(path), device="cpu")
        else:
            raise ValueError("empty file" if not head else "neither a safetensors nor a torch file")
    except ValueError as e:
        raise ValueError(f"{path}: cannot read weights ({e})") from None
    except Exception as e:                                          # each format has its own errors for a bad file
        msg = (str(e).strip().splitlines() or [""])[0][:150]
        raise ValueError(f"{path}: cannot read weights, file truncated or corrupt ({type(e).__name__}: {msg})") from None
    if isinstance(obj, dict) and "kind" in obj and "config" in obj:
        raise ValueError(f"{path} is a nanoCEP checkpoint: evaluate it as `evaluate.py {path}`, not --pretrained")
    if isinstance(obj, dict):
        for wrapper in ("ema", "state_dict"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors")
    return {k: (v.float() if v.is_floating_point() else v) for k, v in obj.items()}


def read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None


def component_weights(folder) -> Path:
    """The weights file of a diffusers component folder."""
    for name in WEIGHT_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise FileNotFoundError(f"{folder}: no diffusion_pytorch_model.safetensors/.bin")


def load_strict(model, sd, what):
    """model.load_state_dict(sd, strict=True, assign=True) (the model may live on the meta device), one-line errors."""
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own.keys() & sd.keys()
              if sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def few(names):
            return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")
        parts = [f"{name}: {few(keys)}" for name, keys in (("missing", missing), ("unexpected", unexpected),
                                                           ("shape mismatch, file vs model", shapes)) if keys]
        raise ValueError(f"{what}: weights do not fit the model ({'; '.join(parts)})")
    model.load_state_dict(sd, strict=True, assign=True)
    return model


# ---- DiT: the official layout (facebookresearch/DiT models.py names = dit.py names) ----


def dit_architecture(sd, num_heads=None) -> tuple:
    """(DiT constructor kwargs, registry name or None) read off an official-layout state dict. The head count is not
    in the shapes: it comes from dit.SIZES (depth, width) or from num_heads."""
    from models.dit import SIZES
    need = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight",
            "blocks.0.mlp.fc1.weight")
    if any(k not in sd for k in need):
        raise ValueError(f"not an official-layout DiT (missing {', '.join(k for k in need if k not in sd)})")
    hidden, in_ch, patch = sd["x_embedder.proj.weight"].shape[:3]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    grid = math.isqrt(sd["pos_embed"].shape[1])
    out_ch = sd["final_layer.linear.weight"].shape[0] // patch ** 2
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"DiT output has {out_ch} channels for {in_ch} input channels (expected x1 or x2)")
    size = next((s for s, v in SIZES.items() if (v["depth"], v["hidden_size"]) == (depth, hidden)), None)
    heads = num_heads or (SIZES[size]["num_heads"] if size else None)
    if heads is None:
        raise ValueError(f"DiT of depth {depth} and width {hidden} is not a known size: pass num_heads")
    kwargs = dict(input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth,
                  num_heads=heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                  num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,   # the last row is the null class
                  learn_sigma=out_ch == 2 * in_ch)
    named = size is not None and heads == SIZES[size]["num_heads"] and kwargs["mlp_ratio"] == 4.0
    return kwargs, (f"DiT-{size}/{patch}" if named else None)


def build_dit(sd, num_heads=None, what="DiT"):
    """Our DiT with these official-layout weights, loaded strictly (built on the meta device: no init cost)."""
    from models.dit import DiT, DiT_models
    kwargs, name = dit_architecture(sd, num_heads)
    with torch.device("meta"):
        model = DiT_models[name](**{k: kwargs[k] for k in ("input_size", "in_channels", "num_classes", "learn_sigma")}) \
            if name else DiT(**kwargs)
    return load_strict(model, sd, what), name or f"DiT-custom-d{kwargs['depth']}-w{kwargs['hidden_size']}", kwargs


# ---- DiT: diffusers Transformer2DModel / DiTTransformer2DModel -> the official layout ----

DIT_EMBEDDERS = {"timestep_embedder.linear_1": "t_embedder.mlp.0", "timestep_embedder.linear_2": "t_embedder.mlp.2",
                 "class_embedder.embedding_table": "y_embedder.embedding_table"}
DIT_BLOCK = {"norm1.linear": "adaLN_modulation.1", "attn1.to_out.0": "attn.proj", "ff.net.0.proj": "mlp.fc1",
             "ff.net.2": "mlp.fc2"}


def dit_from_diffusers(sd, config) -> dict:
    """diffusers DiT weights -> official names: q/k/v concatenated into qkv, the per-block copies of the t/y embedders
    collapsed into one (they must be identical), the final layer from proj_out_1/2, and the fixed sin-cos pos_embed
    (a non-persistent buffer in diffusers) recomputed."""
    from models.dit import sincos_pos_embed_2d
    cls = config.get("_class_name", "DiTTransformer2DModel")
    if cls not in ("Transformer2DModel", "DiTTransformer2DModel") or config.get("norm_type") not in (None, "ada_norm_zero"):
        raise ValueError(f"not a diffusers DiT transformer: {cls} with norm_type {config.get('norm_type')}")
    size, patch = config.get("sample_size", 32), config.get("patch_size", 2)
    scale = (config.get("interpolation_scale") or max(size // 64, 1)) if cls == "Transformer2DModel" else 1
    if scale != 1 or config.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        raise ValueError(f"unsupported diffusers DiT config (interpolation_scale {scale}, {config.get('activation_fn')})")
    sd, out = dict(sd), {}

    def take(key):
        if key not in sd:
            raise ValueError(f"not a diffusers DiT transformer: no {key}")
        return sd.pop(key)

    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    for suffix in ("weight", "bias"):
        out[f"x_embedder.proj.{suffix}"] = take(f"pos_embed.proj.{suffix}")
        for theirs, ours in DIT_EMBEDDERS.items():
            if theirs.endswith("embedding_table") and suffix == "bias":
                continue
            copies = [take(f"transformer_blocks.{i}.norm1.emb.{theirs}.{suffix}") for i in blocks]
            for i, c in zip(blocks, copies):
                if not torch.equal(c, copies[0]):
                    raise ValueError(f"block {i}'s {theirs}.{suffix} differs from block 0's: this DiT has per-block "
                                     "t/y embedders (trained in diffusers), but nanoCEP's DiT shares one")
            out[f"{ours}.{suffix}"] = copies[0]
        for i in blocks:
            p = f"transformer_blocks.{i}."
            out[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat([take(f"{p}attn1.to_{n}.{suffix}") for n in "qkv"])
            for theirs, ours in DIT_BLOCK.items():
                out[f"blocks.{i}.{ours}.{suffix}"] = take(f"{p}{theirs}.{suffix}")
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = take(f"proj_out_1.{suffix}")
        out[f"final_layer.linear.{suffix}"] = take(f"proj_out_2.{suffix}")
    sd.pop("pos_embed.pos_embed", None)                     # only in files saved with a persistent buffer
    if sd:
        raise ValueError(f"not a diffusers DiT transformer: unexpected keys {', '.join(sorted(sd)[:3])}")
    dim = out["x_embedder.proj.weight"].shape[0]
    out["pos_embed"] = sincos_pos_embed_2d(dim, size // patch)[None]    # (1, T, D)
    return out


# ---- LDM: diffusers UNet2DConditionModel -> CompVis names (unet.py's UNetModel) ----

RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_to_compvis(sd) -> dict:
    """Rename diffusers U-Net keys to CompVis openaimodel keys (the inverse of diffusers' convert_ldm_unet_checkpoint).
    With n ResNets per down level, CompVis input_blocks number 1 + level*(n+1) + j, the downsampler last; output_blocks
    number level*(n+1) + j (n+1 ResNets per up level) with the upsampler after the attention (sub-index 2) or alone (1)."""
    n = len({k.split(".")[3] for k in sd if k.startswith("down_blocks.0.resnets.")})
    up_attn = {int(k.split(".")[1]) for k in sd if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    rules = [
        (r"conv_in\.", lambda m: "input_blocks.0.0."),
        (r"time_embedding\.linear_([12])\.", lambda m: f"time_embed.{2 * int(m[1]) - 2}."),
        (r"conv_norm_out\.", lambda m: "out.0."),
        (r"conv_out\.", lambda m: "out.2."),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"input_blocks.{1 + int(m[1]) * (n + 1) + int(m[2])}.0."),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: f"input_blocks.{1 + int(m[1]) * (n + 1) + int(m[2])}.1."),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda m: f"input_blocks.{1 + int(m[1]) * (n + 1) + n}.0.op."),
        (r"mid_block\.resnets\.([01])\.", lambda m: f"middle_block.{2 * int(m[1])}."),
        (r"mid_block\.attentions\.0\.", lambda m: "middle_block.1."),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"output_blocks.{int(m[1]) * (n + 1) + int(m[2])}.0."),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: f"output_blocks.{int(m[1]) * (n + 1) + int(m[2])}.1."),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"output_blocks.{int(m[1]) * (n + 1) + n}."
                                                        f"{2 if int(m[1]) in up_attn else 1}."),
    ]
    out = {}
    for key, value in sd.items():
        for pattern, prefix in rules:
            m = re.match(pattern, key)
            if m:
                rest = key[m.end():]
                if "resnets" in pattern:
                    head, _, tail = rest.partition(".")
                    rest = f"{RESNET_NAMES.get(head, head)}.{tail}"
                out[prefix(m) + rest] = value
                break
        else:
            raise ValueError(f"not a diffusers UNet2DConditionModel: unexpected key {key}")
    return out


def unet_architecture(sd, num_heads=1) -> dict:
    """unet.UNetModel kwargs read off CompVis-layout U-Net weights (heads are not in the shapes: num_heads)."""
    if "input_blocks.0.0.weight" not in sd or "out.2.weight" not in sd:
        raise ValueError("not a CompVis-layout U-Net (no input_blocks.0.0 / out.2)")
    mc, in_ch = sd["input_blocks.0.0.weight"].shape[:2]
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("input_blocks.")})[1:]
    levels, widths, attn = [[]], [], set()
    for i in blocks:                                       # split the input blocks into levels at the downsamplers
        if f"input_blocks.{i}.0.op.weight" in sd:
            levels.append([])
            continue
        levels[-1].append(i)
        if f"input_blocks.{i}.1.norm.weight" in sd:
            attn.add(2 ** (len(levels) - 1))
    widths = [sd[f"input_blocks.{lv[0]}.0.in_layers.2.weight"].shape[0] for lv in levels]
    to_k = [v for k, v in sd.items() if k.endswith("attn2.to_k.weight")]
    depth = len({k.split(".")[3] for k in sd if k.startswith("middle_block.1.transformer_blocks.")})
    if any(w % mc for w in widths) or not to_k:
        raise ValueError("unsupported U-Net layout (level widths not multiples of the base width, or no cross-attention)")
    return dict(in_channels=in_ch, model_channels=mc, out_channels=sd["out.2.weight"].shape[0],
                num_res_blocks=len(levels[0]), attention_resolutions=tuple(sorted(attn, reverse=True)),
                channel_mult=tuple(w // mc for w in widths), num_heads=num_heads, transformer_depth=depth,
                context_dim=to_k[0].shape[1])


def build_ldm(unet_sd, class_table, num_heads=1, what="LDM"):
    """unet.LDM with these CompVis-layout U-Net weights and class table (last row = the null class)."""
    from models.encoders import build_condition_encoder
    from models.unet import LDM, UNetModel
    kwargs = unet_architecture(unet_sd, num_heads)
    if class_table.ndim != 2 or class_table.shape[1] != kwargs["context_dim"]:
        raise ValueError(f"{what}: class table {tuple(class_table.shape)} does not fit context dim {kwargs['context_dim']}")
    with torch.device("meta"):
        model = LDM(UNetModel(**kwargs), build_condition_encoder("class", kwargs["context_dim"],
                                                                 num_classes=class_table.shape[0] - 1))
    sd = {f"diffusion_model.{k}": v for k, v in unet_sd.items()}
    sd["cond_stage_model.embedding_table.weight"] = class_table
    return load_strict(model, sd, what), kwargs


def check_unet_config(config):
    """Refuse diffusers U-Net options that unet.UNetModel does not reproduce."""
    expected = {"flip_sin_to_cos": True, "freq_shift": 0, "norm_num_groups": 32, "class_embed_type": None,
                "addition_embed_type": None, "time_embedding_type": "positional", "resnet_time_scale_shift": "default",
                "center_input_sample": False, "only_cross_attention": False, "dual_cross_attention": False}
    bad = [f"{k}={config[k]!r}" for k, v in expected.items() if k in config and config[k] != v]
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)   # diffusers' legacy misnomer
    if isinstance(heads, list) and len(set(heads)) == 1:
        heads = heads[0]
    if bad or isinstance(heads, list):
        raise ValueError(f"unsupported U-Net config: {', '.join(bad) or f'heads per level {heads}'}")
    return heads


# ---- schedulers: betas and DPM-Solver++ timesteps exactly as diffusers derives them from a saved config ----

DPM_DEFAULTS = {"prediction_type": "epsilon", "thresholding": False, "use_karras_sigmas": False,
                "use_lu_lambdas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                "rescale_betas_zero_snr": False, "algorithm_type": "dpmsolver++", "solver_order": 2,
                "final_sigmas_type": "zero"}   # variance_type is free: DDPM saves "fixed_small", DPM only drops sigma


def scheduler_betas(config, default="linear") -> torch.Tensor:
    """(T,) float64 betas: trained_betas if present, else the config's beta_schedule; with no schedule in the config
    at all, `default` ("linear" = DiT's 1e-4..0.02, "scaled_linear" = LDM's 0.0015..0.0195)."""
    bad = [f"{k}={config[k]!r}" for k, v in DPM_DEFAULTS.items() if config.get(k, v) != v]
    if bad:
        raise ValueError(f"scheduler option(s) {', '.join(bad)} are not reproduced by nanoCEP's DPM-Solver++")
    if config.get("trained_betas") is not None and len(config["trained_betas"]):
        return torch.tensor(np.asarray(config["trained_betas"]), dtype=torch.float64)
    name = config.get("beta_schedule") or default
    start, end = (1e-4, 0.02) if "beta_schedule" in config or name == "linear" else (0.0015, 0.0195)
    start, end, steps = config.get("beta_start", start), config.get("beta_end", end), config.get("num_train_timesteps", 1000)
    if name == "linear":
        return torch.linspace(start, end, steps, dtype=torch.float64)
    if name == "scaled_linear":
        return torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
    raise ValueError(f"unsupported beta_schedule {name!r} (linear, scaled_linear or trained_betas)")


def dpm_timesteps(config, steps) -> list:
    """The timesteps of DPMSolverMultistepScheduler.from_config(config).set_timesteps(steps): keys saved in the config
    (timestep_spacing, steps_offset, num_train_timesteps) win over DPM's defaults (linspace, 0, 1000)."""
    T, spacing, offset = config.get("num_train_timesteps", 1000), config.get("timestep_spacing", "linspace"), \
        config.get("steps_offset", 0)
    if not 1 <= steps < T:
        raise ValueError(f"steps must be between 1 and {T - 1}, got {steps}")
    if spacing == "linspace":
        t = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        t = (np.arange(steps + 1) * (T // (steps + 1))).round()[::-1][:-1] + offset
    elif spacing == "trailing":
        t = np.arange(T, 0, -T / steps).round() - 1
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}")
    return [int(x) for x in t]


# ---- load_pretrained ----


def pipeline_kind(index, name="") -> tuple:
    """("dit" | "ldm", component folders) of a diffusers model_index.json; text pipelines are refused."""
    cls = index.get("_class_name", "")
    if "Text" in cls or "bert" in index or "tokenizer" in index:
        raise ValueError(f"{name or cls} {TEXT_MODEL_ERROR}")
    if cls not in PIPELINES:
        raise ValueError(f"{name}: unsupported diffusers pipeline {cls!r} (expected {', '.join(sorted(PIPELINES))})")
    return PIPELINES[cls]


def _dit_folder(path, name, numerics, num_heads):
    """The paper's DiT-XL/2 releases (DiTPipeline): transformer/ -> our DiT, with diffusers' numerics by default."""
    conf = read_json(path / "transformer" / "config.json")
    sd = dit_from_diffusers(read_weights(component_weights(path / "transformer")), conf)
    names = read_json(path / "model_index.json").get("id2label") if (path / "model_index.json").is_file() else None
    if names:
        sd = trim_padded_classes(sd, len(names))
    model, model_name, arch = build_dit(sd, num_heads or conf.get("num_attention_heads"), f"{name} transformer")
    if numerics != "dit":
        from models.dit import set_numerics
        set_numerics(model, 1.0, conf.get("norm_eps", 1e-5))
    info = dict(format="diffusers-dit", name=model_name, numerics="dit" if numerics == "dit" else "diffusers",
                latent_size=arch["input_size"], learn_sigma=arch["learn_sigma"], in_channels=arch["in_channels"])
    # DiTPipeline: null label = 1000 = num_classes, CFG on every latent channel, latents / vae scaling_factor
    vae_conf = path / "vae" / "config.json"
    scale = float(read_json(vae_conf).get("scaling_factor", 0.18215)) if vae_conf.is_file() else 0.18215
    return model, arch["num_classes"], None, info, ("kl-f8", path / "vae", scale), "linear"


def trim_padded_classes(sd, num_classes):
    """A DiTPipeline table padded to 1001 rows (weights/export_diffusers.py: K classes, then the null row repeated so
    DiTPipeline's null label 1000 works) back to K + 1 rows, when id2label names K classes and rows K.. are all equal."""
    table = sd["y_embedder.embedding_table.weight"]                    # (1001, D)
    if num_classes < table.shape[0] - 1 and bool((table[num_classes:] == table[-1]).all()):
        sd = {**sd, "y_embedder.embedding_table.weight": table[: num_classes + 1].clone()}
    return sd


def _ldm_folder(path, name, num_heads):
    """The paper's LDM-4 IN-1K releases (LDMClassToImagePipeline): unet/ + class_embedder/ -> unet.LDM."""
    uconf = read_json(path / "unet" / "config.json")
    heads = num_heads or check_unet_config(uconf)
    table = read_weights(component_weights(path / "class_embedder"))
    if "embedding.weight" not in table:
        raise ValueError(f"{name}: class_embedder has no embedding.weight")
    table = table["embedding.weight"]                                   # (n_classes, context_dim)
    n_classes = read_json(path / "class_embedder" / "config.json").get("n_classes", table.shape[0])
    if n_classes != table.shape[0]:
        raise ValueError(f"{name}: class_embedder config says {n_classes} classes, its weights hold {table.shape[0]}")
    model, arch = build_ldm(unet_to_compvis(read_weights(component_weights(path / "unet"))), table, heads,
                            f"{name} unet")
    info = dict(format="diffusers-ldm", name="LDM-4", latent_size=uconf.get("sample_size", 64),
                learn_sigma=arch["out_channels"] == 2 * arch["in_channels"], in_channels=arch["in_channels"])
    # the class pipeline: null = n_classes - 1, no latent rescaling before decoding (that line is commented out)
    return model, table.shape[0] - 1, None, info, ("vq-f4", path / "vqvae", 1.0), "scaled_linear"


def _compvis_ldm(sd, path, name, num_heads, with_vae, vae_path):
    """The CompVis cin256-v2 Lightning checkpoint: U-Net, class table (row 1000 = null) and VQ first stage inside."""
    prefix = "model.diffusion_model."
    if "cond_stage_model.embedding.weight" not in sd:
        raise ValueError(f"{name}: a CompVis LDM without a class embedder (a text or unconditional model)")
    table = sd["cond_stage_model.embedding.weight"]
    model, arch = build_ldm({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, table,
                            num_heads or 1, name)
    info = dict(format="compvis-ldm", name="LDM-4", latent_size=64,   # cin256-v2: image_size 64 (not in the weights)
                learn_sigma=arch["out_channels"] == 2 * arch["in_channels"], in_channels=arch["in_channels"])
    betas = sd["betas"].double() if "betas" in sd else scheduler_betas({}, "scaled_linear")
    # vae.py reads the first_stage_model.* tensors of the same file (its widths off their shapes)
    ae = vae_lib.load_vae("vq-f4", vae_path or path) if with_vae else None
    return model, table.shape[0] - 1, ae, betas, info


def load_pretrained(source, *, root=None, sha256=None, with_vae=True, vae_path=None, guide_channels="auto",
                    numerics="auto", num_heads=None) -> dict:
    """Load a released model into nanoCEP modules: dict(model, vae, betas, null_class, config).

    guide_channels: latent channels CFG guides; "auto" = what the releasing code does (official DiT: 3, its
    forward_with_cfg; the diffusers pipelines: all), None/0 = all. numerics (diffusers DiT only): "diffusers" (the
    default: timestep frequency shift 1 and the config's MLP LayerNorm eps, so outputs match the released pipeline)
    or "dit". with_vae=False skips the autoencoder; vae_path replaces it (the official DiT ships none and otherwise
    downloads sd-vae-ft-mse, as DiT's sample.py). num_heads: for weights whose head count is not in their shapes
    (default: DiT's size table; 1 for CompVis U-Nets, as cin256-v2)."""
    path = resolve(source, root, sha256)
    name = str(source)
    cfg = {"source": name, "path": str(path), "scheduler": {}}
    ae = None
    if path.is_dir():
        if (path / "model_index.json").is_file():
            kind = pipeline_kind(read_json(path / "model_index.json"), name)[0]
        elif (path / "bert").is_dir() or (path / "tokenizer").is_dir():
            raise ValueError(f"{name} {TEXT_MODEL_ERROR}")
        else:
            kind = "dit" if (path / "transformer").is_dir() else "ldm" if (path / "unet").is_dir() else None
        if kind is None:
            raise ValueError(f"{name}: not a diffusers pipeline folder (no model_index.json, transformer/ or unet/)")
        sched = path / "scheduler" / "scheduler_config.json"
        cfg["scheduler"] = read_json(sched) if sched.is_file() else {}
        model, null, guide, info, (vae_kind, vae_dir, scale), default_betas = \
            _dit_folder(path, name, numerics, num_heads) if kind == "dit" else _ldm_folder(path, name, num_heads)
        betas = scheduler_betas(cfg["scheduler"], default_betas)
        if with_vae:
            ae = vae_lib.load_vae(vae_kind, vae_path or vae_dir)
            if vae_path is None:
                ae.scale_factor = scale
    else:
        sd = read_weights(path)
        if any(k.startswith("model.diffusion_model.") for k in sd):
            kind, vae_kind, guide = "ldm", "vq-f4", None
            model, null, ae, betas, info = _compvis_ldm(sd, path, name, num_heads, with_vae, vae_path)
        elif "x_embedder.proj.weight" in sd or "blocks.0.attn.qkv.weight" in sd:
            kind, vae_kind, guide = "dit", "kl-f8", 3
            model, model_name, arch = build_dit(sd, num_heads, name)
            info = dict(format="official-dit", name=model_name, numerics="dit", latent_size=arch["input_size"],
                        learn_sigma=arch["learn_sigma"], in_channels=arch["in_channels"])
            null, betas = arch["num_classes"], scheduler_betas({}, "linear")
            ae = vae_lib.load_vae("kl-f8", vae_path, weights="kl-f8-mse") if with_vae else None
        elif any(k.startswith("transformer_blocks.0.norm1.emb.") for k in sd):
            raise ValueError(f"{name}: a diffusers DiT transformer file alone; pass its pipeline folder (with "
                             "transformer/config.json, vae/ and scheduler/)")
        elif any(k.startswith(("encoder.", "decoder.", "quantize.")) for k in sd):
            raise ValueError(f"{name}: an autoencoder, not a diffusion model; pass it as the VAE (--vae-path)")
        else:
            raise ValueError(f"{name}: unrecognised checkpoint (no DiT, diffusers or CompVis LDM keys)")
    if guide_channels != "auto":
        guide = guide_channels or None
    cfg.update(kind=kind, vae=vae_kind, num_classes=int(null), guide_channels=guide, **info)
    return {"model": model.eval(), "vae": ae, "betas": betas, "null_class": int(null), "config": cfg}


# ---- fine-tuning: train_dit.py / train_ldm.py --init-from SOURCE ----

SCRIPTS = {"dit": "train_dit", "ldm": "train_ldm"}                 # kind -> the script that fine-tunes it (messages)
CLASS_TABLES = ("y_embedder.embedding_table.weight", "cond_stage_model.embedding_table.weight")   # DiT, LDM


def init_weights(source, cfg, kind, explicit=(), recipe=None, chosen=()):
    """(cfg, state_dict, note) to fine-tune from SOURCE: a release load_pretrained reads, or a nanoCEP checkpoint.

    The returned config holds the architecture and numerics SOURCE needs (its architecture fields; for releases the
    model size, image size, autoencoder, schedule, learned sigma and DiT numerics), and the path of its autoencoder if
    --vae-path was not given. A field in `explicit` (flags given on the command line) that contradicts SOURCE is a
    ValueError. num_classes stays the run's own: load_init re-initialises the class table when it differs. The weights
    are SOURCE's EMA where it has them, in our key layout; optimizer and step are not taken (a fresh run).

    The optimiser recipe (OPTIMISER_FIELDS) fits SOURCE too, not the tiny CPU default: a checkpoint's own stored
    values, or for a release recipe = (name, preset), the train script's preset for that release (e.g. dit-xl2-in1k:
    lr 1e-4, no clipping, EMA 0.9999, batch 256). Flags given explicitly win over it, and so do the fields in `chosen`
    (those a --preset named on the command line sets: a recipe chosen on purpose, e.g. builtin-controlnet's)."""
    import dataclasses
    ckpt = _nanocep_checkpoint(source)
    fields, soft, sd, what = (_checkpoint_fields(ckpt, source, kind, cfg) if ckpt is not None
                              else _release_fields(source, kind, cfg))
    for name, value in fields.items():
        if name in explicit and getattr(cfg, name) != value:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"--init-from {source} needs {flag} {value} ({what}), but {flag} "
                             f"{getattr(cfg, name)} was given; drop the flag")
    soft = {k: v for k, v in soft.items() if k not in explicit and not getattr(cfg, k)}
    origin, optim = _optimiser_recipe(ckpt, recipe)
    optim = {k: v for k, v in optim.items() if k not in explicit and k not in chosen}
    cfg = dataclasses.replace(cfg, **fields, **soft, **optim)
    settings = ", ".join(f"{k}={v}" for k, v in fields.items())
    given = [k for k in OPTIMISER_FIELDS if k in explicit or k in chosen]
    optimiser = (f"optimiser {origin}" + (f" (flags or --preset given: {', '.join(given)})" if given else "") + ": "
                 + ", ".join(f"{k}={_number_or_word(getattr(cfg, k))}" for k in OPTIMISER_FIELDS))
    return cfg, sd, f"init from {source}: {what}; {settings}; {optimiser}; optimizer state and step start fresh"


def _number_or_word(value) -> str:
    """A recipe value as the init note prints it: numbers with :g (4e-3, not 0.004), words as they are."""
    return value if isinstance(value, str) else f"{value:g}"


def init_from(cfg, kind, argv=None, recipe=None, presets=None):
    """--init-from SOURCE for a train script: (the config with SOURCE's architecture, numerics and optimiser recipe,
    init), where init(model) -> note loads SOURCE's weights into the fresh model; (cfg, None) without the flag. Flags
    given on the command line that contradict SOURCE are an error; recipe = (preset name, preset) for releases
    (init_weights); a --preset of `presets` named on the command line keeps its own optimiser fields."""
    if not cfg.init_from:
        return cfg, None
    from config import explicit_fields, preset_fields
    cfg, sd, note = init_weights(cfg.init_from, cfg, kind, explicit_fields(argv), recipe, preset_fields(argv, presets))
    def init(model):
        base = getattr(model, "base", model)             # a ControlNet (models/controlnet.py): SOURCE is its base
        loaded = note + "; " + load_init(base, sd, frozen=base is not model, source=cfg.init_from)
        if base is not model:
            model.init_control_from_base()               # ControlNet's init: the branch copies the loaded base
            loaded += "; base frozen, control branch copied from it"
        return loaded
    return cfg, init


def _optimiser_recipe(ckpt, recipe) -> tuple[str, dict]:
    """(where it comes from, {field: value}) of the optimiser a fine-tuning run takes: a nanoCEP checkpoint's own
    stored fields (it was trained with them), else the release's preset (recipe = (name, preset)), else nothing."""
    if ckpt is not None:
        from config import stored_config                 # a field it predates: the value it was trained with
        stored = stored_config(ckpt["config"])
        return "the checkpoint's own", {k: stored[k] for k in OPTIMISER_FIELDS if k in stored}
    if recipe is not None:
        name, preset = recipe
        return f"the {name} preset's", {k: preset[k] for k in OPTIMISER_FIELDS if k in preset}   # else the default
    return "the run's", {}


def load_init(model, sd, frozen: bool = False, source: str = "SOURCE") -> str:
    """Load init_weights' state dict into the freshly built model; a class table of another size (--num-classes
    differs from SOURCE's) keeps its fresh initialisation. Returns a note on the class table for the log.
    frozen (a ControlNet's base, which never trains): a class table of another size is a ValueError instead."""
    own = model.state_dict()
    table = next((k for k in CLASS_TABLES if k in own and k in sd), None)
    note = f"class table loaded ({sd[table].shape[0]} rows)" if table else "no class table"
    if table and sd[table].shape != own[table].shape:
        if frozen:
            raise ValueError(f"--control over {source}: the frozen base has {sd[table].shape[0]} class rows, this run "
                             f"{own[table].shape[0]} (its data's classes and the CFG null row); give the data the "
                             f"base's labels (--class-index FILE, e.g. ImageNet's LOC_synset_mapping.txt for IN-100 "
                             f"folders over an IN-1K base)")
        note = (f"class table re-initialised: SOURCE has {sd[table].shape[0]} rows, this run "
                f"{own[table].shape[0]} (--num-classes and the CFG null row)")
        sd = {**sd, table: own[table]}
    load_strict(model, {k: v.to(own[k].dtype) if k in own else v for k, v in sd.items()}, "--init-from")
    return note


def _nanocep_checkpoint(source):
    """SOURCE's checkpoint dict if it is a nanoCEP checkpoint file, else None (mmap: a release is not read twice)."""
    if not Path(str(source)).is_file():
        return None
    try:
        obj = torch.load(str(source), map_location="cpu", weights_only=True, mmap=True)
    except Exception:                                   # not a zip-format torch file: a release, or unreadable
        return None
    return obj if isinstance(obj, dict) and "kind" in obj and "config" in obj and "ema" in obj else None


def _checkpoint_fields(ckpt, source, kind, cfg):
    """A nanoCEP checkpoint: its architecture fields (not num_classes) and its EMA weights."""
    if ckpt["kind"] != kind:
        raise ValueError(f"{source} is a {ckpt['kind']!r} checkpoint: fine-tune it with {SCRIPTS[ckpt['kind']]}.py")
    from config import arch_fields, control_fields, stored_config
    theirs = stored_config(ckpt["config"])
    if theirs.get("control", "none") != "none":
        raise ValueError(f"{source} is a ControlNet checkpoint (--control {theirs['control']}): --init-from takes the "
                         "base it was trained on")
    fields = {f: theirs[f] for f in arch_fields(cfg) if f in theirs and f != "num_classes"
              and f not in control_fields(cfg)}                # the ControlNet's own settings are this run's
    soft = {"vae_path": theirs.get("vae_path", "")}
    return fields, soft, ckpt["ema"], f"nanoCEP checkpoint at step {ckpt['step']}, EMA weights"


def _release_fields(source, kind, cfg):
    """A release: the config fields its architecture, schedule and numerics need, and its weights (EMA)."""
    import dataclasses
    p = load_pretrained(source, with_vae=False)
    c, model = p["config"], p["model"]
    if c["kind"] != kind:
        raise ValueError(f"{source} is a {c['kind'].upper()} release: fine-tune it with {SCRIPTS[c['kind']]}.py")
    from models import dit
    from models import unet
    from models.encoders import encoder_from_config
    from config import LATENT_GEOMETRY
    fields = dict(cond="class", image_size=c["latent_size"] * LATENT_GEOMETRY[c["vae"]][1], vae=c["vae"],
                  learn_sigma=c["learn_sigma"], schedule=_schedule_name(p["betas"], source))
    if kind == "dit":
        if c["name"] not in dit.DiT_models:
            raise ValueError(f"{source}: a {c['name']} is no nanoCEP DiT size (DiT-{{T,S,B,L,XL}}/{{2,4,8}})")
        fields.update(model=c["name"], t_freq_shift=float(model.t_embedder.freq_shift),
                      mlp_norm_eps=float(model.blocks[0].norm2.eps), pixel_channels=0, token_conv=False,
                      mlp_ratio=4.0)
    else:
        fields["model"] = _unet_name(model, source)
    with torch.device("meta"):                          # the config must rebuild exactly these shapes
        probe = (dit if kind == "dit" else unet).from_config(
            dataclasses.replace(type(cfg)(), **fields, num_classes=c["num_classes"]), encoder_from_config)
    if {k: v.shape for k, v in probe.state_dict().items()} != {k: v.shape for k, v in model.state_dict().items()}:
        raise ValueError(f"{source}: its weights do not fit the {fields['model']} the config describes")
    vae_dir = {"diffusers-dit": "vae", "diffusers-ldm": "vqvae"}.get(c["format"])
    soft = {"vae_path": str(Path(c["path"]) / vae_dir) if vae_dir else c["path"] if c["format"] == "compvis-ldm"
            else ""}
    return fields, soft, model.state_dict(), f"{c['format']} {fields['model']} release ({c['num_classes']} classes)"


def _schedule_name(betas, source):
    """The train scripts' schedule name whose 1000 betas are these, or a ValueError."""
    from diffusion import make_beta_schedule
    for name in ("linear", "scaled_linear"):
        if len(betas) == 1000 and torch.allclose(betas.double(), make_beta_schedule(name), rtol=1e-6, atol=1e-10):
            return name
    raise ValueError(f"{source}: its {len(betas)}-step beta schedule is neither 'linear' nor 'scaled_linear' of 1000 "
                     "steps, which the train scripts support")


def _unet_name(model, source):
    """The UNET_CONFIGS name of a release's U-Net: equal key shapes and attention heads."""
    def signature(unet):
        return ({k: v.shape for k, v in unet.state_dict().items()},
                [m.heads for m in unet.modules() if hasattr(m, "heads")])
    unet = model.diffusion_model
    out = unet.out_channels
    from models.unet import UNET_CONFIGS, build_unet
    for name in UNET_CONFIGS:
        with torch.device("meta"):
            ours = build_unet(name, in_channels=unet.in_channels, learn_sigma=out == 2 * unet.in_channels)
        if signature(ours) == signature(unet):
            return name
    raise ValueError(f"{source}: its U-Net is none of nanoCEP's sizes ({', '.join(UNET_CONFIGS)})")


# ---- CLI ----


def main(argv=None) -> int:
    p = common.ArgParser(prog="python -m weights.pretrained",
                         description="Load released weights into nanoCEP modules and print a summary.")
    p.add_argument("source", help="file, folder, URL, Hugging Face repo id or one of " + ", ".join(RELEASES))
    p.add_argument("--no-vae", action="store_true", help="skip the autoencoder")
    args = p.parse_args(argv)
    try:
        out = load_pretrained(args.source, with_vae=not args.no_vae)
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        print(f"python -m weights.pretrained: error: {e}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in out["model"].parameters())
    print(json.dumps({**{k: v for k, v in out["config"].items() if k != "scheduler"}, "parameters": n,
                      "null_class": out["null_class"], "vae": out["config"]["vae"] if out["vae"] else None},
                     default=str, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
