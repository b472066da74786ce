# raylt: `make demo` runs the offline demo, `make test` the test suite. Both create .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export RAY_AUTH_MODE ?= disabled

.PHONY: install demo test bench lock clean-venv

# requirements.lock pins every package (torch 2.14.1 / torchvision 0.29.1 included) for
# reproducible installs; pyproject.toml keeps the loose ranges a library user installs with.
# --no-compile: pip byte-compiles every installed file (46 s of a 2 min install on 2 cores);
# Python compiles the modules raylt imports on first use instead, once.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile --disable-pip-version-check -c requirements.lock -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/raylt run configs/demo.yaml --baseline

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python bench/head_fit.py
	$(BIN)/python bench/embed_throughput.py
	$(BIN)/python bench/class_stats.py
	$(BIN)/python bench/sampling.py
	$(BIN)/python bench/predict.py
	$(BIN)/python bench/fixed_costs.py

lock: install
	$(BIN)/pip freeze --exclude-editable | grep -v '^raylt' > requirements.lock

clean-venv:
	rm -rf $(VENV)
