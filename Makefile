# Two commands do everything on a fresh machine with Python 3.11: `make tutorial` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= auto

.PHONY: tutorial test test-avx2 unit gpu-check bench bench-learning bench-frontier lab model check clean distclean

# PyTorch's CPU build (about 190 MB) from its own index on Linux without an NVIDIA GPU, where PyPI's wheel is the CUDA
# build with several GB of NVIDIA libraries; PyPI's wheel elsewhere. Choose by hand: make TORCH_INDEX=URL (or =pypi).
TORCH_PIP_ARGS = $(shell TORCH_INDEX="$(TORCH_INDEX)" $(PYTHON) utils/torch_build.py)
TORCH_PIN = $(shell grep -o '"torch==[^"]*"' pyproject.toml)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-deps $(TORCH_PIN) $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -e ".[dev,lab]"
	touch $(STAMP)

model: $(STAMP)  ## convert the embedded Gemma base once (cached in ~/.cache/gemma-course or $$COURSE_CACHE)
	$(PY) -c "from utils.models import ensure_embedded_model; print(ensure_embedded_model())"

tutorial: model  ## run every notebook in order on the best profile this machine supports
	$(PY) -m utils.run --profile $(PROFILE)

test: model  ## lint, unit tests, every notebook under papermill on the cpu profile, then the processor tier as on AVX2
	$(VENV)/bin/ruff check utils tests notebooks benchmarks scripts
	$(PY) -m pytest
	$(MAKE) test-avx2

test-avx2: model  ## the tests whose outcome depends on the processor again on a reproduced AVX2-only one (fp32 compute)
	$(PY) -m utils.precision --avx2-only -- $(PY) -m pytest -m processor

unit: model  ## the fast tests only (under a minute)
	$(PY) -m pytest -m "not notebook and not slow"

gpu-check: model  ## on a CUDA GPU: the course on the GPU, Gemma 7B's shape in 24 GiB (outputs/gpu_check/); skipped without one
	$(PY) -m pytest -m gpu

bench: model  ## training speed (course vs TRL defaults, DPO precompute) and memory estimator -> benchmarks/results/
	$(PY) benchmarks/bench.py

bench-learning: model  ## what SFT and DPO learn on three seeds: floors, decline rates (about 50 min) -> benchmarks/results/learning.*
	$(PY) benchmarks/learning.py

bench-frontier: model  ## what DPO settings do to harmful / benign / ordinary replies, 9 settings x 3 seeds (85 min) -> benchmarks/results/frontier.*
	$(PY) benchmarks/frontier.py

check: model  ## this machine, the precision it computes in and why, `make tutorial`'s time (one timed SFT step), the memory plan
	$(PY) -m utils.run --check --profile $(PROFILE)

lab: model  ## Jupyter Lab with the course's kernel, as root or not; prints the address to open (LAB_ARGS="--ip 0.0.0.0")
	$(PY) -m utils.lab $(LAB_ARGS)

clean:  ## remove run outputs and caches (keeps the venv and the model cache)
	rm -rf outputs .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path "./$(VENV)/*" -exec rm -rf {} +

distclean: clean  ## also remove the venv
	rm -rf $(VENV) *.egg-info
