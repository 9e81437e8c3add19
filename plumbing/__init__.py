"""
plumbing/: what every nanoCEP script shares and no reader of the training step needs to open first, written once
(common.py): one-line CLI errors and the RunError they report, atomic file writes, derive_seed (every random stream of
a run, from --seed, a purpose and an index), and joining torchrun's process group; and the optimizer --optimizer muon
builds (muon.py: Muon on the transformer blocks' matrices, AdamW on the rest), and what made a run (provenance.py:
the code's git commit and dirty state, the machine, the command line). Part of the core: it imports nothing
else of nanoCEP, and everything may import it.
"""
