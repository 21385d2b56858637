"""Training objectives: model outputs + batch -> (scalar float32 loss, dict of metrics).

Every loss is a pure JAX function, so the trainer calls it inside its `jax.jit` train step on
arrays sharded over a device mesh. Logits are cast to float32 before any loss math: a bf16
log-softmax over a large vocabulary loses the small probabilities the loss is made of.

Labels follow transformers: -100 (IGNORE_INDEX) marks a position that is not scored (weight 0).
Any other label outside [0, K) is an error, but under jit nothing can raise on values, so such a
label gives its position a NaN loss and the batch loss is NaN: loud, never a quietly wrong
number. Labels are validated in the data pipeline with `check_labels`; the losses also call it
themselves when given concrete (not traced) labels, i.e. outside jit.

Batch conventions (int32 labels):
  classification  batch['label'] (B,), or (B, T) for token classification; logits (..., K)
  causal_lm       batch['labels'] (B, T), already shifted to the next token; logits (B, T, V)
  mlm_nsp         batch['mlm_labels'] (B, T); batch['next_sentence_label'] (B,), 0: B follows A
  contrastive     no labels: image i and text i are the matching pair; an eval batch's
                  batch['valid'] (B,) (0 on padding) leaves its padding out of the loss

Eval metrics: each objective's means come with the counts they are means over ('num_examples',
'num_tokens', 'num_mlm_tokens'), so batches of different sizes, or with different numbers of
ignored labels, merge exactly: `merge_metrics(host_metrics, MERGE_WEIGHTS[name])` weights each
mean by its count, sums the counts and recomputes the metrics derived from other metrics
(perplexity = exp(loss); MLM + NSP's loss = mlm_loss + nsp_loss).
"""

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ptm_jax.models import layers
from ptm_jax.models import outputs as model_outputs

IGNORE_INDEX = -100
# CLIP clamps exp(logit_scale) at 100 (a temperature of 0.01) so that training stays stable.
MAX_LOGIT_SCALE = 100.0
RECALL_AT = (1, 5)

Metrics = dict[str, jax.Array]


def weighted_sum(values, weights) -> jax.Array:
  """sum(values * weights) as a float32 scalar, leaving out the entries of weight 0 even where
  their value is inf or NaN, as the loss at an ignored position may be.

  values and weights (non-negative) broadcast together.
  """
  values, weights = jnp.broadcast_arrays(jnp.asarray(values, jnp.float32),
                                         jnp.asarray(weights, jnp.float32))
  return jnp.sum(jnp.where(weights != 0, values * weights, 0.0))


def weighted_mean(values, weights) -> jax.Array:
  """sum(values * weights) / sum(weights) as a float32 scalar; 0, not NaN, if the weights sum to 0.

  values and weights (non-negative) broadcast together. Entries of weight 0 are left out (see
  weighted_sum).
  """
  values, weights = jnp.broadcast_arrays(jnp.asarray(values, jnp.float32),
                                         jnp.asarray(weights, jnp.float32))
  return _mean_of(weighted_sum(values, weights), jnp.sum(weights))


def _mean_of(total, weight_sum) -> jax.Array:
  return jnp.where(weight_sum > 0, total / jnp.where(weight_sum > 0, weight_sum, 1.0), 0.0)


def _reduced(losses, scored, reduction: str) -> tuple[jax.Array, jax.Array]:
  """(the loss over the scored positions as asked: their mean or their sum (see SUM_REDUCIBLE),
  their mean), from one sum over losses."""
  if reduction not in ('mean', 'sum'):
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
  total = weighted_sum(losses, scored)
  mean = _mean_of(total, jnp.sum(scored, dtype=jnp.float32))
  return (total if reduction == 'sum' else mean), mean


def check_labels(labels, num_classes: int, name: str = 'labels') -> None:
  """Raise ValueError if a label is outside [0, num_classes) and is not IGNORE_INDEX.

  For the data pipeline (numpy arrays, host side), where a bad label can still be reported.
  """
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f'{name} must be integer class ids, got dtype {labels.dtype}.')
  bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= num_classes))]
  if bad.size:
    raise ValueError(f'{name} has {bad.size} value(s) outside [0, {num_classes}) that are not '
                     f'the ignore index {IGNORE_INDEX}, e.g. {bad[:5].tolist()}: fix the labels '
                     'in the data pipeline, or give the model as many classes as the labels '
                     'use.')


