# raylt: `make demo` runs the offline demo, `make test` the test suite. Both create .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export RAY_AUTH_MODE ?= disabled

.PHONY: install demo test bench lock clean-venv

# requirements.lock pins every package (torch 2.14.1 / torchvision 0.29.1 included) for
# reproducible installs; pyproject.toml keeps the loose ranges a library user installs with.
# Byte-code is compiled here, once, on every core: where PYTHONDONTWRITEBYTECODE is set (the test
# machines set it) Python never writes .pyc files at import, and without them every process --
# each Ray worker, each `raylt` command a test starts -- compiles torch, Ray and MLflow again,
# which doubled the suite's time. pip's own compile step is serial; compileall -j 0 is not. A
# file that does not compile (a package's Python 2 fixture) is simply compiled at import, as before.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile --disable-pip-version-check -c requirements.lock -e '.[test]'
	$(BIN)/python -m compileall -qq -j 0 $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') raylt || true
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
