"""
trackers/: where a run's records go besides log.jsonl, for --log wandb|tensorboard. The train scripts, evaluate.py and
sweep.py hand these sinks to the run folder (runio.RunIO(sinks=...)); the core never imports them.

    tracking.py   the W&B (offline by default) and TensorBoard sinks, and --log's one-line checks
"""
