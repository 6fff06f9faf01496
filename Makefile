# Two commands from a fresh clone (only Python 3.11 + pip needed):
#   make demo   -> creates .venv/, installs dbk, runs `dbk demo` on a synthetic slide
#   make test   -> creates .venv/, installs dbk with test extras, runs the test suite offline
# Others: make docs (Sphinx, warning-free), make clean-venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision are installed first, as a pair, so no resolver pulls another multi-GB torch build.
# Override e.g. `make demo TORCH_SPEC="torch==2.9.1 torchvision==0.24.1"` (in a fresh .venv).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
OUT ?= dbk_demo_output

.PHONY: demo test docs install install-test install-doc clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	@if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install --quiet $(TORCH_SPEC); fi
	@touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $@

$(VENV)/.installed-doc: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[test,doc,tutorials]"
	@touch $@

install install-test: $(VENV)/.installed
install-doc: $(VENV)/.installed-doc

demo: $(VENV)/.installed
	$(BIN)/dbk demo --out $(OUT)

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 DBK_OFFLINE=1 MPLBACKEND=Agg $(BIN)/python -m pytest

docs: $(VENV)/.installed-doc
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

clean-venv:
	rm -rf $(VENV)
