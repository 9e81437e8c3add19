"""
Export a trained nanoCEP DiT to a diffusers DiTPipeline folder, so the diffusers ecosystem samples it:

    python -m weights.export_diffusers runs/dit/last.pt --out exported/           # EMA weights (the default)
    python -m weights.export_diffusers CKPT --out DIR --weights model --vae PATH   # raw weights, another VAE file
    python -c "from diffusers import DiTPipeline; p = DiTPipeline.from_pretrained('exported'); p([0, 1]).images"

The folder: model_index.json (DiTPipeline, with the class names as id2label), transformer/ (config.json +
diffusion_pytorch_model.safetensors, a DiTTransformer2DModel), scheduler/ (DPMSolverMultistepScheduler with the
model's beta schedule) and vae/ (the run's autoencoder rewritten as a diffusers AutoencoderKL: --vae, else the
checkpoint's --vae-path, else the released weights the run downloaded). Going back is exact:
`train_dit.py --init-from DIR` (weights/pretrained.py reads the folder with the same key map, run in reverse here).

What diffusers' DiT can represent, and what is refused in one line (exit 2):
- timestep frequencies: diffusers hard-codes downscale_freq_shift=1; a DiT trained with DiT's own numerics
  (--t-freq-shift 0, the default) computes other frequencies, which no weight change reproduces: refused (train or
  fine-tune with --t-freq-shift 1 to export). --mlp-norm-eps maps exactly to the config's norm_eps (1e-6 or 1e-5).
- classes: DiTPipeline uses label 1000 as its CFG null class, so the class table is written with 1000 + 1 rows:
  our K classes, then our null row repeated (rows K..1000; zeros for a run without --class-dropout). Our labels
  0..K (K = our null) give identical outputs; pretrained.py trims the padding on the way back (id2label has K names).
  So labels K..999 of the exported model are no classes: they sample unconditionally (as the null label does, or
  from a zero embedding without --class-dropout); use labels 0..K-1 (id2label) only.
- _diffusers_version: the installed diffusers' version (importlib.metadata), which wrote nothing here but is what
  the folder was checked against; without diffusers installed, 0.30.0, the first release with DiTTransformer2DModel
  and so the oldest that can load the folder (the export itself needs no diffusers).
- pixel-space (--vae none), vq-f4 and text-conditional DiTs: DiTPipeline decodes with an AutoencoderKL and feeds
  class labels, so these are refused.
- --label-smoothing eps: diffusers' embedder has no smoothing, so the class rows are written smoothed,
  (1-eps) E[y] + eps mean(E), the embedding the model was trained on and that evaluate.py samples by default
  (conditions.smoothed); --raw-class-embedding writes E[y] as stored (evaluate.py's flag of the same name). Either
  way the folder is a model without smoothing: --init-from it takes the rows as written.
"""
import importlib.metadata
import json
import os
import sys

import torch

import conditions
from config import stored_config
from plumbing import common
from models import dit
from runio import load_checkpoint
from weights import pretrained
from weights import vae as vae_lib

MIN_DIFFUSERS = "0.30.0"              # the first release with DiTTransformer2DModel


def installed_diffusers() -> str | None:
    """The installed diffusers' version, or None."""
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return None


def diffusers_version() -> str:
    """The configs' _diffusers_version: the installed diffusers', else MIN_DIFFUSERS (module docstring)."""
    return installed_diffusers() or MIN_DIFFUSERS


PIPELINE_NULL = 1000                  # DiTPipeline's CFG null label (hard-coded in its __call__)