def _check_concrete_labels(labels, num_classes: int, name: str) -> None:
  """check_labels where the values are known: not under jit, and all on this host."""
  if isinstance(labels, jax.core.Tracer):
    return
  if isinstance(labels, jax.Array) and not labels.is_fully_addressable:
    return
  check_labels(labels, num_classes, name)


def _check_label_shape(logits, labels, logits_name: str, labels_name: str) -> None:
  if logits.ndim != labels.ndim + 1 or logits.shape[:-1] != labels.shape:
    raise ValueError(f'{labels_name} of shape {labels.shape} do not match {logits_name} of shape '
                     f'{logits.shape}: {labels_name} must have the shape of {logits_name} without '
                     f'its last (class) axis, i.e. {logits.shape[:-1]}.')
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f'{labels_name} must be integer class ids (int32), got dtype {labels.dtype}.')


# From this many classes on, the CPU backend takes the cross-entropy class-major (see
# _cross_entropy); the vocabularies of GPT-2 (50,257) and BERT (30,522) are above it, class
# heads (ImageNet's 1,000) and character vocabularies below, where either way costs little.
CLASS_MAJOR_MIN_CLASSES = 4096


def _cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Per-position softmax cross-entropy in float32.

  On CPU, over a vocabulary-sized class axis (CLASS_MAJOR_MIN_CLASSES), the loss is computed on
  the logits moved to class-major (K, ...): the LM heads' `layers.tied_logits` takes its
  product vocabulary-major on CPU, so the move cancels its transpose, and the reductions over
  the classes then read contiguous rows instead of a transposed array, and the gradient comes
  back vocabulary-major to the head's dots with no transpose either. GPT-2 small's head and
  loss over 1,024 tokens: 0.25 s forward and 0.70 s with the gradient, against 0.68 and 1.19
  s class-minor (experiments/PERFORMANCE.md). The same sums, in another order: losses agree to
  float32 rounding. Other platforms, and fewer classes, keep the class axis last.

  Args:
    logits: (..., K), any float dtype.
    labels: (...) int; IGNORE_INDEX where not scored.
    label_smoothing: a Python float in [0, 1].

  Returns:
    loss (...) float32 (NaN at out-of-range labels), scored (...) bool (label != IGNORE_INDEX),
    correct (...) bool (argmax == label).
  """
  logits = jnp.asarray(logits).astype(jnp.float32)
  labels = jnp.asarray(labels).astype(jnp.int32)
  class_minor = lambda x, y: _cross_entropy_along(x, y, label_smoothing, axis=-1)
  if logits.shape[-1] < CLASS_MAJOR_MIN_CLASSES:
    return class_minor(logits, labels)
  class_major = lambda x, y: _cross_entropy_along(jnp.moveaxis(x, -1, 0), y, label_smoothing,
                                                  axis=0)
  return layers.by_platform(logits, labels, cpu=class_major, default=class_minor)


def _cross_entropy_along(logits, labels, label_smoothing: float, axis: int):
  """_cross_entropy with the classes on logits' axis `axis` (0 or -1); labels without it."""
  num_classes = logits.shape[axis]
  scored = labels != IGNORE_INDEX
  in_range = (labels >= 0) & (labels < num_classes)
  # logsumexp - the label's logit is -log_softmax at the label without a second (..., K) array.
  log_normalizer = jax.nn.logsumexp(logits, axis=axis)
  label_index = jnp.expand_dims(jnp.where(in_range, labels, 0), axis)
  label_logit = jnp.take_along_axis(logits, label_index, axis=axis).squeeze(axis)
  loss = log_normalizer - label_logit
  if label_smoothing:
    # torch's smoothing: (1 - eps) * (-log p_label) + eps * the mean over classes of -log p_k.
    uniform_loss = log_normalizer - jnp.mean(logits, axis=axis)
    loss = (1.0 - label_smoothing) * loss + label_smoothing * uniform_loss
  loss = jnp.where(in_range | ~scored, loss, jnp.nan)
  correct = (jnp.argmax(logits, axis=axis) == labels) & in_range
  return loss, scored, correct


# float32 holds every integer up to 2**24 exactly.
_F32_EXACT_COUNT = 2**24


