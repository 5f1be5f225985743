"""The frozen SigLIP 2 text tower that turns captions into the token embeddings a text-to-image generator
attends to.

Loaded through Hugging Face transformers (`Siglip2TextModel` + its Gemma tokenizer): the published SigLIP 2
checkpoints (google/siglip2-*) ship there with their tokenizer, which timm does not carry (timm holds the
image towers only) and open_clip wraps around the same tokenizer files. A whole SigLIP 2 checkpoint (image
and text towers) or a text tower saved alone both load; `path` is a hub id (needs the hub cache or network)
or a local folder written by `save_pretrained`.

SigLIP 2 was trained on captions padded to 64 tokens with no attention mask, so captions are padded to
`max_length` the same way and every position's embedding is returned: (B, max_length, hidden).
"""
import torch

DEFAULT_TEXT_TOWER = "google/siglip2-so400m-patch16-256"
SIGLIP2_TEXT_LENGTH = 64


def require_transformers():
    try:
        import transformers
    except ImportError as err:
        raise ImportError("the SigLIP 2 text tower needs Hugging Face transformers: pip install transformers "
                          "(or fae_fast[text])") from err
    return transformers


class FrozenTextEncoder(torch.nn.Module):
    """Captions -> token embeddings (B, max_length, hidden), frozen, in eval mode."""

    def __init__(self, tokenizer, tower, *, max_length: int = SIGLIP2_TEXT_LENGTH, device="cpu"):
        """From a tokenizer and a Siglip2TextModel already built (`load` reads them from a checkpoint)."""
        super().__init__()
        self.tokenizer, self.tower = tokenizer, tower
        positions = self.tower.config.max_position_embeddings
        if max_length > positions:
            raise ValueError(f"max_length={max_length} is longer than the text tower's {positions} positions")
        self.max_length = max_length
        self.tower.to(device).eval().requires_grad_(False)

    @classmethod
    def load(cls, path: str = DEFAULT_TEXT_TOWER, *, max_length: int = SIGLIP2_TEXT_LENGTH, device="cpu",
             dtype: torch.dtype = torch.float32) -> "FrozenTextEncoder":
        """The tokenizer and text tower of a SigLIP 2 checkpoint (hub id or save_pretrained folder)."""
        transformers = require_transformers()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            if transformers.AutoConfig.from_pretrained(path).model_type == "siglip2":  # both towers: keep text's
                tower = transformers.Siglip2Model.from_pretrained(path, dtype=dtype).text_model
            else:
                tower = transformers.Siglip2TextModel.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"no SigLIP 2 text tower at {path!r} ({type(err).__name__}: "
                                    f"{str(err).splitlines()[0]}); pass a folder written by save_pretrained "
                                    f"(tokenizer and weights) or a hub id in the hub cache") from err
        return cls(tokenizer, tower, max_length=max_length, device=device)

    @property
    def width(self) -> int:
        return self.tower.config.hidden_size

    @torch.no_grad()
    def forward(self, captions: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(captions), padding="max_length", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        device = next(self.tower.parameters()).device
        out = self.tower(input_ids=tokens["input_ids"].to(device))
        return out.last_hidden_state
