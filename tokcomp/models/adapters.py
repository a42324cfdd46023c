"""Family adapters: what tokcomp needs to know about a stock VLM's vision side.

Both families read the hidden states of one encoder layer: LLaVA-1.5 (CLIP, with CLS) the second to
last, CLS dropped; LLaVA-OneVision (SigLIP, no CLS) the last of its (already shortened) tower.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from jinja2 import TemplateError
from PIL import Image
from torch import nn
from transformers import PreTrainedModel

from tokcomp.errors import TokcompError
from tokcomp.methods.dtome import LayerSnapshot, MergeRule, MergeState, attach_merging, encoder_layers
from tokcomp.methods.merge import TokenOrder
from tokcomp.methods.trace import EncoderTrace, TraceSpec, TraceView, attach_trace
from tokcomp.models.visual import (
    EncodedImage,
    VisualUnit,
    identity_tokens,
    summed_counts,
    tokens_from_copies,
)


class VLMAdapter:
    """A loaded stock VLM plus its tokenizer and image processor."""

    family: str = ""
    uses_mrope: bool = False  # 3-D rotary positions (Qwen2.5-VL): the LLM input carries (3, L) positions
    supports_encoder_merging: bool = True  # in-encoder merging (DToMe, ToMe) and its calibration
    supports_encoder_traces: bool = True  # encoder traces (VisionZip, PruMerge+)
    # the stock feature functions run the attached merging themselves (the pipeline needs no own encode)
    merges_in_stock_features: bool = False
    # DeepStack (Qwen3-VL): encoder features the LLM adds to the visual positions' hidden states after
    # each of its first ``deepstack_levels`` layers
    deepstack_levels: int = 0
    merge_unit: str = "patches"  # what in-encoder merging merges (Qwen2.5-VL: whole 2x2 merge units)

    def __init__(self, model: PreTrainedModel, tokenizer, image_processor, name: str, path: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name = name
        self.path = path
        self.merging: MergeState | None = None  # set while a merging method is attached
        self.trace: EncoderTrace | None = None  # set while a method that reads an encoder trace is attached
        self.active_method = None  # set while a method is attached with ``with method(adapter):``
        self.shape = None  # the real-model shape this stands for (benchmark presets), if any
        self.processor_template: str | None = None  # the processor's chat template (load_vlm finds it)
        self.bridge = None  # the hooks on the stock model's forward and generate while a method is attached

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
            content = [{"type": "text", "text": self.inline_tags(prompt)}]
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

    def inline_tags(self, prompt: str) -> str:
        """A prompt that places its own ``<image>``/``<video>`` tags, in the family's own words for them."""
        return prompt

    def video_prompt(self, prompt: str, num_frames: int) -> str:
        """A rendered prompt with its video placeholder written as the family's stock processor writes it
        before expanding it (Qwen3-VL: one timestamped run per frame group); most families: as it is."""
        return prompt

    def placeholder_runs(self, kind: str, frames: int) -> int:
        """How many placeholders of the prompt one unit takes (Qwen3-VL: one per frame group of a video)."""
        return 1

    def _apply_template(self, messages: list[dict], template: str) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=template
        )

    @contextmanager
    def attach_merging(self, rule: MergeRule, token_order: TokenOrder = "spatial") -> Iterator[object]:
        """Token merging inside this family's vision encoder for the ``with`` block; yields its state."""
        with attach_merging(self.vision_model, rule, protected=self.protected, token_order=token_order) as state:
            yield state

    def attach_trace(self, spec: TraceSpec) -> contextlib.AbstractContextManager:
        """The encoder trace ``spec`` on this family's vision tower for the ``with`` block (under the attached
        in-encoder merging, if any); yields the trace, whose ``take`` gives the views traced since."""
        return attach_trace(self.vision_model, spec, cls=self.has_cls, merging=self.merging)

    # --- visual units (see tokcomp.models.visual) -----------------------------------------------
    def prepare_units(self, images: list[Image.Image], video: list[Image.Image] | None) -> list:
        raise NotImplementedError

    def stock_unit_tokens(self, units: list) -> list:
        """Each unit's LLM tokens exactly as the stock model computes them (no merging)."""
        raise NotImplementedError

    def merged_unit_tokens(self, unit, views: list[EncodedImage]) -> object:
        """A unit's unique tokens and map, from its merged views (features already projected)."""
        raise NotImplementedError

    def provenance(self, unit) -> torch.Tensor:
        """(N, 2) long: (view, patch) of every position of the unit's stock layout (see ``UnitTokens``)."""
        raise NotImplementedError

    def layout(self, unit, values: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """Per-patch values of the unit's views, (V, P, C), laid out as the stock model lays out its visual
        features, (N, C): its own packing/pooling on them, ``fill`` (C,) where a position holds no patch."""
        raise NotImplementedError

    def encode_order(self, units: list) -> list[int]:
        """The units in the order ``stock_unit_tokens`` runs their views through the vision tower."""
        return list(range(len(units)))

    def _placed(self, unit, tokens):
        tokens.provenance = self.provenance(unit).to(tokens.mapping.device)
        return tokens

    def traced_views(self, unit) -> int:
        """How many views of the encoder trace a unit takes (an encoder view each: AnyRes crops, frames)."""
        return unit.views.shape[0]

    def add_trace(self, units: list, tokens: list, views: list[TraceView], stock: bool) -> None:
        """Each unit's ``trace`` (and ``trace_keys``) per position from the traced views of its encode:
        ``stock_unit_tokens`` (views in ``encode_order``) or one merged encode (views in unit order)."""
        cursor = 0
        for i in self.encode_order(units) if stock else range(len(units)):
            count = self.traced_views(units[i])
            mine, cursor = views[cursor : cursor + count], cursor + count
            values = torch.stack([torch.cat([v.scores[:, None], *([v.keys] if v.keys is not None else [])], 1)
                                  for v in mine])  # fmt: skip
            laid = self.layout(units[i], values, torch.full(values.shape[-1:], float("nan"), device=values.device))
            tokens[i].trace = laid[:, 0].to(tokens[i].mapping.device)
            tokens[i].trace_keys = laid[:, 1:].to(tokens[i].mapping.device) if mine[0].keys is not None else None
        if cursor != len(views):
            raise RuntimeError(f"the encoder trace saw {len(views)} views; the units have {cursor}")

    def units_from_inputs(self, rows: list[torch.Tensor], inputs: dict) -> list[tuple[list, list]]:
        """The visual units of stock processor outputs, per request: (images, videos), each a list of
        (unit, stock token count) in order; ``rows`` are each request's input ids without padding."""
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
            with self.attach_merging(rule, token_order) as st:
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
        if video:
            raise TokcompError(f"{self.name} is a LLaVA-1.5 model: it takes images, not video")
        if not images:
            return []
        views = self.encoder_views(images)
        return [VisualUnit("image", views[i : i + 1]) for i in range(len(images))]

    def stock_unit_tokens(self, units):
        if not units:
            return []
        pixels = torch.cat([u.views for u in units])
        features = self.model.model.get_image_features(pixel_values=pixels).pooler_output
        full = [self.num_patches] * self.num_layers
        return [self._placed(u, identity_tokens(f, full)) for u, f in zip(units, features, strict=True)]

    def merged_unit_tokens(self, unit, views):
        (view,) = views
        tokens = tokens_from_copies(view.features[view.source], view.source, view.features, view.layer_counts)
        return self._placed(unit, tokens)

    def provenance(self, unit):
        patches = torch.stack([torch.zeros(self.num_patches, dtype=torch.long), torch.arange(self.num_patches)], 1)
        return patches if self.drops_cls or not self.has_cls else torch.cat([torch.tensor([[-1, -1]]), patches])

    def layout(self, unit, values, fill):
        return values[0] if self.drops_cls or not self.has_cls else torch.cat([fill[None], values[0]])

    def units_from_inputs(self, rows, inputs):
        if inputs.get("pixel_values_videos") is not None:
            raise TokcompError(f"{self.name} is a LLaVA-1.5 model: it takes images, not video")
        pixels = inputs.get("pixel_values")
        per_image = self.num_patches + (1 if self.has_cls and not self.drops_cls else 0)
        out, cursor = [], 0
        for ids in rows:
            tokens = int((ids == self.image_token_id).sum())
            if tokens % per_image:
                raise TokcompError(f"a request holds {tokens} image tokens, not a multiple of {per_image} per image")
            n = tokens // per_image
            if pixels is None or cursor + n > pixels.shape[0]:
                raise TokcompError("the input ids hold more image tokens than the pixel_values give images")
            out.append(([(VisualUnit("image", pixels[i : i + 1].to(self.dtype)), per_image)
                         for i in range(cursor, cursor + n)], []))  # fmt: skip
            cursor += n
        return out


class LlavaOnevisionAdapter(VLMAdapter):
    """LLaVA-OneVision: SigLIP without CLS, Qwen2; AnyRes views, of which the base view is used here."""

    family = "llava_onevision"

    def encoder_views(self, images: list[Image.Image]) -> torch.Tensor:
        out = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return out["pixel_values"][:, 0].to(self.dtype)  # view 0 is the whole image resized

    def _image_unit(self, pixels: torch.Tensor, size, anyres: bool) -> VisualUnit:
        """One image of the processor's output (its padded views): all its AnyRes views, or the base one."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        size = (int(size[0]), int(size[1]))
        pinpoints = self.model.config.image_grid_pinpoints
        views = image_size_to_num_patches(size, pinpoints, self.image_size) if anyres else 1
        return VisualUnit("image", pixels[:views].to(self.dtype), size, anyres)

    def prepare_units(self, images, video):
        """One image alone gets AnyRes views (base + crops); several images get their base view each."""
        units = []
        if images:
            out = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
            pixels, sizes = out["pixel_values"], out["image_sizes"]
            units = [self._image_unit(pixels[i], sizes[i], len(images) == 1) for i in range(len(images))]
        if video:
            units.append(VisualUnit("video", self.encoder_views(video)))
        return units

    def stock_unit_tokens(self, units):
        full = [self.num_patches] * self.num_layers
        result: dict[int, object] = {}
        images = [(i, u) for i, u in enumerate(units) if u.kind == "image"]
        if images:
            most = max(u.views.shape[0] for _, u in images)
            pixels = torch.zeros(len(images), most, *images[0][1].views.shape[1:], dtype=self.dtype)
            for j, (_, u) in enumerate(images):
                pixels[j, : u.views.shape[0]] = u.views
            sizes = torch.tensor([u.image_size for _, u in images])
            # the stock grouping: AnyRes crops for a lone image (or every image, ungrouped), else base views
            grouping = [1] * len(images) if all(u.anyres for _, u in images) else [len(images)]
            out = self.model.model.get_image_features(
                pixel_values=pixels, image_sizes=sizes, batch_num_images=torch.tensor(grouping)
            ).pooler_output
            for (i, u), features in zip(images, out, strict=True):
                views = u.views.shape[0]
                result[i] = self._placed(u, identity_tokens(features, [c * views for c in full], views=views))
        for i, u in enumerate(units):
            if u.kind == "video":
                features = self.model.model.get_video_features(u.views[None]).pooler_output[0]
                frames = u.views.shape[0]
                tokens = identity_tokens(features, [c * frames for c in full], num_frames=frames, views=frames)
                result[i] = self._placed(u, tokens)
        return [result[i] for i in range(len(units))]

    def merged_unit_tokens(self, unit, views):
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
        tokens = tokens_from_copies(full, owner, feats, summed_counts(views), num_frames=frames, views=len(views))
        return self._placed(unit, tokens)

    def encode_order(self, units):
        """``stock_unit_tokens`` encodes every image (one call) before the videos (one call each)."""
        return sorted(range(len(units)), key=lambda i: units[i].kind != "image")  # stable: images, then videos

    def provenance(self, unit):
        """Base view and crops by the canvas coordinates packed as the features are; a pooled video position
        is a patch only where the stock pooling puts all its weight on one patch."""
        p = self.num_patches
        newline = torch.tensor([[-1, -1]])
        if unit.kind == "video":
            weights = self.model.model.apply_pooling(torch.eye(p)[None])[0]  # (Q, P): each patch's share
            best, which = weights.max(dim=-1)
            patch = torch.where((best - 1).abs() < 1e-5, which, torch.full_like(which, -1))
            frames = unit.views.shape[0]
            view = torch.arange(frames).repeat_interleave(patch.shape[0])
            return torch.cat([torch.stack([view, patch.repeat(frames)], 1), newline])
        if unit.anyres:
            return self._anyres_provenance(unit)
        return torch.cat([torch.stack([torch.zeros(p, dtype=torch.long), torch.arange(p)], 1), newline])

    def layout(self, unit, values, fill):
        model = self.model.model
        if unit.kind == "video":
            return torch.cat([model.apply_pooling(values).flatten(0, 1), fill[None].to(values)])
        if unit.anyres:
            size = torch.tensor([unit.image_size])
            return model.pack_image_features([values], size, image_newline=fill.to(values))[0][0]
        return torch.cat([values[0], fill[None].to(values)])

    def units_from_inputs(self, rows, inputs):
        """Images in order of ``pixel_values``, grouped by ``batch_num_images`` as the stock model groups
        them (without it every image gets its AnyRes crops, as in the stock model); one video per request."""
        pixels, sizes = inputs.get("pixel_values"), inputs.get("image_sizes")
        per_row, videos = inputs.get("batch_num_images"), inputs.get("pixel_values_videos")
        out, cursor, video_cursor = [], 0, 0
        for b, ids in enumerate(rows):
            image_tokens = int((ids == self.image_token_id).sum())
            images, taken = [], 0
            count = int(per_row[b]) if per_row is not None else None
            while (count is not None and len(images) < count) or (count is None and taken < image_tokens):
                if pixels is None or cursor >= pixels.shape[0]:
                    raise TokcompError("the input ids hold more image tokens than the pixel_values give images")
                unit = self._image_unit(pixels[cursor], sizes[cursor], count is None or count == 1)
                n = self._image_token_count(unit)
                images.append((unit, n))
                taken += n
                cursor += 1
            video_list = []
            video_tokens = int((ids == self.video_token_id).sum()) if self.video_token_id is not None else 0
            if video_tokens:
                if videos is None or video_cursor >= videos.shape[0]:
                    raise TokcompError("the input ids hold video tokens but pixel_values_videos gives no video")
                video_list.append((VisualUnit("video", videos[video_cursor].to(self.dtype)), video_tokens))
                video_cursor += 1
            out.append((images, video_list))
        return out

    def _image_token_count(self, unit) -> int:
        """The stock model's token count for one image unit (its packing run on one-wide zeros)."""
        model = self.model.model
        dummy = torch.zeros(unit.views.shape[0], self.num_patches, 1)
        newline = torch.zeros(1)
        if not unit.anyres:
            return self.num_patches + 1
        packed = model.pack_image_features([dummy], torch.tensor([unit.image_size]), image_newline=newline)[0][0]
        return int(packed.shape[0])

    def _anyres_layout(self, unit, expanded, owners, newline):
        """Stock ``pack_image_features`` on the copied-back tokens; a position is a merged token's copy where
        it is exactly one patch (``_anyres_provenance``)."""
        size = torch.tensor([unit.image_size])
        full = self.model.model.pack_image_features([expanded], size, image_newline=newline)[0][0]
        where = self._anyres_provenance(unit)
        owner = torch.full((where.shape[0],), -1, dtype=torch.long)
        exact = where[:, 1] >= 0
        owner[exact] = owners[where[exact, 0], where[exact, 1]].cpu()
        return full, owner

    def _anyres_provenance(self, unit) -> torch.Tensor:
        """Stock ``pack_image_features`` on canvas coordinates (row, col, 1; the newline -1, -1, 0): a packed
        position is a patch where it lands exactly on one, else (its nearest crop, -1)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

        model = self.model.model
        h, w = self.grid
        size = torch.tensor([unit.image_size])
        crops = unit.views.shape[0] - 1
        rows_n, cols_n = get_anyres_image_grid_shape(
            unit.image_size, model.config.image_grid_pinpoints, self.image_size
        )
        coords = torch.zeros(crops + 1, h * w, 3)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        for c in range(crops):
            i, j = divmod(c, cols_n)
            coords[c + 1, :, 0] = (i * h + ys).flatten().float()
            coords[c + 1, :, 1] = (j * w + xs).flatten().float()
            coords[c + 1, :, 2] = 1.0
        packed = model.pack_image_features([coords], size, image_newline=torch.tensor([-1.0, -1.0, 0.0]))[0][0]
        where = torch.full((packed.shape[0], 2), -1, dtype=torch.long)
        where[: h * w, 0], where[: h * w, 1] = 0, torch.arange(h * w)
        tail = packed[h * w :]
        row, col, present = tail[:, 0], tail[:, 1], tail[:, 2]
        real = present > 0.5
        exact = real & (present == 1) & (row == row.round()) & (col == col.round()) & (row >= 0)
        r = row.round().long().clamp(0, rows_n * h - 1)
        cc = col.round().long().clamp(0, cols_n * w - 1)
        crop = (r // h) * cols_n + (cc // w)
        where[h * w :, 0] = torch.where(real, crop + 1, -1)
        where[h * w :, 1] = torch.where(exact, (r % h) * w + (cc % w), -1)
        return where

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
