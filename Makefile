# The two commands of the README: `make demo` (install + main job) and `make test` (install + tests).
PYTHON ?= python
PIP ?= $(PYTHON) -m pip
# CPU machines: these torch/torchvision builds import together (timm needs torchvision).
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint bench compare reproduce

install:
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[dev]"

# `make demo ARGS="--cpu_threads 1"` pins one thread; `ARGS="--seed 1"` another seed (docs/recipes.md).
demo: install
	accelerate launch recipes/train_vit.py $(ARGS)

test: install
	$(PYTHON) -m pytest tests

# The linter and the formatter (ruff.toml); .ci/run runs this before the tests.
lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

bench: install
	$(PYTHON) benchmarks/bench_step.py

compare: install
	$(PYTHON) recipes/compare_methods.py

# Every measured number of the README: docs/results/readme_numbers.json and the README's numbers blocks.
reproduce: install
	$(PYTHON) recipes/reproduce_readme.py $(ARGS)
