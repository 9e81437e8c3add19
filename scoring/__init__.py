"""
scoring/: how samples are scored. evaluate.py and sweep.py use it; the core never imports it (train_dit.py's main
hands the trainer the judge's verdict on the final grid).

    metrics.py        FID / IS / precision / recall from one feature pass (clean-fid's Inception or any torchscript
                      extractor), references and their labels
    memorization.py   memorization measures that mean the same at every training-set size: the ratio test (Gu et al.
                      2023) in pixels and features, the fixed-threshold form, nearest-item distances beside chance
    trainset.py       a run's exact training set rebuilt from its config  python -m scoring.trainset --help
    judge.py          the offline judge of the built-in data: a small CNN whose features and logits give FID, class
                      accuracy and diversity                            python -m scoring.judge --help
    shapes.py         shape fidelity of the built-in data: each sample's best IoU against real items of its shape,
                      the geometry class accuracy cannot see            python -m scoring.shapes
    control.py        a ControlNet's control fidelity: edge F1 between a sample's Canny map and the given one
    stats.py          the statistics of published numbers (numpy + scipy): t-intervals over seeds, paired differences,
                      Holm / Bonferroni adjustment, Wilson intervals of shares
"""
