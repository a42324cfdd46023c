import sys
from safetensors.torch import load_file, save_file
p = sys.argv[1] + "/model.safetensors"
sd = load_file(p)
new = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v for k, v in sd.items()}
save_file(new, p, metadata={"format": "pt"})
print(sum(k.startswith("vision_tower.vision_model.") for k in new), "vision keys remapped")
