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

DEMO_RUN := runs/demo
NOTEBOOKS := $(sort $(wildcard notebooks/0*.ipynb))

# The demo's record is the executed stage notebooks (papermill), each running the pipeline up to
# its stage; `python -m cast run --config configs/demo.yaml` is the same pipeline without them.
# The stand-in teacher is pretrained first, as a step of its own: it plays the downloaded
# foundation model, is trained once and cached in data/cache/, and every later run reuses it.
demo: $(STAMP)
	$(PY) -m cast pretrain-teacher --config configs/demo.yaml
	mkdir -p $(DEMO_RUN)/notebooks
	for nb in $(NOTEBOOKS); do \
		$(VENV)/bin/papermill --cwd . -k python3 --execution-timeout 3600 $$nb $(DEMO_RUN)/notebooks/$$(basename $$nb) || exit 1; \
	done
	cat $(DEMO_RUN)/report.md

# The notebooks run on configs/smoke.yaml in a fresh folder, so every `make test` trains them anew.
test: $(STAMP) browser
	scratch=$$(mktemp -d) && trap 'rm -rf "$$scratch"' EXIT && \
	CAST_NOTEBOOK_CONFIG=configs/smoke.yaml \
	CAST_NOTEBOOK_SET="output_dir=$$scratch/runs data.root=$$scratch/smoke teacher.pretrain.cache_dir=$$scratch/cache" \
	$(PY) -m pytest tests --nbmake notebooks

# The app's browser test drives Debian's headless Chromium (the pip playwright browser cannot
# be downloaded here); install it when missing and we are allowed to.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium is missing and could not be installed: the browser test will fail"

# JupyterLab on 127.0.0.1 with its login token (printed in its log); root, as in most containers,
# must say so to Jupyter.
LAB_PORT ?= 8888
lab: $(STAMP)
	$(VENV)/bin/jupyter lab --ip 127.0.0.1 --port $(LAB_PORT) --no-browser --notebook-dir . \
		$(if $(filter 0,$(shell id -u)),--allow-root)

app: $(STAMP)
	$(PY) apps/inspect.py --run runs/demo

clean-runs:
	rm -rf runs
