# tokcomp: everything installs into .venv; nothing outside it is assumed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch (a local wheel on our machines, the registry elsewhere). lmms-eval pulls a
# torchvision built for the registry's CUDA torch, which cannot load next to the CPU build, so it is
# removed again: transformers then uses its PIL image processors, and tokcomp decodes video itself.
TORCH_VERSION ?= 2.13.0

.PHONY: install test lint demo calibrations clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[eval,video,dev]"
	$(BIN)/python -m pip uninstall -q -y torchvision || true
	touch $(STAMP)

test: install
	$(BIN)/ruff check tokcomp tests
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check tokcomp tests

demo: install
	$(BIN)/tokcomp calibrate --model tiny-llava --budget mid --data builtin:skimage --out results/demo/tiny-llava-mid.yaml
	$(BIN)/tokcomp inspect builtin:skimage/coffee --model tiny-llava --calib results/demo/tiny-llava-mid.yaml --out results/demo/coffee-merges.png
	$(BIN)/tokcomp inspect builtin:skimage/gravel --model tiny-llava --calib results/demo/tiny-llava-mid.yaml --out results/demo/gravel-merges.png

# The stored calibrations in calib/ (used by later commands when only a budget is given).
calibrations: install
	for model in tiny-llava tiny-llava-ov; do for budget in low mid high; do \
	  $(BIN)/tokcomp calibrate --model $$model --budget $$budget --data builtin:skimage --batch-size 8 \
	    --out calib/$$model/$$budget.yaml || exit 1; done; done

clean-venv:
	rm -rf $(VENV)
