"""Family adapters: what tokcomp needs to know about a stock VLM's vision side.

Both families read the hidden states of one encoder layer: LLaVA-1.5 (CLIP, with CLS) the second to
last, CLS dropped; LLaVA-OneVision (SigLIP, no CLS) the last of its (already shortened) tower.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from jinja2 import TemplateError
from PIL import Image
from torch import nn
from transformers import PreTrainedModel

from tokcomp.errors import TokcompError
from tokcomp.methods.dtome import LayerSnapshot, MergeRule, MergeState, attach_merging, encoder_layers
from tokcomp.methods.merge import TokenOrder


@dataclass
class EncodedImage:
    """One encoder view after (optional) merging, at the layer the VLM reads."""

    features: torch.Tensor  # (n, D) vision hidden states (or projected), CLS dropped where the VLM drops it
    sizes: torch.Tensor  # (n,) patches per token
    source: torch.Tensor  # (P,) long: patch position (raster order) -> token index
    layer_counts: list[int]  # patch tokens after each encoder layer

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])


class VLMAdapter:
    """A loaded stock VLM plus its tokenizer and image processor."""

    family: str = ""

    def __init__(self, model: PreTrainedModel, tokenizer, image_processor, name: str, path: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name = name
        self.path = path
        self.merging: MergeState | None = None  # set while a merging method is attached
        self.active_method = None  # set while a method is attached with ``with method(adapter):``
        self.shape = None  # the real-model shape this stands for (benchmark presets), if any
        self.processor_template: str | None = None  # the processor's chat template (load_vlm finds it)

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

    @property
    def dtype_name(self) -> str:
        """The vision tower's dtype as a name (``float32``, ``bfloat16``): what calibrations record."""
        return str(self.dtype).removeprefix("torch.")

    def vision_weights_hash(self) -> str:
        """sha256 over the vision tower's parameter names, shapes, dtypes and bytes (computed once)."""
        if getattr(self, "_vision_hash", None) is None:
            self._vision_hash = self._hash_vision_weights()
        return self._vision_hash

    def _hash_vision_weights(self) -> str:
        digest = hashlib.sha256()
        for name, tensor in sorted(self.vision_model.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    # --- language model --------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def embed_tokens(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def video_token_id(self) -> int | None:
        value = getattr(self.model.config, "video_token_id", None)
        return None if value is None else int(value)

    def chat_template(self) -> str | None:
        """The processor's chat template (the one written for image and video turns), else the tokenizer's."""
        return self.processor_template or self.tokenizer.chat_template or None

    def build_prompt(self, prompt: str, num_images: int, has_video: bool) -> str:
        """The user turn with one placeholder per image (and video), unless the prompt places them."""
        image_tag, video_tag = "<image>", "<video>"
        tags = image_tag * num_images + video_tag * int(has_video)
        placed = (
            prompt.count(image_tag) == num_images
            and prompt.count(video_tag) == int(has_video)
            and (num_images or has_video)
        )
        if placed:
            content = [{"type": "text", "text": prompt}]
        else:
            if image_tag in prompt or video_tag in prompt:
                raise TokcompError(
                    f"the prompt places {prompt.count(image_tag)} <image> and {prompt.count(video_tag)} <video> "
                    f"tags but {num_images} image(s) and {int(has_video)} video were given"
                )
            content = [{"type": "image"}] * num_images + [{"type": "video"}] * int(has_video)
            content.append({"type": "text", "text": prompt})
        template = self.chat_template()
        inline = prompt if placed or not tags else f"{tags}\n{prompt}"  # LLaVA's way of placing them in text
        if template is None:
            return f"USER: {inline} ASSISTANT:"
        try:
            return self._apply_template([{"role": "user", "content": content}], template)
        except (TypeError, TemplateError):  # a template for string contents only (a text model's)
            return self._apply_template([{"role": "user", "content": inline}], template)

    def _apply_template(self, messages: list[dict], template: str) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=template
        )

    # --- visual units (see tokcomp.models.visual) -----------------------------------------------
    def prepare_units(self, images: list[Image.Image], video: list[Image.Image] | None) -> list:
        raise NotImplementedError

    def stock_unit_tokens(self, units: list) -> list:
        """Each unit's LLM tokens exactly as the stock model computes them (no merging)."""
        raise NotImplementedError

    def merged_unit_tokens(self, unit, views: list[EncodedImage]) -> object:
        """A unit's unique tokens and map, from its merged views (features already projected)."""
        raise NotImplementedError

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
        project: bool = False,
    ) -> list[EncodedImage]:
        """Run the stock vision tower and split per view.

        Merging comes from ``rule`` (attached for this call) or from a method attached to the adapter;
        without either this is the stock encoder.
        """
        if rule is not None:
            with attach_merging(self.vision_model, rule, protected=self.protected, token_order=token_order) as st:
                out = self.vision_model(pixel_values, output_hidden_states=True)
            snapshots = st.snapshots
        else:
            out = self.vision_model(pixel_values, output_hidden_states=True)
            snapshots = self.merging.snapshots if self.merging is not None else None
        hidden = out.hidden_states[self.feature_layer]
        if snapshots is None:  # the stock encoder: every token stands for itself
            bsz, n, _ = hidden.shape
            device = hidden.device
            snap = LayerSnapshot(
                valid=torch.ones(bsz, n, dtype=torch.bool, device=device),
                sizes=torch.ones(bsz, n, device=device),
                source=torch.arange(n, device=device).expand(bsz, n),
            )
            snapshots = [snap] * (self.num_layers + 1)
        return self._split(hidden, snapshots, project)

    def _split(self, hidden: torch.Tensor, snapshots: list[LayerSnapshot], project: bool) -> list[EncodedImage]:
        """Per-view results; ``project`` maps features to LLM space (on the padded batch, as the stock model)."""
        final = snapshots[self.feature_layer]
        if project:
            hidden = self.model.model.multi_modal_projector(hidden)
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

    def prepare_units(self, images, video):
        from tokcomp.models.visual import VisualUnit

        if video:
            raise TokcompError(f"{self.name} is a LLaVA-1.5 model: it takes images, not video")
        if not images:
            return []
        views = self.encoder_views(images)
        return [VisualUnit("image", views[i : i + 1]) for i in range(len(images))]

    def stock_unit_tokens(self, units):
        from tokcomp.models.visual import identity_tokens

        if not units:
            return []
        pixels = torch.cat([u.views for u in units])
        features = self.model.model.get_image_features(pixel_values=pixels).pooler_output
        full = [self.num_patches] * self.num_layers
        return [identity_tokens(f, full) for f in features]  # one view per image

    def merged_unit_tokens(self, unit, views):
        from tokcomp.models.visual import tokens_from_copies

        (view,) = views
        return tokens_from_copies(view.features[view.source], view.source, view.features, view.layer_counts)


