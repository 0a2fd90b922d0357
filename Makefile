# The commands a user types. Each sets up its own virtual environment on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch, installed first: TORCH is a requirement or a wheel file/URL, TORCH_INDEX the index it comes from (empty:
# pip's configured one). PyPI's Linux torch is the CUDA build and pulls the nvidia-* CUDA libraries with it;
# TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU-only build instead.
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=

# Empty: EleutherAI/pythia-70m-deduped when cached or reachable, else the embedded weights/tiny-pg19.
MODEL ?=
DATA  ?= pg19
OUT   ?= results/eval

# glibc's allocator for the eval and bench runs: keep freed blocks (up to 1 GiB) in the process instead of returning
# them to the system, which page-faults them in again at the next prefill (docs/speed.md, "Where users wait"). It
# must be in the environment before Python starts, hence here. Empty (MALLOC_TUNABLES=) leaves glibc's defaults;
# a GLIBC_TUNABLES already in the environment is kept. Ignored where the C library is not glibc.
MALLOC_TUNABLES ?= glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824
RUN_ENV := $(if $(and $(MALLOC_TUNABLES),$(if $(GLIBC_TUNABLES),,1)),GLIBC_TUNABLES=$(MALLOC_TUNABLES))

.PHONY: venv test eval eval-full bench download clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[test,ray]"
	touch $@

test: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The compact grid (eval/configs/compact.yaml): none, KnormPress, SnapKV, StreamingLLM and H2O, short runs of
# PPL, the tasks (recall, needle, continuation) and speed.
eval: venv
	$(RUN_ENV) $(BIN)/python -m eval sweep eval/configs/compact.yaml $(if $(MODEL),--model $(MODEL)) --data $(DATA) \
		--out $(OUT) $(EVAL_ARGS)

# The full grid (eval/configs/full.yaml): the seed study's SnapKV grid and every policy at the same capacities.
# Its own results directory unless OUT is given: one directory holds one sweep's settings.
eval-full: OUT = results/eval-full
eval-full: venv
	$(RUN_ENV) $(BIN)/python -m eval sweep eval/configs/full.yaml $(if $(MODEL),--model $(MODEL)) --data $(DATA) \
		--out $(OUT) $(EVAL_ARGS)

# Speed is a property of the shape, not the values: random weights of the pythia-70m shape, made locally.
BENCH_MODEL ?= weights/random-70m

weights/random-70m/config.json: | venv
	$(BIN)/python -m minipythia.random_checkpoint 70m weights/random-70m

bench: venv $(if $(filter weights/random-70m,$(BENCH_MODEL)),weights/random-70m/config.json)
	$(RUN_ENV) $(BIN)/python -m eval bench --model $(BENCH_MODEL) $(BENCH_ARGS)

download: venv
	$(BIN)/python -m minipythia.download $(or $(MODEL),EleutherAI/pythia-70m-deduped)

clean:
	rm -rf $(VENV) results .pytest_cache