def transformer_state_dict(sd: dict, depth: int, table_rows: torch.Tensor) -> dict:
    """Official-layout DiT weights -> diffusers DiTTransformer2DModel names: pretrained.dit_from_diffusers in reverse
    (qkv split into to_q/k/v, the shared t/y embedders copied into every block, the final layer as proj_out_1/2;
    pos_embed dropped, diffusers recomputes it). table_rows replaces the class table (padded to 1001 rows)."""
    sd = {**sd, "y_embedder.embedding_table.weight": table_rows}
    out = {}
    for suffix in ("weight", "bias"):
        out[f"pos_embed.proj.{suffix}"] = sd[f"x_embedder.proj.{suffix}"]
        for i in range(depth):
            p = f"transformer_blocks.{i}."
            for theirs, ours in pretrained.DIT_EMBEDDERS.items():
                if f"{ours}.{suffix}" in sd:
                    out[f"{p}norm1.emb.{theirs}.{suffix}"] = sd[f"{ours}.{suffix}"]
            for name, w in zip("qkv", sd[f"blocks.{i}.attn.qkv.{suffix}"].chunk(3)):
                out[f"{p}attn1.to_{name}.{suffix}"] = w
            for theirs, ours in pretrained.DIT_BLOCK.items():
                out[f"{p}{theirs}.{suffix}"] = sd[f"blocks.{i}.{ours}.{suffix}"]
        out[f"proj_out_1.{suffix}"] = sd[f"final_layer.adaLN_modulation.1.{suffix}"]
        out[f"proj_out_2.{suffix}"] = sd[f"final_layer.linear.{suffix}"]
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}   # no shared storage in safetensors


def padded_class_table(table: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K + 1 or K, D) -> (1001, D): the K class rows, then the null row (or zeros) up to DiTPipeline's null 1000."""
    if num_classes > PIPELINE_NULL:
        raise ValueError(f"a DiT with {num_classes} classes: diffusers' DiT holds at most {PIPELINE_NULL}")
    null = table[num_classes] if table.shape[0] > num_classes else torch.zeros_like(table[0])
    return torch.cat([table[:num_classes], null.expand(PIPELINE_NULL + 1 - num_classes, -1)])


def check_exportable(cfg: dict, path: str) -> None:
    """Refuse, in one line, a DiT the diffusers DiTPipeline cannot reproduce exactly (see the module docstring)."""
    if cfg.get("cond", "class") != "class":
        raise ValueError(f"{path} is a text-conditional DiT; DiTPipeline is class-conditional only")
    if cfg.get("vae") != "kl-f8":
        raise ValueError(f"{path} works in {'pixel' if cfg.get('vae') == 'none' else cfg.get('vae')} space; "
                         f"DiTPipeline decodes latents with a kl-f8 AutoencoderKL, so only --vae kl-f8 DiTs export")
    if cfg["pixel_channels"] or cfg["token_conv"]:
        raise ValueError(f"{path} has nanoCEP's convolutions (--pixel-channels {cfg['pixel_channels']}, "
                         f"--token-conv {cfg['token_conv']}); DiTTransformer2DModel has none: train with "
                         f"--pixel-channels 0 --no-token-conv --mlp-ratio 4 to export")
    if float(cfg.get("mlp_ratio", 4.0)) != 4.0:
        raise ValueError(f"{path} has {cfg['mlp_ratio']:g}x-wide MLPs; DiTTransformer2DModel's are 4x: train with "
                         f"--mlp-ratio 4 to export")
    if float(cfg.get("t_freq_shift", 0.0)) != 1.0:
        raise ValueError(f"{path} was trained with --t-freq-shift {cfg.get('t_freq_shift', 0.0):g} (DiT's timestep "
                         f"frequencies); diffusers' DiT hard-codes shift 1, which no weight change reproduces: train "
                         f"or fine-tune with --t-freq-shift 1 to export")


def transformer_config(model: dit.DiT, num_layers: int, norm_eps: float) -> dict:
    """The DiTTransformer2DModel config.json of our DiT."""
    dim = model.x_embedder.proj.weight.shape[0]
    hidden = model.blocks[0].mlp.fc1.weight.shape[0]
    if hidden != 4 * dim:
        raise ValueError(f"an MLP ratio of {hidden / dim:g}: diffusers' DiT blocks are 4x wide")
    return {"_class_name": "DiTTransformer2DModel", "_diffusers_version": diffusers_version(),
            "num_attention_heads": model.num_heads, "attention_head_dim": dim // model.num_heads,
            "in_channels": model.in_channels, "out_channels": model.out_channels, "num_layers": num_layers,
            "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": model.grid * model.patch_size,
            "patch_size": model.patch_size, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": PIPELINE_NULL,
            "upcast_attention": False, "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
            "norm_eps": norm_eps}