class LlavaOnevisionAdapter(VLMAdapter):
    """LLaVA-OneVision: SigLIP without CLS, Qwen2; AnyRes views, of which the base view is used here."""

    family = "llava_onevision"

    def encoder_views(self, images: list[Image.Image]) -> torch.Tensor:
        out = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return out["pixel_values"][:, 0].to(self.dtype)  # view 0 is the whole image resized

    def prepare_units(self, images, video):
        """One image alone gets AnyRes views (base + crops); several images get their base view each."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        from tokcomp.models.visual import VisualUnit

        units = []
        if images:
            out = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
            pixels, sizes = out["pixel_values"].to(self.dtype), out["image_sizes"]
            anyres = len(images) == 1
            for i in range(len(images)):
                size = (int(sizes[i][0]), int(sizes[i][1]))
                n = (
                    image_size_to_num_patches(size, self.model.config.image_grid_pinpoints, self.image_size)
                    if anyres
                    else 1
                )
                units.append(VisualUnit("image", pixels[i, :n], size, anyres))
        if video:
            units.append(VisualUnit("video", self.encoder_views(video)))
        return units

    def stock_unit_tokens(self, units):
        from tokcomp.models.visual import identity_tokens

        full = [self.num_patches] * self.num_layers
        result: dict[int, object] = {}
        images = [(i, u) for i, u in enumerate(units) if u.kind == "image"]
        if images:
            most = max(u.views.shape[0] for _, u in images)
            pixels = torch.zeros(len(images), most, *images[0][1].views.shape[1:], dtype=self.dtype)
            for j, (_, u) in enumerate(images):
                pixels[j, : u.views.shape[0]] = u.views
            sizes = torch.tensor([u.image_size for _, u in images])
            out = self.model.model.get_image_features(
                pixel_values=pixels, image_sizes=sizes, batch_num_images=torch.tensor([len(images)])
            ).pooler_output
            for (i, u), features in zip(images, out, strict=True):
                views = u.views.shape[0]
                result[i] = identity_tokens(features, [c * views for c in full], views=views)
        for i, u in enumerate(units):
            if u.kind == "video":
                features = self.model.model.get_video_features(u.views[None]).pooler_output[0]
                frames = u.views.shape[0]
                result[i] = identity_tokens(features, [c * frames for c in full], num_frames=frames, views=frames)
        return [result[i] for i in range(len(units))]

    def merged_unit_tokens(self, unit, views):
        from tokcomp.models.visual import summed_counts, tokens_from_copies

        feats = torch.cat([v.features for v in views])
        offsets = [0]
        for v in views:
            offsets.append(offsets[-1] + v.num_tokens)
        expanded = torch.stack([v.features[v.source] for v in views])  # (V, P, H): merged tokens copied back
        owners = torch.stack([v.source + offsets[i] for i, v in enumerate(views)])  # (V, P)
        newline = self.model.model.image_newline
        if unit.kind == "video":
            full, owner = self._pooled_layout(views, expanded, offsets, newline)
        elif unit.anyres:
            full, owner = self._anyres_layout(unit, expanded, owners, newline)
        else:
            full = torch.cat([expanded[0], newline[None].to(expanded)])
            owner = torch.cat([owners[0], owners.new_full((1,), -1)])
        frames = len(views) if unit.kind == "video" else 0
        return tokens_from_copies(full, owner, feats, summed_counts(views), num_frames=frames, views=len(views))

    def _anyres_layout(self, unit, expanded, owners, newline):
        """Stock ``pack_image_features`` on the copied-back tokens, and on canvas coordinates."""
        from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

        model = self.model.model
        h, w = self.grid
        size = torch.tensor([unit.image_size])
        full = model.pack_image_features([expanded], size, image_newline=newline)[0][0]
        crops = expanded.shape[0] - 1
        _, cols_n = get_anyres_image_grid_shape(unit.image_size, model.config.image_grid_pinpoints, self.image_size)
        coords = torch.zeros(crops + 1, h * w, 3)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        for c in range(crops):
            i, j = divmod(c, cols_n)
            coords[c + 1, :, 0] = (i * h + ys).flatten().float()
            coords[c + 1, :, 1] = (j * w + xs).flatten().float()
            coords[c + 1, :, 2] = 1.0
        packed = model.pack_image_features([coords], size, image_newline=torch.tensor([-1.0, -1.0, 0.0]))[0][0]
        owner = torch.full((packed.shape[0],), -1, dtype=torch.long)
        owner[: h * w] = owners[0]
        tail = packed[h * w :]
        row, col, present = tail[:, 0], tail[:, 1], tail[:, 2]
        exact = (present == 1) & (row == row.round()) & (col == col.round()) & (row >= 0)
        r, cc = row[exact].long(), col[exact].long()
        crop = (r // h) * cols_n + (cc // w)
        patch = (r % h) * w + (cc % w)
        owner[h * w :][exact] = owners[1:][crop, patch]
        return full, owner

    def _pooled_layout(self, views, expanded, offsets, newline):
        """Stock frame pooling on the copied-back tokens; a pooled position is pure if one token fills it."""
        model = self.model.model
        pooled = model.apply_pooling(expanded)  # (T, Q, H)
        owner_rows = []
        for v, offset in zip(views, offsets, strict=False):
            membership = torch.nn.functional.one_hot(v.source, v.num_tokens).to(torch.float32)[None]
            weights = model.apply_pooling(membership)[0]  # (Q, n_tokens)
            best, which = weights.max(dim=-1)
            pure = (best - 1).abs() < 1e-5
            owner_rows.append(torch.where(pure, which + offset, torch.full_like(which, -1)))
        full = torch.cat([pooled.flatten(0, 1), newline[None].to(pooled)])
        owner = torch.cat([*owner_rows, torch.full((1,), -1, dtype=torch.long)])
        return full, owner


ADAPTERS: dict[str, type[VLMAdapter]] = {"llava": LlavaAdapter, "llava_onevision": LlavaOnevisionAdapter}
