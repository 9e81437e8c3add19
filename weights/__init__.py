"""
weights/: autoencoders and released weights, the instruments that bring outside networks into nanoCEP's modules and
send ours out. They import the core; the core never imports them (the train scripts' mains hand the trainer what they
make).

    vae.py                the KL-f8 (SD-VAE) and VQ-f4 (LDM-4) autoencoders; released weights load into them
    latents.py            the latent cache: a dataset encoded once         python -m weights.latents --help
    pretrained.py         released DiT / LDM checkpoints (official DiT, the paper's, CompVis cin256-v2) -> our modules,
                          and --init-from                                  python -m weights.pretrained --help
    export_diffusers.py   a trained DiT -> a diffusers DiTPipeline folder   python -m weights.export_diffusers --help
"""
