"""BLIP: a ViT image encoder, a text encoder and an image-grounded text decoder, trained from scratch
with image-text contrast (ITC), language modelling (LM) and optionally image-text matching (ITM).

    from blipcore import BlipConfig, BLIP, load_tokenizer
    cfg = BlipConfig.preset("seed"); model = BLIP(cfg); tok = load_tokenizer()
    out = model(images, input_ids, attention_mask)  # {'loss', 'itc', 'lm'[, 'itm']}

With model.mae the model is the ViT and a masked-autoencoder decoder only (image pretraining, blipcore.model.mae): its
forward reads the images alone and returns {'mae', 'loss'}.

`input_ids` are the tokenizer's [CLS] caption [SEP] (right-padded). The model derives the other two
views itself: [ENC] caption for ITM, and [DEC] prompt caption for the decoder, whose prompt tokens
and padding are excluded from the LM loss.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import losses
from .config import BlipConfig, ModelConfig
from .layers import DropPath, init_weights
from .mae import EVAL_MASK_SEED, MAEDecoder, masked_autoencoder_loss
from .text import KVCache, TextDecoder, TextEncoder
from .tokenizer import load_tokenizer, special_ids
from .vision import VisionTransformer
from .vocabulary import CompactEmbedding

SIGLIP_BIAS_INIT = -10.0


@dataclass
class DecoderBatch:
    """The decoder's view of a caption batch: [DEC] prompt caption, truncated to max_text_len."""

    input_ids: Tensor  # (B, L)
    labels: Tensor  # (B, L): -100 at [DEC], prompt and padding