def _count(mask) -> jax.Array:
  """The number of true entries of mask, an int32 scalar.

  Summed in float32 where that is exact (fewer than 2**24 entries): a count of a batch sharded
  over devices is a cross-device sum, and XLA can fuse a float32 one into the all-reduce of the
  float32 gradients, where an int32 one would be one more all-reduce (one more wait for every
  device) in each train step.
  """
  if mask.size < _F32_EXACT_COUNT:
    return jnp.sum(mask, dtype=jnp.float32).astype(jnp.int32)
  return jnp.sum(mask, dtype=jnp.int32)


def classification_loss(logits, labels, *, label_smoothing: float = 0.0,
                        num_classes: int | None = None,
                        reduction: str = 'mean') -> tuple[jax.Array, Metrics]:
  """Softmax cross-entropy of class logits against int labels, averaged over scored labels.

  Args:
    logits: (B, K), or (B, T, K) for token classification; any float dtype.
    labels: int (B,) or (B, T); IGNORE_INDEX (-100) where not scored. Validated in the data
      pipeline (`check_labels`): under jit an out-of-range label makes the loss NaN.
    label_smoothing: a Python float in [0, 1], as torch's cross_entropy(label_smoothing=...).
    num_classes: if given, the number of classes the labels are for; it must equal K (catches a
      head built for another dataset).
    reduction: 'mean' (the default) or 'sum': the returned loss is then the sum over the scored
      labels, metrics['loss'] still their mean (see SUM_REDUCIBLE).

  Returns:
    loss, a float32 scalar, and metrics {'loss', 'accuracy', 'num_examples'}: loss and
    accuracy (argmax == label) are means over the scored labels, num_examples (int32) is how many
    there are, the weight to merge eval batches with.
  """
  logits = jnp.asarray(logits)
  if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
    raise ValueError(f'label_smoothing must be a Python float in [0, 1], got {label_smoothing!r}.')
  if num_classes is not None and num_classes != logits.shape[-1]:
    raise ValueError(f'num_classes is {num_classes} but the logits have {logits.shape[-1]} '
                     f'classes (shape {logits.shape}): build the head with num_labels='
                     f'{num_classes}, or pass the number of classes the labels are for.')
  _check_label_shape(logits, jnp.asarray(labels), 'logits', 'labels')
  _check_concrete_labels(labels, logits.shape[-1], 'labels')
  losses, scored, correct = _cross_entropy(logits, labels, label_smoothing)
  reduced, loss = _reduced(losses, scored, reduction)
  return reduced, {
      'loss': loss, 'accuracy': weighted_mean(correct, scored), 'num_examples': _count(scored)}


def causal_lm_loss(logits, labels, *, reduction: str = 'mean') -> tuple[jax.Array, Metrics]:
  """Next-token cross-entropy, averaged over the tokens that are not ignored.

  Args:
    logits: (B, T, V), any float dtype.
    labels: int (B, T), the token each position predicts (shifted by the data pipeline);
      IGNORE_INDEX (-100) at padding and at positions with no next token.
    reduction: 'mean' (the default) or 'sum': the returned loss is then the sum over the scored
      tokens, metrics['loss'] still their mean (see SUM_REDUCIBLE).

  Returns:
    loss, a float32 scalar, and metrics {'loss', 'perplexity', 'accuracy', 'num_tokens'}:
    perplexity = exp(loss); accuracy is next-token argmax accuracy; num_tokens (int32) counts
    the scored tokens, the weight to merge eval batches with.
  """
  logits = jnp.asarray(logits)
  if logits.ndim != 3:
    raise ValueError(f'Causal LM logits must be (batch, length, vocab), got shape '
                     f'{logits.shape}.')
  _check_label_shape(logits, jnp.asarray(labels), 'logits', 'labels')
  _check_concrete_labels(labels, logits.shape[-1], 'labels')
  losses, scored, correct = _cross_entropy(logits, labels)
  reduced, loss = _reduced(losses, scored, reduction)
  return reduced, {
      'loss': loss, 'perplexity': jnp.exp(loss), 'accuracy': weighted_mean(correct, scored),
      'num_tokens': _count(scored)}