def scheduler_config(schedule: str) -> dict:
    """A DPMSolverMultistepScheduler (2nd order DPM-Solver++, the grids' default sampler) on the model's betas."""
    start, end = {"linear": (1e-4, 0.02), "scaled_linear": (0.0015, 0.0195)}[schedule]
    return {"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": diffusers_version(),
            "num_train_timesteps": 1000, "beta_schedule": schedule, "beta_start": start, "beta_end": end,
            "prediction_type": "epsilon", "algorithm_type": "dpmsolver++", "solver_order": 2}


def vae_folder_files(ae) -> tuple[dict, dict]:
    """(config.json, state dict) of our kl-f8 autoencoder as a diffusers AutoencoderKL (vae.py keeps its key names)."""
    c = ae.cfg
    n = len(c.block_out_channels)
    config = {"_class_name": "AutoencoderKL", "_diffusers_version": diffusers_version(),
              "in_channels": c.in_channels, "out_channels": c.out_channels,
              "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
              "block_out_channels": list(c.block_out_channels), "layers_per_block": c.layers_per_block,
              "act_fn": "silu", "latent_channels": c.latent_channels, "norm_num_groups": c.norm_groups,
              "scaling_factor": ae.scale_factor}
    return config, {k: v.detach().float().contiguous() for k, v in ae.state_dict().items()}


def class_names(cfg: dict, num_classes: int, names_file: str | None) -> list[str]:
    """--class-names FILE (one per line), else the built-in dataset's, else the class folders of --data if it is
    still there, else '0', '1', ..."""
    if names_file:
        with open(names_file, encoding="utf-8") as f:
            names = [ln.strip() for ln in f if ln.strip()]
    elif cfg.get("data") == "builtin":
        import data
        names = data.BuiltinShapes(size=8, length=1).class_names
    elif cfg.get("data") and os.path.isdir(cfg["data"]):
        names = sorted(d.name for d in os.scandir(cfg["data"]) if d.is_dir() and not d.name.startswith("."))
    else:
        names = []
    if len(names) != num_classes:
        names = [str(i) for i in range(num_classes)] if not names_file else names
    if len(names) != num_classes:
        raise ValueError(f"{names_file} lists {len(names)} class names, the model has {num_classes} classes")
    return names


