# make demo        - build a project .venv (engine only, no torch) and run the demo
# make test        - build the .venv with test extras (torch CPU, pytest, colcon) and run the tests,
#                    then the board job (make test-board)
# make test-board  - the AX650N board's Python: a Python 3.10 venv with Ubuntu 22.04's numpy 1.21 and
#                    OpenCV 4.5 takes requirements/board.txt without changing them, then runs the engine
#                    and board stand-in tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --disable-pip-version-check
# Ubuntu 22.04's python3.10, or pyenv's 3.10.x where the system has none.
PYTHON310 ?= $(firstword $(shell python3.10 -c 'import sys; print(sys.executable)' 2>/dev/null) \
                         $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10))
BOARD_VENV := .venv-board
BOARD_PIP := $(BOARD_VENV)/bin/pip install --quiet --disable-pip-version-check
BOARD_TESTS := tests/test_engine.py tests/test_contract.py tests/test_preprocess.py tests/test_cli.py tests/test_board.py

.PHONY: demo test test-board venv venv-dev clean

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
	$(MAKE) --no-print-directory test-board

$(BOARD_VENV)/.board: requirements/ubuntu-22.04.txt requirements/board.txt requirements/board-test.txt setup.py
	rm -rf $(BOARD_VENV)
	$(PYTHON310) -m venv $(BOARD_VENV)
	$(BOARD_PIP) -r requirements/ubuntu-22.04.txt
	$(BOARD_VENV)/bin/pip freeze > $(BOARD_VENV)/apt.txt
	$(BOARD_PIP) -r requirements/board.txt
	@$(BOARD_VENV)/bin/pip freeze | grep -F -x -f $(BOARD_VENV)/apt.txt | cmp -s - $(BOARD_VENV)/apt.txt \
		|| { echo "requirements/board.txt changed apt's packages:"; $(BOARD_VENV)/bin/pip freeze | grep -i -E "numpy|opencv|pillow|cffi"; exit 1; }
	$(BOARD_PIP) -r requirements/board-test.txt
	$(BOARD_PIP) --no-deps --use-pep517 -e .
	touch $@

test-board:
ifeq ($(PYTHON310),)
	@echo "make test-board: SKIPPED: no Python 3.10 here (the AX650N board's Python; install python3.10 or pyenv's 3.10)"
else
	$(MAKE) --no-print-directory $(BOARD_VENV)/.board
	$(BOARD_VENV)/bin/python -m pytest -rs $(BOARD_TESTS) $(PYTEST_ARGS)
endif

clean:
	rm -rf $(VENV) $(BOARD_VENV) .demo ros2_ws/build ros2_ws/install ros2_ws/log