def mlm_nsp_loss(prediction_logits, seq_relationship_logits, mlm_labels,
                 next_sentence_label=None) -> tuple[jax.Array, Metrics]:
  """BERT's pre-training loss: mean MLM cross-entropy + mean NSP cross-entropy.

  Args:
    prediction_logits: (B, T, V) masked-token logits, any float dtype.
    seq_relationship_logits: (B, 2) next-sentence logits; may be None when next_sentence_label
      is.
    mlm_labels: int (B, T), the original token at predicted positions, IGNORE_INDEX elsewhere.
    next_sentence_label: int (B,), 0 if sentence B follows A, 1 if random; IGNORE_INDEX where
      not scored. None trains the MLM alone (RoBERTa-style).

  Returns:
    loss = mlm_loss + nsp_loss (mlm_loss alone without NSP labels), a float32 scalar, and metrics
    {'loss', 'mlm_loss', 'mlm_accuracy', 'mlm_perplexity', 'num_mlm_tokens'} plus, with NSP,
    {'nsp_loss', 'nsp_accuracy', 'num_examples'}. MLM means are over the num_mlm_tokens
    predicted positions, NSP means over the num_examples scored pairs.
  """
  prediction_logits = jnp.asarray(prediction_logits)
  if prediction_logits.ndim != 3:
    raise ValueError(f'prediction_logits must be (batch, length, vocab), got shape '
                     f'{prediction_logits.shape}.')
  _check_label_shape(prediction_logits, jnp.asarray(mlm_labels), 'prediction_logits',
                     'mlm_labels')
  _check_concrete_labels(mlm_labels, prediction_logits.shape[-1], 'mlm_labels')
  mlm_losses, mlm_scored, mlm_correct = _cross_entropy(prediction_logits, mlm_labels)
  mlm_loss = weighted_mean(mlm_losses, mlm_scored)
  metrics = {'loss': mlm_loss, 'mlm_loss': mlm_loss,
             'mlm_accuracy': weighted_mean(mlm_correct, mlm_scored),
             'mlm_perplexity': jnp.exp(mlm_loss), 'num_mlm_tokens': _count(mlm_scored)}
  if next_sentence_label is None:
    return mlm_loss, metrics
  if seq_relationship_logits is None:
    raise ValueError('next_sentence_label was given without seq_relationship_logits: use the '
                     "model's 'pretraining' head, or leave next_sentence_label out for MLM only.")
  seq_relationship_logits = jnp.asarray(seq_relationship_logits)
  if seq_relationship_logits.shape != (prediction_logits.shape[0], 2):
    raise ValueError(f'seq_relationship_logits must be (batch, 2) = '
                     f'({prediction_logits.shape[0]}, 2), got {seq_relationship_logits.shape}.')
  _check_label_shape(seq_relationship_logits, jnp.asarray(next_sentence_label),
                     'seq_relationship_logits', 'next_sentence_label')
  _check_concrete_labels(next_sentence_label, 2, 'next_sentence_label')
  nsp_losses, nsp_scored, nsp_correct = _cross_entropy(seq_relationship_logits,
                                                       next_sentence_label)
  nsp_loss = weighted_mean(nsp_losses, nsp_scored)
  loss = mlm_loss + nsp_loss
  metrics.update(loss=loss, nsp_loss=nsp_loss, nsp_accuracy=weighted_mean(nsp_correct, nsp_scored),
                 num_examples=_count(nsp_scored))
  return loss, metrics


