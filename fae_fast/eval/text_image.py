"""Text-image agreement of a caption set's samples under a frozen SigLIP or SigLIP 2 image-text model: the mean
cosine similarity between each sample's image embedding and its caption's text embedding, times 100 (as
CLIPScore reports CLIP's, without its 2.5 weight and its clipping at 0). Higher is better; scores are only
comparable under one model.

The model is a transformers checkpoint of SiglipModel or Siglip2Model with its processor (a hub id such as
google/siglip2-so400m-patch16-256, or a save_pretrained folder): the family whose text tower conditions the
generator (fae_fast/text.py). The embeddings are each tower's pooled output (SigLIP's image-text logits are
computed from those). Captions are padded to the model's text length, as SigLIP was trained.
"""
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from fae_fast.text import require_transformers


def pooled(output) -> torch.Tensor:
    """The pooled embedding of a get_*_features call: a tensor (transformers 4) or an output whose
    pooler_output it is (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class TextImageScorer:
    """A frozen SigLIP (2) model and its processor: `similarities(images, captions)` -> cosine per pair."""

    def __init__(self, model, processor, device="cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.processor, self.device = processor, torch.device(device)
        self.text_length = model.config.text_config.max_position_embeddings

    @classmethod
    def load(cls, path: str, device="cpu") -> "TextImageScorer":
        require_transformers()
        from transformers import AutoModel, AutoProcessor

        try:
            model, processor = AutoModel.from_pretrained(path), AutoProcessor.from_pretrained(path)
        except OSError as err:
            raise FileNotFoundError(f"--text_image_model={path!r} is not a SigLIP / SigLIP 2 checkpoint here: {err}; "
                                    f"pass a save_pretrained folder (model and processor) or a cached hub id") from err
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise ValueError(f"{path} holds a {type(model).__name__}, not an image-text model (SigLIP or SigLIP 2)")
        return cls(model, processor, device)

    @torch.no_grad()
    def similarities(self, images: np.ndarray, captions: list[str]) -> torch.Tensor:
        """uint8 (B, H, W, 3) images and their B captions -> (B,) cosine similarities, fp32."""
        inputs = self.processor(text=captions, images=[np.array(image) for image in images], padding="max_length",
                                max_length=self.text_length, truncation=True, return_tensors="pt")
        image = pooled(self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device)))
        text_inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        text = pooled(self.model.get_text_features(**text_inputs))
        return F.cosine_similarity(image.float(), text.float(), dim=-1).cpu()


def text_image_score(scorer: TextImageScorer, batches: Iterable[np.ndarray], captions: list[str]) -> float:
    """100 x the mean cosine similarity of each image with its caption, the images in `batches` (uint8
    (B, H, W, 3), in caption order)."""
    scores, start = [], 0
    for images in batches:
        scores.append(scorer.similarities(images, captions[start:start + len(images)]))
        start += len(images)
    if start != len(captions):
        raise ValueError(f"the sample set holds {start} images for {len(captions)} captions; score the set the "
                         f"prompt list belongs to")
    return 100 * torch.cat(scores).mean().item()
