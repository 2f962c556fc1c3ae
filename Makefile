# The two commands of the README: `make demo` (install + main job) and `make test` (install + tests).
PYTHON ?= python
PIP ?= $(PYTHON) -m pip
# CPU machines: these torch/torchvision builds import together (timm needs torchvision).
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test bench compare

install:
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[dev]"

demo: install
	accelerate launch recipes/train_vit.py

test: install
	$(PYTHON) -m pytest tests

bench: install
	$(PYTHON) benchmarks/bench_step.py

compare: install
	$(PYTHON) recipes/compare_methods.py
