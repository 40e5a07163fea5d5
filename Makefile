# One venv per checkout. `make test` and `make bench` set it up on first use and reuse it after.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test bench demo demo-data clean

setup: $(STAMP)

# torch goes in first and alone: `torch==2.13.0` resolves to the local CPU wheel on CPU machines,
# and with it installed no later requirement can drag in the CUDA build.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) benchmarks/moe_layer_bench.py

# The main job: prepare the shapes dataset (energon shards + tokenizer, cached), then pretrain
# the demo VLM on 2 ranks (expert parallel 2) over gloo. Results land in runs/demo_vlm/.
demo-data: $(STAMP)
	$(PY) -m megatron_nullmoe.train.data.demo --out data/demo

demo: demo-data
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 \
		-m megatron_nullmoe.train --config examples/demo_vlm.yaml $(ARGS)

clean:
	rm -rf $(VENV)
