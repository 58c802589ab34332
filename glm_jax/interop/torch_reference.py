"""A PyTorch gLM with the original's architecture and state-dict layout, for parity and benchmarks.

Written from docs/ARCHITECTURE.md#the-original-glm (not from the original's code): HF `RobertaModel` with
`relative_key_query` inside the same module hierarchy, so its `state_dict()` has the original's
keys, duplicate stacks included. Needs torch and transformers 4.57.x (transformers 5 silently
drops relative_key_query; `build_reference` refuses such a model).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import RobertaConfig, RobertaModel

from glm_jax.model.glm import GLMConfig


def roberta_config(config: GLMConfig) -> RobertaConfig:
    hf = RobertaConfig(**{k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")})
    hf._attn_implementation = "eager"  # sdpa returns no attention maps
    return hf


class MultiHypothesisHead(nn.Module):
    """`roberta.lm_head`: hidden -> [num_pred, num_pc] hypotheses and num_pred logits."""

    def __init__(self, hf: RobertaConfig):
        super().__init__()
        self.num_pred, self.num_pc = hf.num_pred, hf.num_pc
        self.dense = nn.Linear(hf.hidden_size, hf.num_pc * hf.num_pred)
        self.dense_prob = nn.Linear(hf.hidden_size, hf.num_pred)

    def forward(self, hidden):
        predictions = self.dense(hidden).view(*hidden.shape[:-1], self.num_pred, self.num_pc)
        return predictions, self.dense_prob(hidden)


class ContactRegression(nn.Module):
    """`roberta.contact_head`: its regression layer exists but the original never applies it."""

    def __init__(self, in_features: int):
        super().__init__()
        self.regression = nn.Linear(in_features, 1)


class ReferenceBase(RobertaModel):
    """The original's `roberta` submodule: an (unused) RobertaModel holding the used one."""

    def __init__(self, hf: RobertaConfig):
        super().__init__(hf)
        self.roberta = RobertaModel(hf, add_pooling_layer=False)
        self.lm_head = MultiHypothesisHead(hf)
        self.contact_head = ContactRegression(hf.num_hidden_layers * hf.num_attention_heads)
        self.post_init()


class ReferenceGLM(RobertaModel):
    """Top level: an (unused) RobertaModel + `dense` input projection + `roberta` base."""

    def __init__(self, hf: RobertaConfig):
        super().__init__(hf)
        self.roberta = ReferenceBase(hf)
        self.dense = nn.Linear(hf.emb_dim, hf.hidden_size)
        self.post_init()

    def forward(self, inputs_embeds, attention_mask, output_hidden_states=False, output_attentions=False):
        encoded = self.roberta.roberta(
            inputs_embeds=self.dense(inputs_embeds), attention_mask=attention_mask,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions, return_dict=True)
        predictions, logits = self.roberta.lm_head(encoded.last_hidden_state)
        return {
            "last_hidden_state": encoded.last_hidden_state,
            "hidden_states": torch.stack(encoded.hidden_states, 1) if output_hidden_states else None,
            "attentions": torch.stack(encoded.attentions, 1) if output_attentions else None,
            "predictions": predictions,
            "logits": logits,
        }


def build_reference(config: GLMConfig, seed: int = 0) -> ReferenceGLM:
    """A randomly initialised reference; fails if transformers ignores relative positions."""
    torch.manual_seed(seed)
    model = ReferenceGLM(roberta_config(config)).eval()
    if config.position_embedding_type != "none":
        attention = model.roberta.roberta.encoder.layer[0].attention.self
        if not hasattr(attention, "distance_embedding"):
            import transformers
            raise RuntimeError(f"transformers {transformers.__version__} ignores position_embedding_type="
                               f"{config.position_embedding_type!r}; install transformers 4.57.x")
    return model


def original_loss(predictions, logits, labels, masked, prob_loss_weight=1e-4):
    """The original objective (docs/ARCHITECTURE.md#objective) in torch: masked products, torch.argmin,
    nn.MSELoss / nn.CrossEntropyLoss means over all positions.

    predictions [b, s, p, c], logits [b, s, p], labels [b, s, c], masked bool [b, s].
    """
    m = masked.unsqueeze(-1).float()
    labels_masked = labels * m
    predictions_masked = predictions * m.unsqueeze(-1)
    b, s, p, c = predictions.shape
    closest = torch.argmin(torch.linalg.norm(predictions_masked - labels_masked.unsqueeze(2), dim=-1), dim=-1)
    closest_prediction = predictions_masked.view(-1, p, c)[torch.arange(b * s), closest.view(-1)].view(b, s, c)
    mse = nn.MSELoss()(closest_prediction, labels_masked)
    ce = nn.CrossEntropyLoss()((logits * m).view(-1, p), (closest * masked).view(-1))
    return mse + prob_loss_weight * ce, mse, ce


def state_dict_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    return {name: tensor.detach().cpu().numpy() for name, tensor in model.state_dict().items()}


def load_numpy_state_dict(model: nn.Module, state_dict: dict[str, np.ndarray], strict: bool = False):
    """Loads numpy tensors into `model` (strict=False like the original's glm_embed.py)."""
    tensors = {name: torch.from_numpy(np.array(value)) for name, value in state_dict.items()}
    return model.load_state_dict(tensors, strict=strict)