def clip_contrastive_loss(image_embeds, text_embeds, logit_scale,
                          valid=None) -> tuple[jax.Array, Metrics]:
  """CLIP's symmetric InfoNCE loss over the batch: image i and text i are the matching pair.

  logits = min(exp(logit_scale), 100) * image_embeds @ text_embeds.T (B, B); the loss is the mean
  of the image->text cross-entropy (rows) and the text->image one (columns), each against the
  diagonal.

  With `valid`, the pairs of valid 0 (the eval loader's padding, copies of example 0) are left
  out entirely: they are not queries (not in the loss, recall or count) and not candidates (their
  logits are masked out of the other rows' softmax and ranks), so the metrics are exactly those
  of the valid pairs alone.

  Over the global batch: called inside `jax.jit` on embeddings sharded along the batch over a
  mesh, the (B, B) similarity is still the global one (GSPMD gathers what the matmul needs), so
  every image is contrasted with every text of the global batch without an explicit all_gather
  (which only shard_map or pmap code would need).

  Args:
    image_embeds: (B, E) L2-normalised image embeddings, any float dtype.
    text_embeds: (B, E) L2-normalised text embeddings of the paired texts.
    logit_scale: scalar, the log of the inverse temperature (the model's `logit_scale`
      parameter, so that it is trained through this loss).
    valid: optional (B,) int or bool, nonzero for a real pair: batch['valid'] of an eval batch.
      None (training): every pair is real.

  Returns:
    loss, a float32 scalar, and metrics {'loss', 'temperature' (1 / the clamped scale),
    'i2t_recall@1', 't2i_recall@1', 'i2t_recall@5', 't2i_recall@5', 'num_examples' (int32: the
    number of valid pairs, B without `valid`)}. Loss and recalls are means over the valid pairs
    (0 if there are none), so MERGE_WEIGHTS['contrastive'] ('num_examples') merges eval batches
    into the mean over the real examples. Recall@k is the fraction of images (texts) whose
    matching text (image) is among the k highest-scored of the valid candidates; a k above their
    number counts every row. Ties count in the pair's favour (only strictly higher scores push
    it down). Retrieval metrics depend on the number of candidates: compare them at equal batch
    sizes.
  """
  image_embeds = jnp.asarray(image_embeds).astype(jnp.float32)
  text_embeds = jnp.asarray(text_embeds).astype(jnp.float32)
  if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
    raise ValueError(f'image_embeds and text_embeds must both be (batch, embed) with one text per '
                     f'image, got {image_embeds.shape} and {text_embeds.shape}.')
  logit_scale = jnp.asarray(logit_scale, jnp.float32)
  if logit_scale.shape != ():
    raise ValueError(f'logit_scale must be a scalar (the log of the inverse temperature), got '
                     f'shape {logit_scale.shape}.')
  batch_size = image_embeds.shape[0]
  if valid is None:
    valid_B = jnp.ones((batch_size,), jnp.bool_)
  else:
    valid_B = jnp.asarray(valid)
    if valid_B.shape != (batch_size,):
      raise ValueError(f'valid must be ({batch_size},), one flag per image-text pair, got shape '
                       f'{valid_B.shape}.')
    valid_B = valid_B != 0
  scale = jnp.minimum(jnp.exp(logit_scale), MAX_LOGIT_SCALE)
  # HIGHEST: scaled by up to 100, the bf16 passes of a default-precision matmul shift the logits
  # by ~0.1 on accelerators; a (B, B, E) matmul is cheap next to the towers.
  logits_IxT = scale * jnp.matmul(image_embeds, text_embeds.T,
                                  precision=jax.lax.Precision.HIGHEST)
  matching_B = jnp.diagonal(logits_IxT)
  # Padding is no candidate: its logits get float32's lowest value, whose exp underflows to
  # exactly 0 next to any real logit (finite, so an all-padding row gives no inf or NaN) and
  # which scores below every real pair. A padding query's own row is masked too; it has weight 0.
  logits_IxT = jnp.where(valid_B[:, None] & valid_B[None, :], logits_IxT,
                         jnp.finfo(jnp.float32).min)
  image_to_text = weighted_mean(jax.nn.logsumexp(logits_IxT, axis=1) - matching_B, valid_B)
  text_to_image = weighted_mean(jax.nn.logsumexp(logits_IxT, axis=0) - matching_B, valid_B)
  loss = (image_to_text + text_to_image) / 2
  # A pair's rank among the candidates is how many score strictly higher than it.
  image_rank_B = jnp.sum(logits_IxT > matching_B[:, None], axis=1)
  text_rank_B = jnp.sum(logits_IxT > matching_B[None, :], axis=0)
  metrics = {'loss': loss, 'temperature': 1.0 / scale}
  for k in RECALL_AT:
    metrics[f'i2t_recall@{k}'] = weighted_mean(image_rank_B < k, valid_B)
    metrics[f't2i_recall@{k}'] = weighted_mean(text_rank_B < k, valid_B)
  metrics['num_examples'] = _count(valid_B)
  return loss, metrics


def _batch_field(batch: Mapping[str, Any], key: str, objective: str):
  if key not in batch:
    raise KeyError(f'The {objective!r} objective needs batch[{key!r}]; the batch has '
                   f'{sorted(batch)}. Produce it in the data pipeline.')
  return batch[key]


def _check_outputs(outputs, types: tuple[type, ...], objective: str, produced_by: str) -> None:
  if not isinstance(outputs, types):
    names = ' or '.join(t.__name__ for t in types)
    raise TypeError(f'The {objective!r} objective takes a {names} ({produced_by}), got '
                    f'{type(outputs).__name__}.')


