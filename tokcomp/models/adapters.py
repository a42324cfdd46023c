"""Family adapters: what tokcomp needs to know about a stock VLM's vision side.

Both families read the hidden states of one encoder layer: LLaVA-1.5 (CLIP, with CLS) the second to
last, CLS dropped; LLaVA-OneVision (SigLIP, no CLS) the last of its (already shortened) tower.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn
from transformers import PreTrainedModel

from tokcomp.methods.dtome import LayerSnapshot, MergeRule, attach_merging, encoder_layers
from tokcomp.methods.merge import TokenOrder


@dataclass
class EncodedImage:
    """One encoder view after (optional) merging, at the layer the VLM reads."""

    features: torch.Tensor  # (n, D) vision hidden states, CLS dropped where the VLM drops it
    sizes: torch.Tensor  # (n,) patches per token
    source: torch.Tensor  # (P,) long: patch position (raster order) -> token index
    layer_counts: list[int]  # patch tokens after each encoder layer

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])


class VLMAdapter:
    """A loaded stock VLM plus its tokenizer and image processor."""

    family: str = ""

    def __init__(self, model: PreTrainedModel, tokenizer, image_processor, name: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name = name

    # --- vision encoder geometry -------------------------------------------------------------
    @property
    def vision_model(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def vision_config(self):
        return self.model.config.vision_config

    @property
    def num_layers(self) -> int:
        return len(encoder_layers(self.vision_model))

    @property
    def has_cls(self) -> bool:
        return hasattr(getattr(self.vision_model, "vision_model", self.vision_model).embeddings, "class_embedding")

    @property
    def protected(self) -> int:
        return 1 if self.has_cls else 0

    @property
    def drops_cls(self) -> bool:
        return self.has_cls and self.model.config.vision_feature_select_strategy == "default"

    @property
    def feature_layer(self) -> int:
        """Number of encoder layers whose output the VLM reads (``hidden_states`` index, made positive)."""
        layer = self.model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("tokcomp supports a single vision_feature_layer")
        return layer if layer >= 0 else self.num_layers + 1 + layer

    @property
    def grid(self) -> tuple[int, int]:
        side = self.vision_config.image_size // self.vision_config.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def image_size(self) -> int:
        return int(self.vision_config.image_size)

    @property
    def encoder_class(self) -> str:
        return type(self.vision_model).__name__

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision_model.parameters()).dtype

    def vision_weights_hash(self) -> str:
        """sha256 over the vision tower's parameter names, shapes, dtypes and bytes."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.vision_model.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    # --- images ----------------------------------------------------------------------------------
    def encoder_views(self, images: list[Image.Image]) -> torch.Tensor:
        """One encoder-sized view per image, (B, 3, S, S), as the VLM's own processor makes it."""
        out = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return out["pixel_values"].to(self.dtype)

    def view_image(self, image: Image.Image) -> Image.Image:
        """The picture the encoder actually sees for ``encoder_views`` (for drawing merge maps)."""
        pixels = self.encoder_views([image])[0].float()
        mean = torch.tensor(self.image_processor.image_mean)[:, None, None]
        std = torch.tensor(self.image_processor.image_std)[:, None, None]
        rgb = (pixels * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        return Image.fromarray((rgb * 255).round().astype("uint8"))

    @torch.no_grad()
    def encode(
        self,
        pixel_values: torch.Tensor,
        rule: MergeRule | None = None,
        token_order: TokenOrder = "spatial",
    ) -> list[EncodedImage]:
        """Run the stock vision tower (with merging when ``rule`` is given) and split per image."""
        if rule is None:
            out = self.vision_model(pixel_values, output_hidden_states=True)
            hidden = out.hidden_states[self.feature_layer]
            bsz, n, _ = hidden.shape
            device = hidden.device
            snap = LayerSnapshot(
                valid=torch.ones(bsz, n, dtype=torch.bool, device=device),
                sizes=torch.ones(bsz, n, device=device),
                source=torch.arange(n, device=device).expand(bsz, n),
            )
            snapshots = [snap] * (self.num_layers + 1)
        else:
            with attach_merging(self.vision_model, rule, protected=self.protected, token_order=token_order) as st:
                out = self.vision_model(pixel_values, output_hidden_states=True)
            hidden = out.hidden_states[self.feature_layer]
            snapshots = st.snapshots
        return self._split(hidden, snapshots)

    def _split(self, hidden: torch.Tensor, snapshots: list[LayerSnapshot]) -> list[EncodedImage]:
        final = snapshots[self.feature_layer]
        counts = [snap.counts(self.protected) for snap in snapshots[1:]]
        result = []
        for b in range(hidden.shape[0]):
            valid = final.valid[b]
            feats, sizes, source = hidden[b][valid], final.sizes[b][valid], final.source[b]
            if self.has_cls:
                source = source[1:] - 1
                if self.drops_cls:
                    feats, sizes = feats[1:], sizes[1:]
                else:
                    source = source + 1
            result.append(EncodedImage(feats, sizes, source.clone(), [c[b] for c in counts]))
        return result


class LlavaAdapter(VLMAdapter):
    """LLaVA-1.5 style: ``LlavaForConditionalGeneration`` with a CLIP ViT (CLS token)."""

    family = "llava"


class LlavaOnevisionAdapter(VLMAdapter):
    """LLaVA-OneVision: SigLIP without CLS, Qwen2; AnyRes views, of which the base view is used here."""

    family = "llava_onevision"

    def encoder_views(self, images: list[Image.Image]) -> torch.Tensor:
        out = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return out["pixel_values"][:, 0].to(self.dtype)  # view 0 is the whole image resized


ADAPTERS: dict[str, type[VLMAdapter]] = {"llava": LlavaAdapter, "llava_onevision": LlavaOnevisionAdapter}
