"""Objectives: losses against torch's cross_entropy and a numpy CLIP loss, handcrafted accuracies
and retrieval recalls, the global-batch CLIP loss under a sharded jit, metric merging, bf16."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from ptm_jax.models import clip
from ptm_jax.models import outputs
from ptm_jax.train import objectives as obj


def random_logits(*shape, seed=0):
  return np.random.default_rng(seed).normal(scale=3.0, size=shape).astype(np.float32)


def random_labels(shape, num_classes, ignored_fraction=0.3, seed=1):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, size=shape).astype(np.int32)
  labels[rng.random(shape) < ignored_fraction] = -100
  return labels


def torch_ce(logits, labels, **kw):
  """torch's mean cross-entropy, classes on the last axis, in float64."""
  k = logits.shape[-1]
  return F.cross_entropy(torch.tensor(logits, dtype=torch.float64).reshape(-1, k),
                         torch.tensor(labels, dtype=torch.long).reshape(-1), **kw).item()


def numpy_accuracy(logits, labels):
  scored = labels != -100
  return (np.argmax(logits, -1) == labels)[scored].mean()


def unit_rows(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize('label_smoothing', [0.0, 0.1, 0.35])
@pytest.mark.parametrize('shape', [(12,), (3, 5)], ids=['sequence', 'token'])
def test_classification_matches_torch(label_smoothing, shape):
  logits = random_logits(*shape, 7)
  labels = random_labels(shape, 7)
  loss, metrics = jax.jit(lambda l, y: obj.classification_loss(
      l, y, label_smoothing=label_smoothing))(logits, labels)
  np.testing.assert_allclose(
      loss, torch_ce(logits, labels, ignore_index=-100, label_smoothing=label_smoothing),
      rtol=1e-6, atol=1e-6)
  assert metrics['loss'] == loss
  assert float(metrics['accuracy']) == pytest.approx(numpy_accuracy(logits, labels), abs=1e-7)
  assert int(metrics['num_examples']) == int((labels != -100).sum())


def test_ignored_labels_carry_no_weight():
  logits = random_logits(6, 4)
  labels = np.array([0, -100, 3, -100, 1, 2], np.int32)
  loss, _ = obj.classification_loss(logits, labels)
  changed = logits.copy()
  changed[[1, 3]] = [1e4, -1e4, 0, 0]  # Logits at ignored rows must not matter.
  np.testing.assert_allclose(obj.classification_loss(changed, labels)[0], loss, rtol=1e-7)
  all_ignored = np.full(6, -100, np.int32)
  loss, metrics = obj.classification_loss(logits, all_ignored)
  assert float(loss) == 0.0 and float(metrics['accuracy']) == 0.0
  assert int(metrics['num_examples']) == 0


def test_bad_labels_raise_outside_jit_and_give_nan_inside():
  logits = random_logits(4, 3)
  bad = np.array([0, 1, 3, -100], np.int32)  # 3 is out of range for 3 classes.
  with pytest.raises(ValueError, match=r'outside \[0, 3\).*e\.g\. \[3\]'):
    obj.classification_loss(logits, bad)
  with pytest.raises(ValueError, match=r'outside \[0, 5\)'):
    obj.check_labels(np.array([0, 5, -100]), 5, 'label')
  loss, _ = jax.jit(obj.classification_loss)(logits, bad)
  assert np.isnan(loss)
  with pytest.raises(ValueError, match='num_classes is 5 but the logits have 3'):
    obj.classification_loss(logits, bad[:2], num_classes=5)
  with pytest.raises(ValueError, match=r'must have the shape of logits without'):
    obj.classification_loss(logits, np.zeros((4, 1), np.int32))
  with pytest.raises(TypeError, match='integer class ids'):
    obj.classification_loss(logits, np.zeros(4, np.float32))
  with pytest.raises(ValueError, match='label_smoothing'):
    obj.classification_loss(logits, bad[:2], label_smoothing=1.5)


def test_causal_lm_matches_torch():
  logits = random_logits(3, 6, 11)
  labels = random_labels((3, 6), 11, seed=2)
  loss, metrics = jax.jit(obj.causal_lm_loss)(logits, labels)
  np.testing.assert_allclose(loss, torch_ce(logits, labels, ignore_index=-100), rtol=1e-6)
  np.testing.assert_allclose(metrics['perplexity'], np.exp(float(loss)), rtol=1e-6)
  assert float(metrics['accuracy']) == pytest.approx(numpy_accuracy(logits, labels), abs=1e-7)
  assert int(metrics['num_tokens']) == int((labels != -100).sum())


@pytest.mark.parametrize('label_smoothing', [0.0, 0.2])
def test_vocabulary_sized_class_axis_matches_torch_and_the_class_minor_path(label_smoothing):
  # From CLASS_MAJOR_MIN_CLASSES classes on, the CPU backend computes the loss class-major: the
  # same values and gradients as the class-last computation (_cross_entropy_along(axis=-1)),
  # the same metrics, and NaN at an out-of-range label.
  k = obj.CLASS_MAJOR_MIN_CLASSES + 3
  logits = random_logits(2, 5, k)
  labels = random_labels((2, 5), k, seed=3)
  loss, metrics = jax.jit(lambda l, y: obj.classification_loss(
      l, y, label_smoothing=label_smoothing))(logits, labels)
  np.testing.assert_allclose(
      loss, torch_ce(logits, labels, ignore_index=-100, label_smoothing=label_smoothing),
      rtol=1e-6)
  assert float(metrics['accuracy']) == pytest.approx(numpy_accuracy(logits, labels), abs=1e-7)

  def class_minor(l, y):
    losses, scored, _ = obj._cross_entropy_along(l, y, label_smoothing, axis=-1)
    return obj.weighted_sum(losses, scored)

  def chosen(l, y):
    losses, scored, _ = obj._cross_entropy(l, y, label_smoothing)
    return obj.weighted_sum(losses, scored)

  hlo = jax.jit(chosen).lower(logits, labels).as_text()
  assert ('transpose' in hlo) == (jax.default_backend() == 'cpu')  # the class-major move
  value, grad = jax.jit(jax.value_and_grad(chosen))(logits, labels)
  value_minor, grad_minor = jax.jit(jax.value_and_grad(class_minor))(logits, labels)
  np.testing.assert_allclose(value, value_minor, rtol=1e-6)
  np.testing.assert_allclose(grad, grad_minor, rtol=1e-5, atol=1e-8)
  assert np.all(grad[labels == -100] == 0)
  bad = labels.copy()
  bad[0, 0] = k
  assert np.isnan(jax.jit(obj.causal_lm_loss)(logits, bad)[0])


def test_mlm_nsp_matches_torch_and_handcrafted_accuracies():
  # Argmax tokens per position, and the labels: row 0 scores positions 0 (right) and 2 (wrong),
  # row 1 scores position 1 (right); NSP gets row 0 right and row 1 wrong.
  argmax = np.array([[1, 0, 0], [2, 3, 1]])
  prediction_logits = random_logits(2, 3, 5, seed=3)
  prediction_logits[np.arange(2)[:, None], np.arange(3)[None], argmax] += 20.0
  mlm_labels = np.array([[1, -100, 2], [-100, 3, -100]], np.int32)
  nsp_logits = np.array([[2.0, -1.0], [0.5, 0.25]], np.float32)
  nsp_labels = np.array([0, 1], np.int32)
  loss, metrics = jax.jit(obj.mlm_nsp_loss)(prediction_logits, nsp_logits, mlm_labels, nsp_labels)
  mlm = torch_ce(prediction_logits, mlm_labels, ignore_index=-100)
  nsp = torch_ce(nsp_logits, nsp_labels)
  np.testing.assert_allclose([metrics['mlm_loss'], metrics['nsp_loss'], loss],
                             [mlm, nsp, mlm + nsp], rtol=1e-6)
  assert float(metrics['mlm_accuracy']) == pytest.approx(2 / 3)
  assert float(metrics['nsp_accuracy']) == 0.5
  np.testing.assert_allclose(metrics['mlm_perplexity'], np.exp(mlm), rtol=1e-6)
  assert (int(metrics['num_mlm_tokens']), int(metrics['num_examples'])) == (3, 2)

  mlm_only_loss, mlm_only = obj.mlm_nsp_loss(prediction_logits, None, mlm_labels)
  np.testing.assert_allclose(mlm_only_loss, mlm, rtol=1e-6)
  assert 'nsp_loss' not in mlm_only and mlm_only['loss'] == mlm_only_loss


def numpy_clip_loss(image, text, logit_scale):
  scale = min(np.exp(logit_scale), 100.0)
  logits = scale * image.astype(np.float64) @ text.astype(np.float64).T
  def ce_rows(x):
    shifted = x - x.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -np.mean(np.diag(log_softmax))
  return (ce_rows(logits) + ce_rows(logits.T)) / 2


def test_clip_loss_matches_numpy_and_clamps_the_scale():
  rng = np.random.default_rng(4)
  image = unit_rows(rng.normal(size=(10, 6))).astype(np.float32)
  text = unit_rows(image + 0.8 * rng.normal(size=(10, 6))).astype(np.float32)
  scale = np.log(1 / 0.07)
  loss, metrics = jax.jit(obj.clip_contrastive_loss)(image, text, scale)
  np.testing.assert_allclose(loss, numpy_clip_loss(image, text, scale), rtol=1e-6)
  np.testing.assert_allclose(metrics['temperature'], 0.07, rtol=1e-6)
  clamped_loss, clamped = obj.clip_contrastive_loss(image, text, np.log(1000.0))
  np.testing.assert_allclose(clamped['temperature'], 0.01, rtol=1e-6)
  np.testing.assert_allclose(clamped_loss, obj.clip_contrastive_loss(image, text,
                                                                      np.log(100.0))[0],
                             rtol=1e-6)
  np.testing.assert_allclose(clamped_loss, numpy_clip_loss(image, text, np.log(1000.0)),
                             rtol=1e-6)
  # Recall@k against an argsort on the same similarities.
  similarity = image @ text.T
  i2t_rank = np.argsort(-similarity, axis=1).argsort(axis=1)[np.arange(10), np.arange(10)]
  t2i_rank = np.argsort(-similarity.T, axis=1).argsort(axis=1)[np.arange(10), np.arange(10)]
  for k in (1, 5):
    assert float(metrics[f'i2t_recall@{k}']) == pytest.approx(np.mean(i2t_rank < k))
    assert float(metrics[f't2i_recall@{k}']) == pytest.approx(np.mean(t2i_rank < k))


def test_clip_recall_on_a_handcrafted_similarity():
  # Row i of S scores its own column below exactly i others, so image i's match ranks i-th.
  b = 6
  similarity = np.full((b, b), 0.1, np.float32)
  for i in range(b):
    others = [j for j in range(b) if j != i][:i]
    similarity[i, others] = 0.9
    similarity[i, i] = 0.5
  identity = np.eye(b, dtype=np.float32)
  _, metrics = obj.clip_contrastive_loss(similarity, identity, 0.0)   # image @ text.T = S
  assert float(metrics['i2t_recall@1']) == pytest.approx(1 / 6)
  assert float(metrics['i2t_recall@5']) == pytest.approx(5 / 6)
  _, swapped = obj.clip_contrastive_loss(identity, similarity, 0.0)   # = S.T: texts rank i-th
  assert float(swapped['t2i_recall@1']) == pytest.approx(1 / 6)
  assert float(swapped['t2i_recall@5']) == pytest.approx(5 / 6)
  # With fewer than 5 pairs, every match is within the top 5.
  _, small = obj.clip_contrastive_loss(similarity[:3, :3], identity[:3, :3], 0.0)
  assert float(small['i2t_recall@5']) == 1.0 and float(small['i2t_recall@1']) < 1.0


def _clip_pairs_with_padding(n, p, padding_at, seed):
  """n noisy image-text pairs, then p padding rows copying pair 0 (as the eval loader's _pad_to
  fills the last batch), moved to rows `padding_at`; -> (pairs, padded pairs, valid)."""
  rng = np.random.default_rng(seed)
  image = unit_rows(rng.normal(size=(n, 6))).astype(np.float32)
  text = unit_rows(image + 1.2 * rng.normal(size=(n, 6))).astype(np.float32)
  padded_image = np.concatenate([image, np.repeat(image[:1], p, axis=0)])
  padded_text = np.concatenate([text, np.repeat(text[:1], p, axis=0)])
  valid = np.array([1] * n + [0] * p, np.int32)
  # Row r of the result is row layout[r] of the padded batch: the padding (its rows n..n+p-1)
  # lands at `padding_at`, the real rows keep their order elsewhere.
  layout = np.empty(n + p, np.int64)
  layout[list(padding_at)] = np.arange(n, n + p)
  layout[[i for i in range(n + p) if i not in padding_at]] = np.arange(n)
  return ((image, text), (padded_image[layout], padded_text[layout]), valid[layout])


@pytest.mark.parametrize('padding_at', [(5, 6, 7), (0, 3, 7)], ids=['at_end', 'interleaved'])
def test_clip_padding_rows_are_neither_queries_nor_candidates(padding_at):
  """Eval padding (valid=0, copies of example 0) changes no metric: the loss, recalls and count
  are those of the real pairs alone, and the real rows get their gradients of that loss."""
  (image, text), (padded_image, padded_text), valid = _clip_pairs_with_padding(
      5, 3, padding_at, seed=16)
  scale = np.float32(np.log(1 / 0.07))
  loss_and_grad = jax.jit(jax.value_and_grad(obj.clip_contrastive_loss, argnums=(0, 1),
                                             has_aux=True))
  (loss, metrics), grads = loss_and_grad(image, text, scale)
  (padded_loss, padded_metrics), padded_grads = loss_and_grad(padded_image, padded_text, scale,
                                                              valid)
  np.testing.assert_allclose(padded_loss, loss, rtol=1e-6, atol=1e-6)
  assert padded_metrics.keys() == metrics.keys()
  for key in metrics:
    np.testing.assert_allclose(padded_metrics[key], metrics[key], rtol=1e-6, atol=1e-6,
                               err_msg=key)
  assert int(padded_metrics['num_examples']) == 5
  real = valid == 1
  for padded_grad, grad in zip(padded_grads, grads):
    np.testing.assert_allclose(padded_grad[real], grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(padded_grad[~real], 0.0)
  # Not vacuous: counting the padding would change the metrics.
  _, counted = obj.clip_contrastive_loss(padded_image, padded_text, scale)
  assert abs(float(counted['loss']) - float(loss)) > 1e-3
  assert any(abs(float(counted[k]) - float(metrics[k])) > 1e-3
             for k in metrics if 'recall' in k)
  # A batch of padding only: zero counts, finite zero means, which merge_metrics then leaves out.
  nothing_loss, nothing = jax.jit(obj.clip_contrastive_loss)(padded_image, padded_text, scale,
                                                             np.zeros_like(valid))
  assert float(nothing_loss) == 0.0 and int(nothing['num_examples']) == 0
  assert all(np.isfinite(float(v)) for v in nothing.values())
  merged = obj.merge_metrics([padded_metrics, nothing], obj.MERGE_WEIGHTS['contrastive'])
  assert merged['num_examples'] == 5
  for key in metrics:
    assert merged[key] == pytest.approx(float(metrics[key]), rel=1e-6, abs=1e-7)


def test_clip_all_valid_equals_no_valid():
  rng = np.random.default_rng(17)
  image = unit_rows(rng.normal(size=(7, 6))).astype(np.float32)
  text = unit_rows(image + rng.normal(size=(7, 6))).astype(np.float32)
  loss, metrics = jax.jit(obj.clip_contrastive_loss)(image, text, np.float32(2.0))
  for valid in (np.ones(7, np.int32), np.ones(7, bool)):
    valid_loss, valid_metrics = jax.jit(obj.clip_contrastive_loss)(image, text, np.float32(2.0),
                                                                   valid)
    np.testing.assert_allclose(valid_loss, loss, rtol=1e-6)
    assert valid_metrics.keys() == metrics.keys()
    for key in metrics:
      np.testing.assert_allclose(valid_metrics[key], metrics[key], rtol=1e-6, err_msg=key)
      assert valid_metrics[key].dtype == metrics[key].dtype
  assert int(metrics['num_examples']) == 7
  with pytest.raises(ValueError, match='valid must be'):
    obj.clip_contrastive_loss(image, text, 2.0, np.ones(6, np.int32))


def test_clip_loss_is_over_the_global_batch_when_sharded():
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
  rng = np.random.default_rng(5)
  image = unit_rows(rng.normal(size=(16, 8))).astype(np.float32)
  text = unit_rows(image + rng.normal(size=(16, 8))).astype(np.float32)
  scale = np.float32(np.log(20.0))
  loss_and_grad = jax.jit(jax.value_and_grad(obj.clip_contrastive_loss, argnums=(0, 2),
                                             has_aux=True))
  (loss, metrics), grads = loss_and_grad(image, text, scale)
  batch_sharding = NamedSharding(mesh, PartitionSpec('data'))
  sharded_image = jax.device_put(image, batch_sharding)
  sharded_text = jax.device_put(text, batch_sharding)
  assert len(sharded_image.addressable_shards) == 8
  assert sharded_image.addressable_shards[0].data.shape == (2, 8)
  (sharded_loss, sharded_metrics), sharded_grads = loss_and_grad(
      sharded_image, sharded_text, jax.device_put(scale, NamedSharding(mesh, PartitionSpec())))
  np.testing.assert_allclose(sharded_loss, loss, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(sharded_loss, numpy_clip_loss(image, text, scale), rtol=1e-6)
  for key in metrics:
    np.testing.assert_allclose(sharded_metrics[key], metrics[key], rtol=1e-6)
  for sharded_grad, grad in zip(sharded_grads, grads):
    np.testing.assert_allclose(sharded_grad, grad, rtol=1e-5, atol=1e-6)
  # A per-device loss would differ: each shard alone contrasts only 2 pairs.
  per_shard = np.mean([numpy_clip_loss(image[i:i + 2], text[i:i + 2], scale)
                       for i in range(0, 16, 2)])
  assert abs(per_shard - float(loss)) > 1e-2


def test_merge_metrics_equals_the_metrics_of_the_whole_set():
  logits = random_logits(2, 8, 13, seed=6)
  labels = random_labels((2, 8), 13, ignored_fraction=0.5, seed=7)
  labels[0, :6] = -100  # Unequal token counts, so batch means are a wrong answer.
  causal_lm_loss = jax.jit(obj.causal_lm_loss)
  batches = [causal_lm_loss(logits[i:i + 1], labels[i:i + 1])[1] for i in range(2)]
  merged = obj.merge_metrics(batches, obj.MERGE_WEIGHTS['causal_lm'])
  whole = causal_lm_loss(logits, labels)[1]
  assert merged['num_tokens'] == int(whole['num_tokens'])
  for key in ('loss', 'perplexity', 'accuracy'):
    assert merged[key] == pytest.approx(float(whole[key]), rel=1e-6)
  assert merged['loss'] != pytest.approx(np.mean([float(b['loss']) for b in batches]), rel=1e-3)

  # Classification batches of 3 and 7 examples.
  logits = random_logits(10, 4, seed=8)
  labels = random_labels((10,), 4, seed=9)
  classification_loss = jax.jit(obj.classification_loss)
  batches = [classification_loss(logits[s], labels[s])[1] for s in (slice(0, 3), slice(3, 10))]
  merged = obj.merge_metrics(batches, obj.MERGE_WEIGHTS['classification'])
  whole = classification_loss(logits, labels)[1]
  for key in ('loss', 'accuracy'):
    assert merged[key] == pytest.approx(float(whole[key]), rel=1e-6)

  # MLM + NSP: token and example counts weight their own metrics; the loss is their sum.
  prediction_logits = random_logits(5, 4, 9, seed=10)
  mlm_labels = random_labels((5, 4), 9, ignored_fraction=0.6, seed=11)
  nsp_logits = random_logits(5, 2, seed=12)
  nsp_labels = np.array([0, 1, 1, -100, 0], np.int32)
  parts = (slice(0, 2), slice(2, 5))
  mlm_nsp_loss = jax.jit(obj.mlm_nsp_loss)
  batches = [mlm_nsp_loss(prediction_logits[s], nsp_logits[s], mlm_labels[s], nsp_labels[s])[1]
             for s in parts]
  merged = obj.merge_metrics(batches, obj.MERGE_WEIGHTS['mlm_nsp'])
  whole = mlm_nsp_loss(prediction_logits, nsp_logits, mlm_labels, nsp_labels)[1]
  assert merged.keys() == whole.keys()
  for key, value in whole.items():
    assert merged[key] == pytest.approx(float(value), rel=1e-6)

  with pytest.raises(ValueError, match="No count to weight metric 'mlm_"):
    obj.merge_metrics(batches, 'num_loss')


def test_weighted_mean_is_zero_for_zero_weights():
  assert float(obj.weighted_mean(jnp.array([1.0, 2.0]), jnp.zeros(2))) == 0.0
  values = jnp.array([jnp.inf, jnp.nan, 3.0, 5.0])
  weights = jnp.array([0.0, 0.0, 1.0, 3.0])
  assert float(jax.jit(obj.weighted_mean)(values, weights)) == pytest.approx(4.5)


def test_bf16_logits_give_a_float32_loss():
  logits = jnp.asarray(random_logits(2, 5, 300, seed=13), jnp.bfloat16)
  labels = random_labels((2, 5), 300, seed=14)
  loss, metrics = jax.jit(obj.causal_lm_loss)(logits, labels)
  assert loss.dtype == jnp.float32 and metrics['perplexity'].dtype == jnp.float32
  reference = torch_ce(np.asarray(logits.astype(jnp.float32)), labels, ignore_index=-100)
  np.testing.assert_allclose(loss, reference, rtol=1e-6)
  loss, _ = obj.classification_loss(logits[:, 0], labels[:, 0])
  assert loss.dtype == jnp.float32
  loss, _ = obj.clip_contrastive_loss(jnp.eye(3, dtype=jnp.bfloat16),
                                      jnp.eye(3, dtype=jnp.bfloat16), jnp.bfloat16(1.0))
  assert loss.dtype == jnp.float32


def test_registry_reads_the_right_fields():
  logits = random_logits(4, 3)
  labels = np.array([2, 0, -100, 1], np.int32)
  loss, _ = obj.OBJECTIVES['classification'](outputs.ClassifierOutput(logits=logits),
                                             {'label': labels}, label_smoothing=0.1)
  np.testing.assert_allclose(
      loss, torch_ce(logits, labels, ignore_index=-100, label_smoothing=0.1), rtol=1e-6)
  lm_logits = random_logits(2, 3, 7)
  lm_labels = random_labels((2, 3), 7)
  loss, _ = obj.OBJECTIVES['causal_lm'](outputs.CausalLMOutput(logits=lm_logits),
                                        {'input_ids': lm_labels, 'labels': lm_labels})
  np.testing.assert_allclose(loss, torch_ce(lm_logits, lm_labels, ignore_index=-100), rtol=1e-6)
  pretraining = outputs.PreTrainingOutput(prediction_logits=lm_logits,
                                          seq_relationship_logits=logits[:2, :2])
  nsp = np.array([1, 0], np.int32)
  _, metrics = obj.OBJECTIVES['mlm_nsp'](pretraining, {'mlm_labels': lm_labels,
                                                       'next_sentence_label': nsp})
  np.testing.assert_allclose(metrics['nsp_loss'], torch_ce(logits[:2, :2], nsp), rtol=1e-6)
  _, mlm_only = obj.OBJECTIVES['mlm_nsp'](outputs.ClassifierOutput(logits=lm_logits),
                                          {'mlm_labels': lm_labels})
  assert 'nsp_loss' not in mlm_only

  with pytest.raises(KeyError, match=r"needs batch\['label'\]"):
    obj.OBJECTIVES['classification'](outputs.ClassifierOutput(logits=logits), {'labels': labels})
  with pytest.raises(TypeError, match='takes a CausalLMOutput'):
    obj.OBJECTIVES['causal_lm'](outputs.ClassifierOutput(logits=lm_logits), {'labels': lm_labels})


def test_contrastive_objective_on_clip_matches_its_own_logits():
  """The trainer passes params['logit_scale']; the loss is CE on CLIP's own logits_per_image."""
  config = clip.CLIPConfig(
      text_config=clip.CLIPTextConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                                      intermediate_size=32, max_position_embeddings=8,
                                      pad_token_id=0, bos_token_id=48, eos_token_id=49),
      vision_config=clip.CLIPVisionConfig(hidden_size=16, num_layers=1, num_heads=2,
                                          intermediate_size=32, image_size=16, patch_size=8),
      projection_dim=8)
  model = clip.CLIP(config)
  rng = np.random.default_rng(15)
  ids = rng.integers(1, 48, size=(4, 8)).astype(np.int32)
  ids[:, -1] = 49
  inputs = {'input_ids': ids, 'pixel_values': rng.normal(size=(4, 16, 16, 3)).astype(np.float32)}
  # Random parameters of the right shapes: compiling model.init would take seconds.
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), **inputs))['params']
  params = jax.tree.map(lambda s: rng.normal(scale=0.3, size=s.shape).astype(np.float32), shapes)
  params['logit_scale'] = np.float32(1.5)
  out = jax.jit(model.apply)({'params': params}, **inputs)
  loss, metrics = obj.OBJECTIVES['contrastive'](out, inputs, logit_scale=params['logit_scale'])
  logits = np.asarray(out.logits_per_image, np.float64)
  diagonal = torch.arange(4)
  reference = (F.cross_entropy(torch.tensor(logits), diagonal)
               + F.cross_entropy(torch.tensor(logits.T), diagonal)).item() / 2
  np.testing.assert_allclose(loss, reference, rtol=1e-5)
  np.testing.assert_allclose(metrics['temperature'], np.exp(-1.5), rtol=1e-6)
  with pytest.raises(TypeError, match=r"logit_scale=params\['logit_scale'\]"):
    obj.OBJECTIVES['contrastive'](out, inputs)
  with pytest.raises(ValueError, match='needs both image_embeds and text_embeds'):
    obj.OBJECTIVES['contrastive'](out.replace(image_embeds=None), inputs,
                                  logit_scale=params['logit_scale'])


