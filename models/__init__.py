"""
models/: the denoising networks, part of the core. Each is handed its condition encoder (conditions.py) and never
imports anything outside the top level.

    dit.py          the DiT (Peebles & Xie 2023): official architecture, initialisation and key names; train_dit.py
    unet.py         the LDM-4 U-Net (CompVis layout) with cross-attention conditioning; train_ldm.py
    controlnet.py   a ControlNet around a frozen DiT or U-Net (--init-from BASE --control canny|maps)
"""
