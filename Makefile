# From a fresh clone, two commands; each does its own set-up (idempotent):
#   make demo   the embedded demo: CRaFT vs plain fine-tuning on two offline toy tasks (~2 min on 2 cores)
#   make test   the lint (ruff) and the test suite
# Set-up = a Python 3.12 virtual environment in .venv (Python 3.12 found on PATH or through pyenv) and
# the editable install of craft_ext into it; it is redone only when the build inputs change.
# `make install` does only the set-up; `make clean` removes .venv and the build folder.

# pytest processes (pytest-xdist), each test file in one of them: 2 suits the 2-core CI machine
TEST_PROCESSES ?= 2
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.craft_ext-installed
# What the compiled extension and the dependency set are made from: a change re-runs the install.
BUILD_INPUTS := pyproject.toml requirements-build.txt CMakeLists.txt $(wildcard cmake/* python/* csrc/* csrc/*/*)

.PHONY: demo test install clean

demo: $(STAMP)
	$(PY) -m craft_ext.train

test: $(STAMP)
	$(PY) -m ruff check craft_ext tests benchmarks
	$(PY) -m pytest -n $(TEST_PROCESSES) --dist loadfile

install: $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	@test -x $(PY) || { py=$$(sh cmake/find_python312.sh) && echo "creating $(VENV) with $$py" && "$$py" -m venv $(VENV); }
	$(PY) -m pip install -r requirements-build.txt
	$(PY) -m pip install --no-build-isolation -e ".[test,sim]"
	@touch $@

clean:
	rm -rf $(VENV) build