def test_contrastive_objective_leaves_out_the_eval_padding_of_the_batch():
  """An eval batch's 'valid' (0 on the loader's padding) reaches clip_contrastive_loss."""
  (image, text), (padded_image, padded_text), valid = _clip_pairs_with_padding(
      4, 2, (4, 5), seed=18)
  scale = np.float32(1.5)
  loss, metrics = obj.clip_contrastive_loss(image, text, scale)

  def objective(image_embeds, text_embeds, batch):
    out = outputs.CLIPOutput(logits_per_image=None, logits_per_text=None,
                             text_embeds=text_embeds, image_embeds=image_embeds)
    return obj.OBJECTIVES['contrastive'](out, batch, logit_scale=scale)

  ids = np.zeros((6, 3), np.int32)
  padded_loss, padded_metrics = jax.jit(objective)(padded_image, padded_text,
                                                   {'input_ids': ids, 'valid': valid})
  np.testing.assert_allclose(padded_loss, loss, rtol=1e-6, atol=1e-6)
  for key in metrics:
    np.testing.assert_allclose(padded_metrics[key], metrics[key], rtol=1e-6, atol=1e-6,
                               err_msg=key)
  assert int(padded_metrics['num_examples']) == 4
  # A (train) batch without 'valid' scores every row.
  _, every_row = objective(padded_image, padded_text, {'input_ids': ids})
  assert int(every_row['num_examples']) == 6


