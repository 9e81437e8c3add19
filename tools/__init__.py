"""
tools/: instruments for measuring and checking nanoCEP, run as modules from the repository root.

    bench.py        one training step's img/s, memory and MFU              python -m tools.bench --help
    measure.py      the measurement bench.py prints and the GPU check tabulates
    gpu_suite.py    the one prepared GPU check                             python -m tools.gpu_suite --help
    gmm_theory.py   the paper's Gaussian-mixture theory, numerically       python -m tools.gmm_theory --help
    preview.py      a dataset as the trainer sees it, one row per class    python -m tools.preview --help
    results.py      published tables and plots, from the rows in results/  python -m tools.results --check
"""
