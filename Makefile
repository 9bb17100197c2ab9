# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing (torch 2.13.0 CPU build first, then the project
# pinned by constraints.txt) and are safe to run twice.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cast-installed
export HF_HUB_OFFLINE := 1
export FIFTYONE_DO_NOT_TRACK := true
export PYTHONUNBUFFERED := 1
# fiftyone's bundled MongoDB 6 is older than it prefers; it works, so don't refuse it.
export FIFTYONE_DATABASE_VALIDATION := false

.PHONY: demo test lab app venv browser clean-runs

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` would pull the multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test,cityscapes]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m cast run --config configs/demo.yaml

test: $(STAMP) browser
	$(PY) -m pytest tests

# The app's browser test drives Debian's headless Chromium (the pip playwright browser cannot
# be downloaded here); install it when missing and we are allowed to.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium is missing and could not be installed: the browser test will fail"

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --ip 127.0.0.1 --notebook-dir .

app: $(STAMP)
	$(PY) apps/inspect.py --run runs/demo

clean-runs:
	rm -rf runs
