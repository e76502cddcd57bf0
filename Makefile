# deepfill-ray: two commands for a new user — `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED := 0
# pip installs with --no-compile (byte-compiling all of Ray, torch and MLflow at install takes a minute, most
# of it for modules nothing imports); Python then caches what is imported, on first import, which a
# PYTHONDONTWRITEBYTECODE left in the environment would forbid
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install chromium test demo experiment bench clean

install: $(STAMP)

# torch is pinned in its own step: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install --no-compile torch==2.13.0
	$(BIN)/pip install --no-compile -e '.[dev]'
	touch $(STAMP)

# The page tests (tests/test_serve_page.py) drive Debian's Chromium and chromedriver: installed when missing.
chromium:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null; then sudo=sudo; \
	  else echo "make: chromium and chromium-driver are missing and installing them needs root" >&2; exit 0; fi; \
	  if ! command -v apt-get >/dev/null; then echo "make: no apt-get: install Chromium and chromedriver yourself" >&2; exit 0; fi; \
	  $$sudo apt-get update && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; }

test: install chromium
	$(BIN)/pytest -q

demo: install
	$(BIN)/python -m jobs.demo

# The paper's ablation grid, gan.loss x model.attention (6 arms), on the demo's data (jobs/demo.py builds it),
# EXPERIMENT_STEPS generator steps per arm on CPU, then one comparison report (report.html, report.md) under
# $(EXPERIMENT)/report. `deepfill sweep` trains arms at once where the local Ray holds them (Ray Tune trials),
# else one after another. EXPERIMENT_ARGS is passed on, e.g. EXPERIMENT_ARGS='--max-concurrent 1'.
EXPERIMENT       ?= experiment_output
EXPERIMENT_STEPS ?= 100
EXPERIMENT_ARGS  ?=
experiment: install
	$(BIN)/python -c "from pathlib import Path; from jobs.demo import DemoOptions, build_dataset; \
	  print(build_dataset(Path('$(EXPERIMENT)/images'), DemoOptions()))"
	$(BIN)/deepfill prepare --src $(EXPERIMENT)/images/train --dst $(abspath $(EXPERIMENT))/shards \
	  --min-size 64 --val-fraction 0.05
	$(BIN)/deepfill sweep --config configs/ablations/base.yaml \
	  --grid gan.loss=wgan_gp,dcgan,lsgan --grid model.attention=contextual,none --steps $(EXPERIMENT_STEPS) \
	  --set data.shards=$(abspath $(EXPERIMENT))/shards --set checkpoint.storage_path=$(abspath $(EXPERIMENT))/ray_results \
	  --images $(EXPERIMENT)/images/held_out --output $(EXPERIMENT)/report $(EXPERIMENT_ARGS)

bench: install
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