def classification_objective(outputs, batch, *, label_smoothing: float = 0.0,
                             num_classes: int | None = None,
                             reduction: str = 'mean') -> tuple[jax.Array, Metrics]:
  """classification_loss of ClassifierOutput.logits against batch['label']."""
  _check_outputs(outputs, (model_outputs.ClassifierOutput,), 'classification',
                 'a classification head of BERT, ViT or ResNet')
  return classification_loss(outputs.logits, _batch_field(batch, 'label', 'classification'),
                             label_smoothing=label_smoothing, num_classes=num_classes,
                             reduction=reduction)


def causal_lm_objective(outputs, batch, *, reduction: str = 'mean') -> tuple[jax.Array, Metrics]:
  """causal_lm_loss of CausalLMOutput.logits against batch['labels']."""
  _check_outputs(outputs, (model_outputs.CausalLMOutput,), 'causal_lm', "GPT-2's LM head")
  return causal_lm_loss(outputs.logits, _batch_field(batch, 'labels', 'causal_lm'),
                        reduction=reduction)


def mlm_nsp_objective(outputs, batch) -> tuple[jax.Array, Metrics]:
  """mlm_nsp_loss of PreTrainingOutput against batch['mlm_labels'] and
  batch['next_sentence_label'].

  MLM alone when the batch has no 'next_sentence_label', or for the ClassifierOutput of BERT's
  'mlm' head (whose logits are the (B, T, V) prediction logits).
  """
  _check_outputs(outputs, (model_outputs.PreTrainingOutput, model_outputs.ClassifierOutput),
                 'mlm_nsp', "BERT's 'pretraining' or 'mlm' head")
  mlm_labels = _batch_field(batch, 'mlm_labels', 'mlm_nsp')
  if isinstance(outputs, model_outputs.ClassifierOutput):
    return mlm_nsp_loss(outputs.logits, None, mlm_labels)
  return mlm_nsp_loss(outputs.prediction_logits, outputs.seq_relationship_logits, mlm_labels,
                      batch.get('next_sentence_label'))


def contrastive_objective(outputs, batch, *, logit_scale=None) -> tuple[jax.Array, Metrics]:
  """clip_contrastive_loss of CLIPOutput.image_embeds and text_embeds.

  The pairing is positional (row i of each tower's embeddings); of the batch only 'valid' is
  read, where it is present (eval batches: 0 on padding, which is then left out).

  CLIPOutput does not carry the scale, so the trainer passes the model's parameter:
  logit_scale=params['logit_scale'] (the unboxed variables['params']['logit_scale']), which
  keeps it trainable.
  """
  _check_outputs(outputs, (model_outputs.CLIPOutput,), 'contrastive',
                 'CLIP called with both input_ids and pixel_values')
  if outputs.image_embeds is None or outputs.text_embeds is None:
    raise ValueError('The contrastive objective needs both image_embeds and text_embeds: call '
                     'CLIP with both input_ids and pixel_values.')
  if logit_scale is None:
    raise TypeError("The contrastive objective needs logit_scale=params['logit_scale'] (CLIP's "
                    'log inverse temperature; CLIPOutput does not carry it).')
  return clip_contrastive_loss(outputs.image_embeds, outputs.text_embeds, logit_scale,
                               batch.get('valid'))


# name -> (outputs, batch, **options) -> (loss, metrics).
OBJECTIVES: dict[str, Callable[..., tuple[jax.Array, Metrics]]] = {
    'classification': classification_objective,
    'causal_lm': causal_lm_objective,
    'mlm_nsp': mlm_nsp_objective,
    'contrastive': contrastive_objective,
}

# The objectives that take reduction='sum' -> the count metric their mean divides the sum by.
# A trainer differentiates the sum and divides the gradient by the count afterwards: the count of
# a batch sharded over devices is a sum over all of them, and the mean's gradient needs it before
# the backward pass can start (one more cross-device wait inside every step); the sum's gradient
# does not, and the count's all-reduce runs alongside the backward pass.
SUM_REDUCIBLE: dict[str, str] = {
    'classification': 'num_examples',
    'causal_lm': 'num_tokens',
}

