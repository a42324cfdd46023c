import os, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from PIL import Image
import numpy as np

def main():
    model = sys.argv[1]
    dtype = sys.argv[2] if len(sys.argv) > 2 else "float32"
    t0 = time.time()
    from vllm import LLM, SamplingParams
    llm = LLM(model=model, max_model_len=512, enforce_eager=True, dtype=dtype,
              limit_mm_per_prompt={"image": 1}, max_num_seqs=2, seed=0)
    t1 = time.time(); print(f"INIT_SECONDS {t1-t0:.1f}", flush=True)
    tok = llm.get_tokenizer()
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    text_prompt = tok.apply_chat_template([{"role": "user", "content": "hello world"}], tokenize=False, add_generation_prompt=True)
    img_prompt = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}], tokenize=False, add_generation_prompt=True)
    if os.environ.get("IMG_PROMPT"):
        img_prompt = os.environ["IMG_PROMPT"]
    print("TEXT_PROMPT", repr(text_prompt)); print("IMG_PROMPT", repr(img_prompt), flush=True)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
    for name, req in [("text", {"prompt": text_prompt}), ("image", {"prompt": img_prompt, "multi_modal_data": {"image": img}})]:
        t = time.time()
        out = llm.generate([req], sp)
        o = out[0]
        print(f"RESULT {name}: prompt_len={len(o.prompt_token_ids)} token_ids={list(o.outputs[0].token_ids)} text={o.outputs[0].text!r} secs={time.time()-t:.2f}", flush=True)
    print(f"TOTAL_SECONDS {time.time()-t0:.1f}")

if __name__ == "__main__":
    main()
