# Same weights, text head_dim 16 -> 32 (vLLM CPU_ATTN supports head sizes 32,64,80,...): heads 4->2, kv heads 2->1.
import json, sys
p = sys.argv[1] + "/config.json"; c = json.load(open(p)); t = c["text_config"]
t["num_attention_heads"] = 2; t["num_key_value_heads"] = 1
if "mrope_section" in t.get("rope_parameters", {}): t["rope_parameters"]["mrope_section"] = [4, 6, 6]
json.dump(c, open(p, "w"), indent=2)
