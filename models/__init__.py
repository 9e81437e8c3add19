"""
models/: the denoising networks and their condition encoders, part of the core. Each network is handed its condition
encoder (conditions.py, encoders.py) and never imports anything outside the top level.

    encoders.py     the condition encoders by kind (conditions.ClassEmbedder, a small text transformer) and their factory
    dit.py          the DiT (Peebles & Xie 2023): official architecture, initialisation and key names; train_dit.py
    unet.py         the LDM-4 U-Net (CompVis layout) with cross-attention conditioning; train_ldm.py
    controlnet.py   a ControlNet around a frozen DiT or U-Net (--init-from BASE --control canny|maps)
"""