def export(ckpt_path: str, out: str, weights: str = "ema", vae_path: str | None = None,
           names_file: str | None = None, raw_class_embedding: bool = False) -> dict:
    """Write the DiTPipeline folder `out` for the nanoCEP DiT checkpoint; returns its model_index.json.
    A --label-smoothing DiT's class rows are written smoothed unless raw_class_embedding (module docstring)."""
    from safetensors.torch import save_file
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("kind") != "dit":
        raise ValueError(f"{ckpt_path} is a {ckpt.get('kind')!r} checkpoint; only DiTs export to DiTPipeline")
    cfg = stored_config(ckpt["config"])               # a config from before the convolutions existed: without them
    check_exportable(cfg, ckpt_path)
    sd = {k: v.float() for k, v in ckpt[weights].items()}
    num_classes = int(cfg["num_classes"])
    model, _, _ = pretrained.build_dit(sd, num_heads=dit.size_of(cfg["model"])["num_heads"],
                                       what=ckpt_path)
    if not torch.allclose(sd["pos_embed"][0], dit.sincos_pos_embed_2d(sd["pos_embed"].shape[-1], model.grid)):
        raise ValueError(f"{ckpt_path}: its pos_embed is not DiT's fixed sin-cos table, which diffusers recomputes")
    table = sd["y_embedder.embedding_table.weight"]                        # (K + 1 or K, D)
    eps = float(cfg.get("label_smoothing", 0.0))
    if eps > 0 and not raw_class_embedding:                                # the rows as the model samples them
        table = torch.cat([conditions.smoothed(table[:num_classes], table[:num_classes], eps), table[num_classes:]])
    table = padded_class_table(table, num_classes)
    ae = vae_lib.load_vae("kl-f8", vae_path or cfg.get("vae_path") or None)   # None: the run's released weights
    if os.path.exists(os.path.join(out, "model_index.json")):
        raise ValueError(f"{out} already holds a diffusers pipeline; pick another --out")
    index = {"_class_name": "DiTPipeline", "_diffusers_version": diffusers_version(),
             "transformer": ["diffusers", "DiTTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
             "id2label": {str(i): n for i, n in enumerate(class_names(cfg, num_classes, names_file))}}
    files = {"transformer": (transformer_config(model, len(model.blocks), float(cfg.get("mlp_norm_eps", 1e-6))),
                             transformer_state_dict(sd, len(model.blocks), table)),
             "vae": vae_folder_files(ae), "scheduler": (scheduler_config(cfg.get("schedule", "linear")), None)}
    for folder, (config, tensors) in files.items():
        os.makedirs(os.path.join(out, folder), exist_ok=True)
        name = "scheduler_config.json" if folder == "scheduler" else "config.json"
        with common.atomic_open(os.path.join(out, folder, name), "w") as f:
            json.dump(config, f, indent=2)
        if tensors is not None:
            save_file(tensors, os.path.join(out, folder, "diffusion_pytorch_model.safetensors"))
    with common.atomic_open(os.path.join(out, "model_index.json"), "w") as f:   # last: marks a complete folder
        json.dump(index, f, indent=2)
    return index


def export_note(out: str, index: dict) -> str:
    """The line a finished export prints: what was written, what the padded labels do, the version stamped."""
    k, installed = len(index["id2label"]), installed_diffusers()
    padding = (f"its class table is padded to {PIPELINE_NULL + 1} rows with copies of the null row, so labels "
               f"{k}..{PIPELINE_NULL - 1} are no classes and sample unconditionally, as the null label "
               f"{PIPELINE_NULL} does" if k < PIPELINE_NULL else f"label {PIPELINE_NULL} is the null label")
    stamp = (f"diffusers {installed} (installed)" if installed else
             f"diffusers {MIN_DIFFUSERS} (diffusers is not installed: the oldest release that loads the folder)")
    return (f"wrote {out}: DiTPipeline with {k} classes (labels 0..{k - 1}); {padding}; stamped {stamp}; sample "
            f"it with DiTPipeline.from_pretrained({out!r})")


def main(argv=None) -> int:
    p = common.ArgParser(prog="python -m weights.export_diffusers", description=__doc__.split("\n\n")[0].strip(),
                         epilog=f"The class table is padded to {PIPELINE_NULL + 1} rows (DiTPipeline's null label is "
                         f"{PIPELINE_NULL}) with copies of the null row: labels K..{PIPELINE_NULL - 1} are no "
                         f"classes and sample unconditionally. _diffusers_version is the installed diffusers' "
                         f"version ({MIN_DIFFUSERS} without diffusers).")
    p.add_argument("checkpoint", help="a nanoCEP DiT checkpoint (last.pt / step_XXXXXXX.pt)")
    p.add_argument("--out", required=True, help="the diffusers pipeline folder to write")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA (default, what the grids sample) "
                   "or the raw trained weights")
    p.add_argument("--vae", default=None, help="the kl-f8 autoencoder to ship (file or diffusers folder); default: "
                   "the checkpoint's --vae-path, else the released weights")
    p.add_argument("--class-names", default=None, help="a file with one class name per line (default: the built-in "
                   "names, or the class folders of the run's --data)")
    p.add_argument("--raw-class-embedding", action="store_true", help="a --label-smoothing DiT: write its raw class "
                   "rows E[y], not the smoothed embedding it was trained on and samples with by default")
    args = p.parse_args(argv)
    try:
        index = export(args.checkpoint, args.out, args.weights, args.vae, args.class_names, args.raw_class_embedding)
    except (ValueError, FileNotFoundError, ConnectionError, common.RunError) as e:
        print(f"python -m weights.export_diffusers: error: {common.one_line(e)}", file=sys.stderr)
        return 2
    print(export_note(args.out, index))
    return 0


if __name__ == "__main__":
    sys.exit(main())
