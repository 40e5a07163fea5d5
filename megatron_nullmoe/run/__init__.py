"""What a run is, for every command that trains, reads or exports one.

A run is its config (`config.py`: typed sections, defaults <- YAML recipe <- overrides, saved in
the run folder), the model that config builds (`model.py`), the tokenizer (`tokenizer.py`), the
data it reads (`data/`: one loader per data kind) and its checkpoints (`checkpoint.py`: their
layout, finding and reading them). `source.py` reads a run or checkpoint folder as the `Source`
a command loads a model from (the record Megatron-LM checkpoints and exports resolve to as well).
The trainer (`train/`) writes runs on top of this layer; export, inference, `generate` and
`evaluate` read them through it, never through the trainer.
"""
