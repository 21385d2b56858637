"""Model outputs: pytrees whose field names are transformers' own, so code ports across.

Shapes: B batch, T tokens, D width, V vocabulary, K classes, E projection width; images are
NHWC, so a ResNet's last_hidden_state is (B, H, W, C) where transformers' is NCHW.
"""

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class BaseModelOutput:
  last_hidden_state: jax.Array            # (B, T, D) or (B, H, W, C)
  pooler_output: jax.Array | None = None  # (B, D) or (B, C)


@flax.struct.dataclass
class ClassifierOutput:
  logits: jax.Array                       # (B, K), (B, T, K) or (B, T, V)
  last_hidden_state: jax.Array | None = None


@flax.struct.dataclass
class PreTrainingOutput:
  prediction_logits: jax.Array            # (B, T, V)
  seq_relationship_logits: jax.Array      # (B, 2)
  last_hidden_state: jax.Array | None = None


@flax.struct.dataclass
class CausalLMOutput:
  logits: jax.Array                       # (B, T, V)
  last_hidden_state: jax.Array | None = None


@flax.struct.dataclass
class CLIPOutput:
  logits_per_image: jax.Array | None      # (B_image, B_text)
  logits_per_text: jax.Array | None       # (B_text, B_image)
  text_embeds: jax.Array | None           # (B_text, E), L2-normalised
  image_embeds: jax.Array | None          # (B_image, E), L2-normalised
  text_pooler_output: Any = None          # (B_text, D_text), before the projection
  image_pooler_output: Any = None         # (B_image, D_vision)
