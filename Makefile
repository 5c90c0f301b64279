# The README's two commands: `make demo` and `make test`. Both create .venv and install first.
# PYTEST_ARGS passes options to pytest, e.g. make test PYTEST_ARGS='-m shared_data'. TEST_WORKERS: the test
# processes (pytest-xdist; each test file in one of them). Every test runs one torch thread (tests/conftest.py), so
# two processes keep a 2-core machine busy; TEST_WORKERS=0 runs the suite in this process alone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUNS   ?= runs
TEST_WORKERS ?= 2
DEMO   := $(RUNS)/demo

.PHONY: demo test lint install train-demo dashboard clean-demo

install: $(VENV)/.installed

# torch 2.13.0 goes in first, so that nothing in requirements.txt can pull a newer (CUDA) build; then the
# exact pins of requirements.txt; then the project itself, editable (the `bliplab` command, and `blipcore`,
# `train` and `dashboard` importable from anywhere), whose dependency ranges the pins already satisfy.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# Train the demo run (resuming an unfinished one, skipping a finished one), then open the dashboard.
train-demo: install
	@if grep -qs '"status": "completed"' $(DEMO)/run.json; then \
		echo "$(DEMO) is already trained (make clean-demo to train it again)"; \
	elif [ -f $(DEMO)/checkpoints/last/state.json ]; then \
		$(BIN)/python -m train fit --run-dir $(DEMO) --resume; \
	else \
		$(BIN)/python -m train fit --preset demo --run-dir $(DEMO) --overwrite; \
	fi

dashboard: install
	$(BIN)/python -m streamlit run dashboard/app.py -- --runs-dir $(RUNS)

demo: train-demo dashboard

test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

clean-demo:
	rm -rf $(DEMO)
