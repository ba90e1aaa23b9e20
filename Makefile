# make demo        - build a project .venv (engine only, no torch) and the ROS 2 workspace, then run
#                    the demo
# make test        - build the .venv with test extras (torch CPU, pytest, ruff) and the workspace, run
#                    ruff, the tests with the workspace sourced, then the board job (make test-board) and
#                    the ARM64 job (make test-arm64)
# make ws          - colcon-build ros2_ws (internvl_msgs, internvl_ros) from the ros-* wheels; where
#                    ../shared/vendor/ros2 exists, install launch, launch_testing and the ros2 CLI
#                    from it too (and build composition_interfaces, which launch_ros needs, and
#                    vision_msgs, for the node's detections topic)
# make test-board  - the AX650N board's Python: a Python 3.10 venv with Ubuntu 22.04's numpy 1.21 and
#                    OpenCV 4.5 takes requirements/board.txt without changing them, then runs the engine
#                    and board stand-in tests
# make test-arm64  - the engine's tests and the board stand-in on an emulated aarch64 core (a Debian root
#                    under qemu-user-static, cached in build/arm64; scripts/test_arm64.sh says what it needs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --disable-pip-version-check
# Ubuntu 22.04's python3.10, or pyenv's 3.10.x where the system has none.
PYTHON310 ?= $(firstword $(shell python3.10 -c 'import sys; print(sys.executable)' 2>/dev/null) \
                         $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10))
BOARD_VENV := .venv-board
BOARD_PIP := $(BOARD_VENV)/bin/pip install --quiet --disable-pip-version-check
BOARD_TESTS := tests/test_config.py tests/test_engine.py tests/test_contract.py tests/test_preprocess.py \
               tests/test_cli.py tests/test_board.py tests/test_grounding.py
# ROS 2 tools that are not on PyPI: Humble sources, for tests, copied to a writable place to install.
ROS_VENDOR := ../shared/vendor/ros2
ROS_VENDOR_COPY := $(VENV)/ros2-vendor
ROS_TOOLS := launch-humble/launch launch-humble/launch_xml launch-humble/launch_yaml launch-humble/launch_testing \
	launch_ros-humble/launch_ros launch_ros-humble/launch_testing_ros launch_ros-humble/ros2launch \
	rosidl_runtime_py-humble ros2cli-humble/ros2cli ros2cli-humble/ros2topic ros2cli-humble/ros2param \
	ros2cli-humble/ros2node ros2cli-humble/ros2service ros2cli-humble/ros2action ros2cli-humble/ros2lifecycle \
	ros2cli-humble/ros2pkg ros2cli-humble/ros2interface ros2cli-humble/ros2run
# Interface packages from the same sources, built into the workspace: composition_interfaces
# (launch_ros needs it) and vision_msgs (the node's detections topic; apt's ros-humble-vision-msgs on
# a robot).
ROS_INTERFACES := composition_interfaces-humble vision_msgs-ros2/vision_msgs
WS := ros2_ws
WS_SETUP := $(WS)/install/setup.bash
IN_WS := bash -c 'source $(WS_SETUP) && "$$@"' --

.PHONY: demo test test-board test-arm64 test-vllm test-llama-cpp ws venv venv-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.engine: requirements/engine.txt requirements/serve.txt requirements/ros-pypi.txt setup.py | $(BIN)/python
	$(PIP) -r requirements/engine.txt -r requirements/serve.txt -r requirements/ros-pypi.txt
	$(PIP) --no-deps -e .
	touch $@

$(VENV)/.dev: $(VENV)/.engine requirements/dev.txt
	$(PIP) -r requirements/dev.txt
	touch $@

$(VENV)/.ros-build: $(VENV)/.engine requirements/ros-build.txt scripts/ros_wheels_prefix.py
	$(PIP) -r requirements/ros-build.txt
	$(BIN)/python scripts/ros_wheels_prefix.py
	touch $@

$(VENV)/.ros-tools: $(VENV)/.ros-build requirements/ros-tools.txt
ifneq ($(wildcard $(ROS_VENDOR)),)
	rm -rf $(ROS_VENDOR_COPY) && cp -r $(ROS_VENDOR) $(ROS_VENDOR_COPY) && chmod -R u+w $(ROS_VENDOR_COPY)
	$(PIP) -r requirements/ros-tools.txt
	$(PIP) --no-deps --no-build-isolation $(addprefix $(ROS_VENDOR_COPY)/,$(ROS_TOOLS))
else
	@echo "no $(ROS_VENDOR): launch, launch_testing and the ros2 CLI are not installed (their tests will say so)"
endif
	touch $@

$(WS_SETUP): $(VENV)/.ros-tools $(shell find $(WS)/src/internvl_msgs -type f) package.xml setup.py
	cd $(WS) && . $(abspath $(VENV))/local_setup.sh && colcon build --symlink-install --base-paths src $$(ls -d $(addprefix $(abspath $(ROS_VENDOR_COPY))/,$(ROS_INTERFACES)) 2>/dev/null) \
		--cmake-args -DPython3_EXECUTABLE=$(abspath $(BIN))/python -DBUILD_TESTING=OFF
	touch $@

venv: $(VENV)/.engine
venv-dev: $(VENV)/.dev
ws: $(WS_SETUP)

demo: $(WS_SETUP)
	$(IN_WS) $(BIN)/python scripts/demo.py

# The workspace first: on a fresh clone it is built from what make demo installs, before the test
# extras (torch wants setuptools >= 77, which carries bdist_wheel), so make test checks the demo's
# install steps too.
test: $(WS_SETUP) $(VENV)/.dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(IN_WS) $(BIN)/python -m pytest tests $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-board
	$(MAKE) --no-print-directory test-arm64
	$(MAKE) --no-print-directory test-vllm
	$(MAKE) --no-print-directory test-llama-cpp

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
	$(BOARD_VENV)/bin/python -m pytest $(BOARD_TESTS) $(PYTEST_ARGS)
endif

# Every onnxruntime kernel is emulated (about 60x slower than native): fewer toy questions per type,
# and on the board stand-in pyaxengine's own tests and one toy task for each pyaxengine version.
test-arm64: $(VENV)/.engine
	bash scripts/test_arm64.sh --toy-questions 4 --board-select "pyaxengine or toy_answers and color" $(PYTEST_ARGS)

test-vllm: $(WS_SETUP) $(VENV)/.dev
	PYTHON=$(PYTHON) $(IN_WS) bash scripts/test_vllm.sh $(BIN)/python -m pytest $(PYTEST_ARGS)

test-llama-cpp: $(WS_SETUP) $(VENV)/.dev
	PYTHON=$(BIN)/python $(IN_WS) bash scripts/test_llama_cpp.sh $(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(BOARD_VENV) .demo ros2_ws/build ros2_ws/install ros2_ws/log build/arm64