@pytest.mark.parametrize('name', sorted(obj.SUM_REDUCIBLE))
def test_sum_reduction_is_the_mean_times_the_count(name):
  """The trainer differentiates reduction='sum' and divides by SUM_REDUCIBLE's count."""
  logits = random_logits(3, 7, 11, seed=20)
  labels = random_labels((3, 7), 11, ignored_fraction=0.4, seed=21)
  if name == 'classification':
    batch, out = {'label': labels}, outputs.ClassifierOutput(logits=logits)
  else:
    batch, out = {'labels': labels}, outputs.CausalLMOutput(logits=logits)
  objective = jax.jit(obj.OBJECTIVES[name], static_argnames='reduction')
  mean, mean_metrics = objective(out, batch)
  total, sum_metrics = objective(out, batch, reduction='sum')
  count = sum_metrics[obj.SUM_REDUCIBLE[name]]
  assert int(count) == int(np.sum(labels != obj.IGNORE_INDEX)) > 0
  np.testing.assert_allclose(total, float(mean) * int(count), rtol=1e-6)
  for key in mean_metrics:  # the metrics stay the mean's
    np.testing.assert_allclose(sum_metrics[key], mean_metrics[key], rtol=1e-7)
  with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
    obj.OBJECTIVES[name](out, batch, reduction='total')


def test_counts_are_exact_on_both_sides_of_float32s_range():
  """Counts below 2**24 are summed in float32 (one all-reduce with the gradients), larger ones
  in int32, where float32 would round 2**24 + 1 down."""
  small = np.zeros(2**24 - 1, bool)
  small[::3] = True
  assert int(jax.jit(obj._count)(small)) == int(small.sum())
  assert int(jax.jit(obj._count)(np.ones(2**24 + 1, bool))) == 2**24 + 1