class BLIP(nn.Module):
    def __init__(self, cfg: BlipConfig | ModelConfig, word_pieces: Sequence[int] | None = None) -> None:
        """`word_pieces`: with model.vocabulary = "captions", the kept bert-base-uncased ids
        (blipcore.model.vocabulary.caption_word_pieces of the training captions); without them the model is a skeleton
        for a checkpoint's weights, its vocabulary loaded with them."""
        super().__init__()
        self.cfg = cfg.model if isinstance(cfg, BlipConfig) else cfg
        m = self.cfg
        self.ids = special_ids()
        prompt_ids = load_tokenizer()(m.prompt, add_special_tokens=False).input_ids
        if 1 + len(prompt_ids) >= m.max_text_len:
            raise ValueError(f"prompt {m.prompt!r} leaves no room for a caption in max_text_len={m.max_text_len}")
        self.register_buffer("prompt_ids", torch.tensor(prompt_ids, dtype=torch.long), persistent=False)

        self.visual_encoder = VisionTransformer(m)
        self.use_itc, self.use_lm, self.use_itm = m.itc_weight > 0, m.lm_weight > 0, m.itm_weight > 0
        if m.mae:  # image pretraining: the ViT and the decoder that fills in its hidden patches, no text tower
            self.word_embeddings = None
            self.mae_decoder = MAEDecoder(m)
            return
        if m.vocabulary == "captions":
            if word_pieces is not None and len(word_pieces) != m.vocab_size:
                raise ValueError(f"{len(word_pieces)} word pieces for model.vocab_size={m.vocab_size}")
            self.word_embeddings = CompactEmbedding(m.vocab_size if word_pieces is None else word_pieces,
                                                    m.text_width, self.ids["pad"])
        else:
            self.word_embeddings = nn.Embedding(m.vocab_size, m.text_width, padding_idx=self.ids["pad"])
        init_weights(self.word_embeddings)
        if self.use_itc or self.use_itm:
            self.text_encoder = TextEncoder(m, self.word_embeddings, multimodal=self.use_itm)
        if self.use_itc:
            self.vision_proj = nn.Linear(m.vision_width, m.embed_dim)
            self.text_proj = nn.Linear(m.text_width, m.embed_dim)
            init_weights(self.vision_proj)
            init_weights(self.text_proj)
            self.temp = nn.Parameter(torch.tensor(m.temperature_init))
            if m.itc_loss == "sigmoid":  # SigLIP's learned logit bias, initialised as the paper does (-10)
                self.itc_bias = nn.Parameter(torch.tensor(SIGLIP_BIAS_INIT))
        if self.use_itm:
            self.itm_head = nn.Linear(m.text_width, 2)
            init_weights(self.itm_head)
        if self.use_lm:
            self.text_decoder = TextDecoder(m, self.word_embeddings)
        if m.momentum_encoder and self.use_itc:
            self._build_momentum_encoder()

    # --- momentum encoder (BLIP's MoCo-style queue of negatives) ---------------------------------
    def _build_momentum_encoder(self) -> None:
        m = self.cfg
        self.momentum_pairs = [
            ("visual_encoder", "visual_encoder_m"),
            ("vision_proj", "vision_proj_m"),
            ("text_encoder", "text_encoder_m"),
            ("text_proj", "text_proj_m"),
        ]
        for online, target in self.momentum_pairs:
            module = copy.deepcopy(getattr(self, online))
            module.requires_grad_(False)
            for layer in module.modules():  # the momentum model computes targets: no stochastic depth (as ALBEF)
                if isinstance(layer, DropPath):
                    layer.rate = 0.0
            setattr(self, target, module)
        self.register_buffer("image_queue", F.normalize(torch.randn(m.embed_dim, m.queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(m.embed_dim, m.queue_size), dim=0))
        # Queue ids start at -1: they match no real image, so random initial keys are pure negatives.
        self.register_buffer("idx_queue", torch.full((m.queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _momentum_update(self) -> None:
        for online, target in self.momentum_pairs:
            for p, p_m in zip(getattr(self, online).parameters(), getattr(self, target).parameters(), strict=True):
                p_m.mul_(self.cfg.momentum).add_(p.detach(), alpha=1 - self.cfg.momentum)

    @torch.no_grad()
    def _enqueue(self, image_feat_m: Tensor, text_feat_m: Tensor, image_ids: Tensor) -> None:
        image_feat_m, text_feat_m, image_ids = map(losses.gather_no_grad, (image_feat_m, text_feat_m, image_ids))
        n, size = image_feat_m.shape[0], self.image_queue.shape[1]
        slots = (self.queue_ptr + torch.arange(n, device=image_ids.device)) % size
        self.image_queue[:, slots] = image_feat_m.t().to(self.image_queue.dtype)
        self.text_queue[:, slots] = text_feat_m.t().to(self.text_queue.dtype)
        self.idx_queue[slots] = image_ids
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    # --- encoders --------------------------------------------------------------------------------
    def encode_image(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """images (B, 3, S, S) -> image tokens (B, 1+N, vision_width) and, with ITC, the L2-normalised
        embedding in the shared space (B, embed_dim)."""
        image_embeds, _ = self.visual_encoder(images)
        feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1) if self.use_itc else None
        return image_embeds, feat

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """[CLS] caption [SEP] (B, L) -> hidden states (B, L, text_width) and the L2-normalised [CLS]
        embedding in the shared space (B, embed_dim). Needs ITC."""
        if not self.use_itc:
            raise RuntimeError("this model has no ITC projection (model.itc_weight is 0)")
        hidden, _ = self.text_encoder(input_ids, attention_mask)
        return hidden, F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def itm_logits(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Image-text matching logits (B, 2) [no match, match] from the multimodal [ENC] embedding."""
        if not self.use_itm:
            raise RuntimeError("this model has no ITM head (model.itm_weight is 0)")
        enc_ids = input_ids.clone()
        enc_ids[:, 0] = self.ids["enc"]
        hidden, _ = self.text_encoder(enc_ids, attention_mask, image_embeds=image_embeds)
        return self.itm_head(hidden[:, 0])

    @property
    def temperature(self) -> Tensor:
        """The ITC temperature for reporting (detached), clamped to [temperature_min, temperature_max]."""
        return self.temp.detach().clamp(self.cfg.temperature_min, self.cfg.temperature_max)

    # --- decoder ---------------------------------------------------------------------------------
    def decoder_batch(self, input_ids: Tensor, attention_mask: Tensor) -> DecoderBatch:
        """[CLS] caption [SEP] -> [DEC] prompt caption [SEP], with LM labels."""
        batch, prefix = input_ids.shape[0], 1 + len(self.prompt_ids)
        head = torch.cat(
            [torch.full((batch, 1), self.ids["dec"], device=input_ids.device), self.prompt_ids.expand(batch, -1)], 1
        )
        ids = torch.cat([head, input_ids[:, 1:]], dim=1)[:, : self.cfg.max_text_len]
        mask = torch.cat([torch.ones_like(head), attention_mask[:, 1:]], dim=1)[:, : self.cfg.max_text_len]
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :prefix] = -100
        return DecoderBatch(ids, labels)

    def decoder_prefix(self, batch: int, device: torch.device | str) -> Tensor:
        """[DEC] prompt for `batch` captions: where generation starts (B, 1 + prompt tokens)."""
        head = torch.full((batch, 1), self.ids["dec"], dtype=torch.long, device=device)
        return torch.cat([head, self.prompt_ids.to(device).expand(batch, -1)], dim=1)

    def decode_step(
        self, input_ids: Tensor, image_embeds: Tensor, cache: KVCache | None = None, need_weights: bool = False
    ) -> tuple[Tensor, list[Tensor] | None]:
        """Decoder logits (B, L, vocab) for new tokens, appending them to `cache` when given. A text-only
        language model (model.text_only) ignores the image."""
        context = None if self.cfg.text_only else image_embeds
        return self.text_decoder(input_ids, context, cache=cache, need_weights=need_weights)

    def new_cache(self) -> KVCache:
        return KVCache.empty(self.cfg.text_decoder_depth)

    # --- training forward ------------------------------------------------------------------------
    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_ids: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Losses on a batch of (image, caption) pairs.

        images (B, 3, S, S); input_ids, attention_mask (B, L) from the tokenizer; image_ids (B,)
        says which pairs show the same image (two captions of one image are not negatives of each
        other). Returns {'loss': weighted sum, and each active term: 'itc', 'lm', 'itm'}; with model.mae,
        {'mae', 'loss'} of the images alone (in eval mode on masks of a fixed seed: blipcore.model.mae).
        """
        if self.cfg.mae:
            generator = None if self.training else torch.Generator(images.device).manual_seed(EVAL_MASK_SEED)
            loss = masked_autoencoder_loss(self.visual_encoder, self.mae_decoder, images,
                                           self.cfg.mae_visible_patches(), generator)
            return {"mae": loss, "loss": loss}
        if image_ids is None:
            rank = torch.distributed.get_rank() if self.training and losses.is_distributed() else 0
            image_ids = torch.arange(len(images), device=images.device) + rank * len(images)
        cfg = self.cfg
        # Gather negatives / token counts across ranks only when training: evaluation runs on one rank.
        distributed = self.training and losses.is_distributed()
        out: dict[str, Tensor] = {}
        # A text-only language model (decoder pretraining) reads the captions alone, never the images.
        image_embeds, image_feat = (None, None) if cfg.text_only else self.encode_image(images)

        if self.use_itc:
            with torch.no_grad():
                self.temp.clamp_(cfg.temperature_min, cfg.temperature_max)
            _, text_feat = self.encode_text(input_ids, attention_mask)
            if cfg.momentum_encoder and self.training:
                out["itc"] = self._momentum_itc(images, input_ids, attention_mask, image_feat, text_feat, image_ids)
                sim_i2t = image_feat.detach() @ text_feat.detach().t()
            elif cfg.itc_loss == "sigmoid":
                out["itc"], sim_i2t = losses.sigmoid_contrastive_loss(image_feat, text_feat, self.temp, self.itc_bias,
                                                                      image_ids, distributed)
            else:  # evaluation scores in-batch negatives and leaves the momentum encoder and queue untouched
                out["itc"], sim_i2t = losses.contrastive_loss(image_feat, text_feat, self.temp, image_ids, distributed)

        if self.use_itm:
            scaled = sim_i2t / self.temp.detach()
            out["itm"] = self._itm_loss(image_embeds, input_ids, attention_mask, scaled, image_ids)

        if self.use_lm:
            dec = self.decoder_batch(input_ids, attention_mask)
            hidden, _ = self.text_decoder(dec.input_ids, image_embeds, return_hidden=True)
            labels = dec.labels  # the LM head predicts this model's vocabulary: a compact one, compact labels
            if isinstance(self.word_embeddings, CompactEmbedding):
                labels = self.word_embeddings.compact(labels)
            out["lm"] = losses.lm_loss(hidden, labels, self.text_decoder.lm_head, cfg.label_smoothing, distributed)

        weights = {"itc": cfg.itc_weight, "lm": cfg.lm_weight, "itm": cfg.itm_weight}
        out["loss"] = sum(weights[name] * value for name, value in out.items())
        return out

    def _momentum_itc(
        self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, image_feat: Tensor, text_feat: Tensor,
        image_ids: Tensor,
    ) -> Tensor:
        with torch.no_grad():
            self._momentum_update()
            image_embeds_m, _ = self.visual_encoder_m(images)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0]), dim=-1)
            text_hidden_m, _ = self.text_encoder_m(input_ids, attention_mask)
            text_feat_m = F.normalize(self.text_proj_m(text_hidden_m[:, 0]), dim=-1)
            image_keys = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], dim=1)
            text_keys = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], dim=1)
            key_ids = torch.cat([image_ids, self.idx_queue.clone()])
        loss = losses.momentum_contrastive_loss(
            image_feat, text_feat, image_keys, text_keys, key_ids, image_ids, self.temp, self.cfg.distill_alpha
        )
        self._enqueue(image_feat_m, text_feat_m, image_ids)
        return loss

    def _itm_loss(
        self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor, sim_i2t: Tensor, image_ids: Tensor
    ) -> Tensor:
        """Binary matching on B positives and 2B negatives (a text per image, an image per text), mined by ITC
        similarity unless model.itm_hard_negatives is off."""
        if len(image_ids) < 2:
            raise ValueError("ITM needs at least 2 pairs per batch to draw negatives")
        neg_text, neg_image = losses.sample_negatives(sim_i2t, image_ids, hard=self.cfg.itm_hard_negatives)
        all_images = torch.cat([image_embeds, image_embeds, image_embeds[neg_image]], dim=0)
        all_ids = torch.cat([input_ids, input_ids[neg_text], input_ids], dim=0)
        all_mask = torch.cat([attention_mask, attention_mask[neg_text], attention_mask], dim=0)
        logits = self.itm_logits(all_images, all_ids, all_mask)
        batch = len(image_ids)
        labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(logits.device)
        return F.cross_entropy(logits.float(), labels)

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