# name -> the count each of its mean metrics is weighted by when eval batches are merged.
MERGE_WEIGHTS: dict[str, str | dict[str, str]] = {
    'classification': 'num_examples',
    'causal_lm': 'num_tokens',
    'mlm_nsp': {'loss': 'num_mlm_tokens', 'mlm_loss': 'num_mlm_tokens',
                'mlm_accuracy': 'num_mlm_tokens', 'nsp_loss': 'num_examples',
                'nsp_accuracy': 'num_examples'},
    'contrastive': 'num_examples',
}

# Metrics that are functions of other metrics, recomputed from their merged values (when those
# are all present) rather than averaged. In order: 'loss' before the perplexities. Each rule takes
# the array module (numpy on the host, jax.numpy inside a step) and then its inputs.
_DERIVED_METRICS: dict[str, tuple[tuple[str, ...], Callable[..., Any]]] = {
    'loss': (('mlm_loss', 'nsp_loss'), lambda xp, mlm, nsp: mlm + nsp),
    'perplexity': (('loss',), lambda xp, loss: xp.exp(loss)),
    'mlm_perplexity': (('mlm_loss',), lambda xp, mlm_loss: xp.exp(mlm_loss)),
}


def derive_metrics(metrics: Mapping[str, Any], xp=np) -> dict[str, Any]:
  """`metrics` with its derived metrics (perplexity = exp(loss), MLM + NSP's loss = mlm_loss +
  nsp_loss) recomputed from their inputs' merged means: the exp of a mean loss, not a mean of
  exps. xp: numpy for host values, jax.numpy inside a jitted step (gradient accumulation)."""
  out = dict(metrics)
  for name, (inputs, combine) in _DERIVED_METRICS.items():
    if name in out and all(i in out for i in inputs):
      out[name] = combine(xp, *(out[i] for i in inputs))
  return out


def merge_metrics(metrics_list: Sequence[Mapping[str, Any]],
                  weight_key: str | Mapping[str, str]) -> dict[str, float | int]:
  """Combine one objective's metrics from several (eval) batches into the whole set's metrics.

  Counts (keys starting with 'num_') are summed. Every other metric is a mean: it is weighted by
  its batch's count `weight_key` (one count for all, or a dict metric -> count; use
  MERGE_WEIGHTS[objective]), so the result is the mean over all examples or tokens, not over
  batches. Derived metrics (perplexity = exp(loss), MLM + NSP's loss = mlm_loss + nsp_loss) are
  recomputed from the merged values. A metric whose counts are all 0 merges to 0.

  Args:
    metrics_list: per-batch metric dicts (jax or numpy scalars; fetched to the host here).
    weight_key: see above.

  Returns:
    {name: float}, counts as int.
  """
  if not metrics_list:
    raise ValueError('merge_metrics needs at least one batch of metrics.')
  keys = list(metrics_list[0])
  for i, metrics in enumerate(metrics_list):
    if set(metrics) != set(keys):
      raise ValueError(f'Batch {i} has metrics {sorted(metrics)} but batch 0 has {sorted(keys)}: '
                       'merge the metrics of one objective at a time.')
  columns = {k: np.array([np.asarray(jax.device_get(m[k]), np.float64) for m in metrics_list])
             for k in keys}
  derived = {name for name, (inputs, _) in _DERIVED_METRICS.items()
             if name in columns and all(i in columns for i in inputs)}
  merged: dict[str, float | int] = {}
  for key in keys:
    if key.startswith('num_'):
      merged[key] = int(columns[key].sum())
  for key in keys:
    if key in merged or key in derived:
      continue
    count_key = weight_key if isinstance(weight_key, str) else weight_key.get(key)
    if count_key not in columns or not count_key.startswith('num_'):
      raise ValueError(f'No count to weight metric {key!r} by (weight_key gives {count_key!r}; '
                       f'the counts are {[k for k in keys if k.startswith("num_")]}): pass '
                       'MERGE_WEIGHTS[objective] as weight_key.')
    counts = columns[count_key]
    total = counts.sum()
    merged[key] = float(np.where(counts != 0, columns[key] * counts, 0.0).sum() / total
                        if total > 0 else 0.0)
  # The derived metrics from the merged means (derive_metrics fills in the names it is given).
  merged = derive_metrics(dict(merged, **dict.fromkeys(derived, 0.0)))
  return {k: float(merged[k]) if k in derived else merged[k] for k in keys}
