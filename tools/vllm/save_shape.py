"""Save a real-shape preset (random weights, some layers) as a checkpoint vLLM loads (tokcomp's venv).

    python tools/vllm/save_shape.py qwen2.5-vl-7b-shape OUT_DIR --llm-layers 2 --vision-layers 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokcomp.models.shapes import build_shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape")
    parser.add_argument("out", type=Path)
    parser.add_argument("--llm-layers", type=int, default=2)
    parser.add_argument("--vision-layers", type=int, default=None)
    args = parser.parse_args()
    model, tokenizer, processor = build_shape(args.shape, args.llm_layers, vision_layers=args.vision_layers)
    layers = {"llm_layers": args.llm_layers, "vision_layers": args.vision_layers}
    model.config.tokcomp_shape = {"shape": args.shape, **layers}
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    print(json.dumps({"saved": str(args.out), "parameters": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
