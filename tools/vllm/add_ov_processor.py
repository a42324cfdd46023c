import sys, os, json, shutil, tempfile
from transformers import AutoImageProcessor, AutoTokenizer, LlavaOnevisionProcessor
from transformers import LlavaOnevisionVideoProcessor
d = sys.argv[1]
cfg = json.load(open(os.path.join(d, "config.json")))
vc = cfg["vision_config"]
n = (vc["image_size"] // vc["patch_size"]) ** 2
proc = LlavaOnevisionProcessor(image_processor=AutoImageProcessor.from_pretrained(d),
    tokenizer=AutoTokenizer.from_pretrained(d), video_processor=LlavaOnevisionVideoProcessor(),
    num_image_tokens=n, vision_feature_select_strategy=cfg["vision_feature_select_strategy"],
    chat_template=open(os.path.join(d, "chat_template.jinja")).read())
t = tempfile.mkdtemp(); proc.save_pretrained(t); print(sorted(os.listdir(t)))
for f in ["processor_config.json", "video_preprocessor_config.json"]:
    if os.path.exists(os.path.join(t, f)): shutil.copy(os.path.join(t, f), d); print("copied", f)
print(open(os.path.join(d, "processor_config.json")).read())
