# Two entry points: `make demo` and `make test`. Each creates .venv and installs what it needs on first use.
# torch: if the system Python already has one (e.g. a CUDA build on a GPU machine) the venv sees it
# (--system-site-packages) and keeps it; otherwise the pinned CPU wheel is installed *before* anything
# else, so no dependency can pull a multi-GB CUDA build. bubblewrap (the code sandbox's OS boundary) is
# installed with apt when missing and we are root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test setup bench clean sandbox-tool browser

# Checked on every run (cheap), so an existing venv on a machine without bubblewrap still gets it.
sandbox-tool:
	@command -v bwrap >/dev/null || { if [ "$$(id -u)" = 0 ]; then \
		echo "installing bubblewrap (the code sandbox's OS boundary)"; \
		apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; \
	else echo "bubblewrap is missing: code rewards will refuse to run (sudo apt-get install bubblewrap)"; fi; }

# The UI's browser tests drive Debian's chromium through selenium; installed here when missing (as root).
browser:
	@{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || { if [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium and chromedriver (the UI's browser tests)"; \
		apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "chromium/chromedriver missing: the browser tests will be skipped (sudo apt-get install chromium chromium-driver)"; fi; }

$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the system's torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP) sandbox-tool

demo: $(STAMP) sandbox-tool
	HF_HUB_OFFLINE=1 $(VENV)/bin/thinkforge demo

# Two workers, each test file whole on one (its module fixtures built once), torch at 1 thread each
# (tests/conftest.py), files in conftest's order (heaviest first; --no-loadscope-reorder keeps it instead of
# xdist's most-tests-first): 4 min 13 s on the AVX2 AMD EPYC of 2026-12-02 (549 tests), 5 min 23 s in xdist's order.
test: $(STAMP) sandbox-tool browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/generation.py
	$(PY) bench/sft.py

clean:
	rm -rf $(VENV) runs
