# The commands a user types. Each sets up its own virtual environment on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch (a plain `torch` resolves to a multi-GB CUDA build on Linux).
TORCH  ?= torch==2.13.0

# Empty: EleutherAI/pythia-70m-deduped when cached or reachable, else the embedded weights/tiny-pg19.
MODEL ?=
DATA  ?= pg19
OUT   ?= results/eval

.PHONY: venv test eval download clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

test: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

eval: venv
	$(BIN)/python -m eval suite $(if $(MODEL),--model $(MODEL)) --data $(DATA) --out $(OUT) $(EVAL_ARGS)

download: venv
	$(BIN)/python -m minipythia.download $(or $(MODEL),EleutherAI/pythia-70m-deduped)

clean:
	rm -rf $(VENV) results .pytest_cache
