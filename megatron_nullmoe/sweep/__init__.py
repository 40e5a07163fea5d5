"""Sweeps: many trainer runs from one YAML file, launched locally or as a Slurm array, reported
over seeds with 95% intervals and loss at matched realised FLOPs.

    python -m megatron_nullmoe.sweep run examples/sweeps/demo_controls.yaml [--dry-run]
    python -m megatron_nullmoe.sweep status runs/sweeps/demo-controls
    python -m megatron_nullmoe.sweep report runs/sweeps/demo-controls

spec.py reads and checks a sweep file and plans its runs; state.py reads a run folder's state;
local.py and slurm.py launch; stats.py is the pure math of the report; report.py writes it.
"""
