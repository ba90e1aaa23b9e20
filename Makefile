# make demo  - build a project .venv (engine only, no torch) and run the demo
# make test  - build the .venv with test extras (torch CPU, pytest, colcon) and run the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: demo test venv venv-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.engine: requirements/engine.txt requirements/ros-pypi.txt setup.py | $(BIN)/python
	$(PIP) -r requirements/engine.txt -r requirements/ros-pypi.txt
	$(PIP) --no-deps -e .
	touch $@

$(VENV)/.dev: $(VENV)/.engine requirements/dev.txt
	$(PIP) -r requirements/dev.txt
	touch $@

venv: $(VENV)/.engine
venv-dev: $(VENV)/.dev

demo: $(VENV)/.engine
	$(BIN)/python scripts/demo.py

test: $(VENV)/.dev
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .demo ros2_ws/build ros2_ws/install ros2_ws/log
