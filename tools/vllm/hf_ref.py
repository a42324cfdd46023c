import sys, torch, numpy as np
from PIL import Image
from transformers import AutoTokenizer, AutoImageProcessor
m = sys.argv[1]; d = f"/tmp/vllm-feas/ckpt-{m}-hd32"
tok = AutoTokenizer.from_pretrained(d); ip = AutoImageProcessor.from_pretrained(d)
img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8))
if m == "qwen":
    from transformers import Qwen2_5_VLForConditionalGeneration as M, Qwen2_5_VLProcessor as P, Qwen2VLVideoProcessor as VP
    proc = P(image_processor=ip, tokenizer=tok, video_processor=VP(), chat_template=tok.chat_template)
else:
    from transformers import LlavaOnevisionForConditionalGeneration as M, AutoProcessor
    proc = AutoProcessor.from_pretrained(d)
model = M.from_pretrained(d, dtype=torch.float32).eval()
for name, content in [("text", "hello world"), ("image", [{"type": "image"}, {"type": "text", "text": "describe"}])]:
    prompt = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    inp = proc(text=[prompt], images=[img] if name == "image" else None, return_tensors="pt")
    with torch.no_grad():
        from transformers import GenerationConfig; out = model.generate(**inp, generation_config=GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0))
    print(f"HF {m} {name}: prompt_len={inp['input_ids'].shape[1]} token_ids={out[0, inp['input_ids'].shape[1]:].tolist()}", flush=True)
