"""The datasets the recipes train on, prepared offline: the generated shapes set (`demo.py`,
`shapes.py`) and the text study's corpus (`corpus.py`). The loaders that read them are the run's
(`megatron_nullmoe.run.data`)."""
