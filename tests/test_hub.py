"""The generic loader: bad input gets a clear error, sharded files, placement, pickles, heads."""

import dataclasses
import functools
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import ptm_jax
from ptm_jax import partitioning
from ptm_jax.hub import checkpoint_io
from ptm_jax.models import bert
from tests import parity


@pytest.fixture(scope='module')
def bert_dirs(tmp_path_factory):
  """A perturbed tiny BertForSequenceClassification and a BertModel, saved by transformers."""
  root = tmp_path_factory.mktemp('bert')
  config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=24,
                                   max_position_embeddings=20, num_labels=4)
  torch.manual_seed(0)
  classifier = parity.perturb(transformers.BertForSequenceClassification(config).eval())
  classifier.save_pretrained(root / 'cls')
  base = parity.perturb(transformers.BertModel(config).eval(), seed=1)
  base.save_pretrained(root / 'base')
  return {'cls': str(root / 'cls'), 'base': str(root / 'base'), 'torch_cls': classifier}


def copy_of(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def edit_weights(folder, fn):
  path = os.path.join(folder, 'model.safetensors')
  tensors = safetensors.numpy.load_file(path)
  fn(tensors)
  safetensors.numpy.save_file(tensors, path, {'format': 'pt'})


def edit_config(folder, **changes):
  path = os.path.join(folder, 'config.json')
  with open(path) as f:
    config = json.load(f)
  config.update(changes)
  with open(path, 'w') as f:
    json.dump(config, f)


def test_missing_keys_are_listed(bert_dirs, tmp_path):
  folder = copy_of(bert_dirs['cls'], tmp_path / 'm')
  edit_weights(folder, lambda t: t.pop('bert.encoder.layer.1.output.dense.weight'))
  with pytest.raises(ptm_jax.CheckpointError, match=r'missing.*bert\.encoder\.layer\.1\.output'
                     r'\.dense\.weight'):
    ptm_jax.from_pretrained(folder)


def test_unexpected_keys_are_listed_unless_allowed(bert_dirs, tmp_path):
  folder = copy_of(bert_dirs['cls'], tmp_path / 'u')
  edit_weights(folder, lambda t: t.update({'bert.encoder.extra.weight': np.ones(3, np.float32)}))
  with pytest.raises(ptm_jax.CheckpointError, match=r"bert\.encoder\.extra\.weight.*"
                     r"allow_unexpected_keys=True"):
    ptm_jax.from_pretrained(folder)
  module, variables = ptm_jax.from_pretrained(folder, allow_unexpected_keys=True)
  assert 'classifier' in variables['params']


def test_shape_mismatch_names_key_and_shapes(bert_dirs, tmp_path):
  folder = copy_of(bert_dirs['cls'], tmp_path / 's')
  edit_weights(folder, lambda t: t.update(
      {'classifier.weight': np.zeros((5, 16), np.float32)}))
  with pytest.raises(ptm_jax.CheckpointError,
                     match=r"'classifier\.weight'.*expects \(16, 4\).*has \(5, 16\)"):
    ptm_jax.from_pretrained(folder)


def test_unknown_model_type_and_architecture(bert_dirs, tmp_path):
  folder = copy_of(bert_dirs['cls'], tmp_path / 't')
  edit_config(folder, model_type='mamba')
  with pytest.raises(ValueError, match=r"Unknown model_type 'mamba'.*'bert'"):
    ptm_jax.from_pretrained(folder)
  edit_config(folder, model_type='bert', architectures=['BertForQuestionAnswering'])
  with pytest.raises(ValueError, match=r"Unknown bert architecture 'BertForQuestionAnswering'"):
    ptm_jax.from_pretrained(folder)


def test_truncated_and_corrupt_files(bert_dirs, tmp_path):
  folder = copy_of(bert_dirs['cls'], tmp_path / 'c')
  path = os.path.join(folder, 'model.safetensors')
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(ptm_jax.CheckpointError, match=r'corrupt or truncated.*download it again'):
    ptm_jax.from_pretrained(folder)
  with open(path, 'wb') as f:
    f.write(b'\x10\x00\x00\x00\x00\x00\x00\x00not json at all!' + data[100:])
  with pytest.raises(ptm_jax.CheckpointError, match=r'corrupt or truncated'):
    ptm_jax.from_pretrained(folder)


def test_pickle_needs_opt_in(bert_dirs, tmp_path):
  folder = str(tmp_path / 'p')
  os.makedirs(folder)
  shutil.copy(os.path.join(bert_dirs['cls'], 'config.json'), folder)
  torch.save(bert_dirs['torch_cls'].state_dict(), os.path.join(folder, 'pytorch_model.bin'))
  with pytest.raises(ptm_jax.CheckpointError, match=r'pickle.*allow_pickle=True'):
    ptm_jax.from_pretrained(folder)
  module, variables = ptm_jax.from_pretrained(folder, allow_pickle=True)
  _, reference = ptm_jax.from_pretrained(bert_dirs['cls'])
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), variables, reference))


def test_sequence_longer_than_position_table(bert_dirs):
  module, variables = ptm_jax.from_pretrained(bert_dirs['cls'])
  ids = np.zeros((1, 21), np.int32)
  with pytest.raises(ValueError, match=r'21 positions but the position table holds 20'):
    module.apply(variables, input_ids=ids)


def test_missing_config(tmp_path):
  with pytest.raises(ptm_jax.CheckpointError, match='no config.json'):
    ptm_jax.from_pretrained(str(tmp_path))


def test_missing_folder_or_model_type_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'absent does not exist: pass an existing folder, '
                                              r'or a hub id'):
    ptm_jax.from_pretrained(str(tmp_path / 'absent'))
  (tmp_path / 'config.json').write_text('{"hidden_size": 4}')
  with pytest.raises(ptm_jax.CheckpointError,
                     match=r"config.json has no model_type; add the family's \(one of \['bert'"):
    ptm_jax.from_pretrained(str(tmp_path))


def test_nothing_is_read_before_every_key_and_shape_fits(bert_dirs, tmp_path, monkeypatch):
  """Nothing half-loaded: every key and every shape is accounted for before any tensor is read,
  so a checkpoint with an unexpected, a missing or a misshapen key (each sorted after keys that
  do fit) fails without reading, converting or placing a single tensor."""
  reads = []
  read = checkpoint_io.SafetensorsReader.get
  monkeypatch.setattr(checkpoint_io.SafetensorsReader, 'get',
                      lambda self, key: reads.append(key) or read(self, key))
  edits = {'unexpected': lambda t: t.update({'zzz.unexpected': np.ones(1, np.float32)}),
           'missing': lambda t: t.pop('classifier.bias'),
           'misshapen': lambda t: t.update({'classifier.weight': np.zeros((5, 16), np.float32)})}
  for name, edit in edits.items():
    folder = copy_of(bert_dirs['cls'], tmp_path / name)
    edit_weights(folder, edit)
    with pytest.raises(ptm_jax.CheckpointError):
      ptm_jax.from_pretrained(folder)
    assert not reads, f'{name}: read {reads[:3]} before failing'
  ptm_jax.from_pretrained(bert_dirs['cls'])
  assert len(reads) > 10  # the reads of a good checkpoint go through the patched reader


def test_head_on_base_checkpoint_is_initialised_and_reported(bert_dirs, caplog):
  with pytest.raises(ptm_jax.CheckpointError, match='init_missing_head=True'):
    ptm_jax.from_pretrained(bert_dirs['base'], head='sequence_classification',
                            init_missing_head=False)
  with caplog.at_level(logging.WARNING):
    module, variables = ptm_jax.from_pretrained(bert_dirs['base'],
                                                head='sequence_classification')
  assert 'classifier/kernel' in caplog.text
  kernel = variables['params']['classifier']['kernel']
  # N(0, 0.02), transformers' initializer_range (the std of 64 draws is 0.02 +- 0.0018).
  assert kernel.shape == (16, 4) and 0.014 < float(jnp.std(kernel)) < 0.026
  assert abs(float(jnp.mean(kernel))) < 0.01
  _, base_vars = ptm_jax.from_pretrained(bert_dirs['base'])
  np.testing.assert_array_equal(variables['params']['bert']['layer_0']['mlp']['fc_in']['kernel'],
                                base_vars['params']['bert']['layer_0']['mlp']['fc_in']['kernel'])


def test_sharded_index_roundtrip(bert_dirs, tmp_path):
  module, variables = ptm_jax.from_pretrained(bert_dirs['cls'])
  ptm_jax.save_pretrained(module, variables, str(tmp_path / 'sharded'), max_shard_bytes=4096)
  files = os.listdir(tmp_path / 'sharded')
  assert 'model.safetensors.index.json' in files
  assert sum(f.endswith('.safetensors') for f in files) > 3
  _, again = ptm_jax.from_pretrained(str(tmp_path / 'sharded'))
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), variables, again))
  # transformers reads our shards too.
  hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path / 'sharded')
  np.testing.assert_array_equal(hf.classifier.weight.detach().numpy(),
                                np.asarray(variables['params']['classifier']['kernel']).T)
  # A shard that disappeared is named.
  os.remove(tmp_path / 'sharded' / 'model-00002-of-{:05d}.safetensors'.format(
      sum(f.endswith('.safetensors') for f in files)))
  with pytest.raises(ptm_jax.CheckpointError, match=r'model-00002-of-.*does not exist'):
    ptm_jax.from_pretrained(str(tmp_path / 'sharded'))


def test_tensors_placed_into_mesh_shardings(bert_dirs):
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  module, variables = ptm_jax.from_pretrained(bert_dirs['cls'], mesh=mesh)
  fc_in = variables['params']['bert']['layer_0']['mlp']['fc_in']['kernel']  # (embed, mlp)
  assert fc_in.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  shard_shapes = {s.data.shape for s in fc_in.addressable_shards}
  assert shard_shapes == {(8, 12)}
  ids = np.ones((2, 6), np.int32)
  sharded = module.apply(variables, input_ids=ids).logits
  _, plain = ptm_jax.from_pretrained(bert_dirs['cls'])
  np.testing.assert_allclose(sharded, module.apply(plain, input_ids=ids).logits, atol=1e-6)


def test_bf16_compute_with_float32_params(bert_dirs):
  module, variables = ptm_jax.from_pretrained(bert_dirs['cls'], dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  ids, mask = parity.token_batch(50, length=9)
  logits = module.apply(variables, input_ids=ids.astype(np.int32),
                        attention_mask=mask.astype(np.int32)).logits
  assert logits.dtype == jnp.bfloat16
  module32, _ = ptm_jax.from_pretrained(bert_dirs['cls'])
  exact = module32.apply(variables, input_ids=ids.astype(np.int32),
                         attention_mask=mask.astype(np.int32)).logits
  # bf16 rounds each matmul's inputs (8 bits of mantissa): about 1e-3 on these logits, whose
  # spread is about 0.15; a layer computed wrongly in bf16 would be off by far more.
  error = np.abs(np.asarray(logits, np.float32) - exact)
  assert 0 < error.max() < 0.03 * np.std(exact) + 5e-3, (error.max(), np.std(exact))


def test_every_parameter_has_logical_axes(bert_dirs):
  module, _ = ptm_jax.from_pretrained(bert_dirs['cls'])
  boxed = partitioning.abstract_variables(module)
  specs = jax.tree.leaves(partitioning.logical_specs(boxed),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert specs and all(isinstance(s, jax.sharding.PartitionSpec) and len(s) > 0 for s in specs)
  assert len(specs) == len(jax.tree.leaves(boxed))


def test_unknown_checkpoint_format(tmp_path):
  path = tmp_path / 'weights.h5'
  path.write_bytes(b'x')
  with pytest.raises(ptm_jax.CheckpointError, match='Unknown checkpoint format'):
    checkpoint_io.open_checkpoint(str(path))


def test_make_mesh_checks_device_count():
  assert partitioning.make_mesh(data=-1, tensor=2).shape == {'data': 4, 'fsdp': 1, 'tensor': 2}
  with pytest.raises(ValueError, match='needs 6 devices but 8 are present'):
    partitioning.make_mesh(data=3, fsdp=2)
  with pytest.raises(ValueError, match='8 devices do not split into'):
    partitioning.make_mesh(data=-1, fsdp=3)


def test_hub_id_read_from_local_cache_when_offline(bert_dirs, tmp_path):
  """No network here: a hub id resolves through huggingface_hub's cache layout."""
  commit = '0123456789abcdef0123456789abcdef01234567'
  repo = tmp_path / 'cache' / 'models--someone--tiny-bert'
  shutil.copytree(bert_dirs['cls'], repo / 'snapshots' / commit)
  (repo / 'refs').mkdir()
  (repo / 'refs' / 'main').write_text(commit)
  module, variables = ptm_jax.from_pretrained('someone/tiny-bert',
                                              cache_dir=str(tmp_path / 'cache'))
  _, reference = ptm_jax.from_pretrained(bert_dirs['cls'])
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), variables, reference))
  with pytest.raises(FileNotFoundError, match=r'someone/absent.*neither a local folder nor in '
                     r'the Hugging Face cache'):
    ptm_jax.from_pretrained('someone/absent', cache_dir=str(tmp_path / 'cache'))


def test_untied_mlm_decoder_is_not_dropped_silently(tmp_path):
  """tie_word_embeddings=false: the checkpoint's decoder is its own weight, not a tied copy."""
  config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=24,
                                   max_position_embeddings=20, tie_word_embeddings=False)
  torch.manual_seed(0)
  reference = parity.perturb(transformers.BertForMaskedLM(config).eval())
  assert not torch.equal(reference.cls.predictions.decoder.weight,
                         reference.bert.embeddings.word_embeddings.weight)
  reference.save_pretrained(tmp_path / 'untied')
  with pytest.raises(ptm_jax.CheckpointError, match=r'tie_word_embeddings.*'
                     r'cls\.predictions\.decoder\.weight.*allow_unexpected_keys=True'):
    ptm_jax.from_pretrained(str(tmp_path / 'untied'))
  # Dropping them on request still gives the encoder that transformers computes.
  module, variables = ptm_jax.from_pretrained(str(tmp_path / 'untied'),
                                              allow_unexpected_keys=True)
  ids = np.arange(12, dtype=np.int32)[None] % 50
  with torch.no_grad():
    expected = reference.bert(torch.tensor(ids, dtype=torch.long)).last_hidden_state
  assert parity.max_abs_diff(module.apply(variables, input_ids=ids).last_hidden_state,
                             expected) <= 1e-5


def test_legacy_pickle_format_loads(bert_dirs, tmp_path):
  """.bin files saved before torch 1.6 are not zip archives, which torch cannot memory-map."""
  folder = str(tmp_path / 'legacy')
  os.makedirs(folder)
  shutil.copy(os.path.join(bert_dirs['cls'], 'config.json'), folder)
  torch.save(bert_dirs['torch_cls'].state_dict(), os.path.join(folder, 'pytorch_model.bin'),
             _use_new_zipfile_serialization=False)
  module, variables = ptm_jax.from_pretrained(folder, allow_pickle=True)
  _, reference = ptm_jax.from_pretrained(bert_dirs['cls'])
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), variables, reference))


def test_hub_id_with_only_a_pickle_downloads_it_when_allowed(bert_dirs, tmp_path, fake_hub):
  """Older hub repos hold only pytorch_model.bin: allow_pickle=True must fetch it."""
  repo = tmp_path / 'repo'
  repo.mkdir()
  shutil.copy(os.path.join(bert_dirs['cls'], 'config.json'), repo)
  torch.save(bert_dirs['torch_cls'].state_dict(), repo / 'pytorch_model.bin')
  fetched = fake_hub(repo)
  with pytest.raises(ptm_jax.CheckpointError):
    ptm_jax.from_pretrained('someone/old-bert')
  assert 'pytorch_model.bin' not in fetched  # not even downloaded without the opt-in
  _, variables = ptm_jax.from_pretrained('someone/old-bert', allow_pickle=True)
  _, reference = ptm_jax.from_pretrained(bert_dirs['cls'])
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), variables, reference))


# Each family with a classification head: (transformers class, its config, inputs (NCHW for
# images; ours get NHWC)).
_NAMED = {'negative': 0, 'neutral': 1, 'positive': 2}
_BERT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
             intermediate_size=24, max_position_embeddings=20)
_HEADS = {
    'bert_sequence': (transformers.BertForSequenceClassification,
                      lambda **kw: transformers.BertConfig(**_BERT, **kw), 'text'),
    'bert_token': (transformers.BertForTokenClassification,
                   lambda **kw: transformers.BertConfig(**_BERT, **kw), 'text'),
    'vit': (transformers.ViTForImageClassification,
            lambda **kw: transformers.ViTConfig(
                hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                image_size=16, patch_size=8, **kw), 'image'),
    'resnet': (transformers.ResNetForImageClassification,
               lambda **kw: transformers.ResNetConfig(
                   embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type='basic',
                   **kw), 'image'),
}


def _logits(model, kind, module=None, variables=None):
  """transformers' logits, or ours (module, variables) on the same inputs."""
  rng = np.random.default_rng(0)
  if kind == 'text':
    ids, mask = parity.token_batch(50, batch=2, length=7)
    if module is not None:
      return np.asarray(module.apply(variables, input_ids=ids.astype(np.int32),
                                     attention_mask=mask.astype(np.int32)).logits)
    with torch.no_grad():
      return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  pixels = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
  if module is not None:
    return np.asarray(module.apply(variables, pixel_values=pixels.transpose(0, 2, 3, 1)).logits)
  with torch.no_grad():
    return model(pixel_values=torch.tensor(pixels)).logits.numpy()


@pytest.mark.parametrize('problem_type', ['single_label_classification',
                                          'multi_label_classification'])
@pytest.mark.parametrize('name', list(_HEADS))
def test_class_names_and_problem_type_survive_roundtrip(name, problem_type, tmp_path):
  """transformers -> from_pretrained -> save_pretrained -> transformers keeps the classes."""
  cls, make_config, kind = _HEADS[name]
  config = make_config(id2label={i: n for n, i in _NAMED.items()}, label2id=_NAMED,
                       problem_type=problem_type)
  torch.manual_seed(0)
  reference = parity.perturb(cls(config).eval())
  reference.save_pretrained(tmp_path / 'hf')
  module, variables = ptm_jax.from_pretrained(str(tmp_path / 'hf'))
  ptm_jax.save_pretrained(module, variables, str(tmp_path / 'ours'))

  again = cls.from_pretrained(tmp_path / 'ours').eval()
  assert again.config.id2label == {0: 'negative', 1: 'neutral', 2: 'positive'}
  assert again.config.label2id == _NAMED
  assert again.config.problem_type == problem_type
  assert module.config.id2label == ('negative', 'neutral', 'positive')
  assert module.config.label2id is None  # the inverse of id2label
  expected = _logits(reference, kind)
  np.testing.assert_array_equal(_logits(again, kind), expected)
  np.testing.assert_allclose(_logits(None, kind, module, variables), expected, atol=1e-4)


def test_label2id_that_is_not_the_inverse_is_kept(tmp_path):
  """Some hub configs pair real id2label names with another label2id: both are written back."""
  old = {f'LABEL_{i}': i for i in range(3)}
  config = _HEADS['bert_sequence'][1](id2label={i: n for n, i in _NAMED.items()}, label2id=old)
  torch.manual_seed(0)
  transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / 'hf')
  module, variables = ptm_jax.from_pretrained(str(tmp_path / 'hf'))
  ptm_jax.save_pretrained(module, variables, str(tmp_path / 'ours'))
  again = transformers.AutoConfig.from_pretrained(tmp_path / 'ours')
  assert again.id2label == {0: 'negative', 1: 'neutral', 2: 'positive'}
  assert again.label2id == old
  assert module.config.label2id == tuple(old.items())
  assert again.problem_type is None


def test_new_head_class_names(tmp_path):
  """A head on a base checkpoint: num_labels overridden gives LABEL_i, or the names given with
  it (config_overrides id2label); names that do not fit num_labels fail, naming the fix."""
  config = _HEADS['bert_sequence'][1](id2label={i: n for n, i in _NAMED.items()},
                                      label2id=_NAMED, problem_type='multi_label_classification')
  torch.manual_seed(0)
  transformers.BertModel(config).save_pretrained(tmp_path / 'hf')  # its config names 3 classes
  hf = str(tmp_path / 'hf')

  def saved(**overrides):
    module, variables = ptm_jax.from_pretrained(hf, head='sequence_classification',
                                                config_overrides=overrides)
    out = str(tmp_path / f'out{len(os.listdir(tmp_path))}')
    ptm_jax.save_pretrained(module, variables, out)
    return transformers.AutoConfig.from_pretrained(out)

  plain = saved(num_labels=2)
  assert plain.id2label == {0: 'LABEL_0', 1: 'LABEL_1'}
  assert plain.label2id == {'LABEL_0': 0, 'LABEL_1': 1}
  assert plain.problem_type == 'multi_label_classification'  # kept, as transformers does
  named = saved(num_labels=2, id2label={0: 'ham', 1: 'spam'}, problem_type=None)
  assert named.id2label == {0: 'ham', 1: 'spam'} and named.label2id == {'ham': 0, 'spam': 1}
  assert named.problem_type is None
  assert saved(id2label=['bad', 'ok', 'good']).id2label == {0: 'bad', 1: 'ok', 2: 'good'}
  with pytest.raises(ValueError, match=r'id2label names 2 classes but num_labels is 3: .*'
                     r'or set num_labels=2'):
    saved(num_labels=3, id2label={0: 'ham', 1: 'spam'})
  with pytest.raises(ValueError, match=r'id2label keys must be the class ids 0\.\.1'):
    saved(num_labels=2, id2label={1: 'ham', 2: 'spam'})
  with pytest.raises(ValueError, match=r'Unknown problem_type'):
    saved(problem_type='ranking')


def test_class_names_change_no_program_and_no_parameter():
  """Names and problem_type are metadata: same hash, one trace, the same parameter tree."""
  plain = bert.Bert(bert.PRESETS['bert-tiny'], head='sequence_classification')
  named = bert.Bert(dataclasses.replace(bert.PRESETS['bert-tiny'], id2label=('no', 'yes'),
                                        problem_type='single_label_classification'),
                    head='sequence_classification')
  assert named.config.id2label == ('no', 'yes') and hash(named) == hash(plain)
  traces = []

  @functools.partial(jax.jit, static_argnums=0)
  def logits(module, variables, ids):
    traces.append(module)
    return module.apply(variables, input_ids=ids).logits

  ids = np.zeros((1, 8), np.int32)
  variables = jax.jit(plain.init)(jax.random.key(0), ids)
  named_variables = jax.jit(named.init)(jax.random.key(0), ids)
  assert jax.tree.structure(named_variables) == jax.tree.structure(variables)
  np.testing.assert_array_equal(logits(named, variables, ids), logits(plain, variables, ids))
  assert len(traces) == 1


def test_a_head_trained_from_data_saves_its_class_names(tmp_path):
  """The trainer's model takes the dataset's class names (registry.data_fields), so that
  save_pretrained writes them as id2label, as transformers' pipelines show them."""
  from ptm_jax.data import pipeline
  from ptm_jax.models import registry
  from ptm_jax.train.config import base_config
  config = base_config()
  config.model.name = 'vit-ti/16'
  config.model.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                      patch_size=4)
  config.data.image_size = 8
  info = pipeline.DatasetInfo('image_classification', 'train', 4, num_classes=2,
                              class_names=['cat', 'dog'])
  module, _ = registry.build_model(config.model, 'image_classification', info, config.data)
  variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  ptm_jax.save_pretrained(module, variables, str(tmp_path))
  loaded = transformers.AutoConfig.from_pretrained(str(tmp_path))
  assert loaded.id2label == {0: 'cat', 1: 'dog'} and loaded.label2id == {'cat': 0, 'dog': 1}


def test_a_new_head_loads_from_another_heads_checkpoint(tmp_path):
  """The fine-tuning recipes' case: a classifier on a pre-training checkpoint (its MLM/NSP heads
  dropped), on a ViTModel checkpoint (its pooler, which the classifier does not use, dropped) and
  on a 1000-class classifier with num_labels=10 (the head initialised anew), as transformers
  does; a base-model key that fits nowhere is still an error."""
  bert_cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64)
  bert_cfg.architectures = ['BertForMaskedLM']   # as bert-base-uncased's config.json says
  transformers.BertForPreTraining(bert_cfg).save_pretrained(tmp_path / 'bert')
  vit_cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, image_size=32, patch_size=16)
  transformers.ViTModel(vit_cfg).save_pretrained(tmp_path / 'vit')
  resnet_cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                         num_labels=1000)
  torch_resnet = transformers.ResNetForImageClassification(resnet_cfg).eval()
  torch_resnet.save_pretrained(tmp_path / 'resnet')
  for name, head, labels in (('bert', 'sequence_classification', 2),
                             ('vit', 'classification', 10), ('resnet', 'classification', 10)):
    module, variables = ptm_jax.from_pretrained(str(tmp_path / name), head=head,
                                                config_overrides={'num_labels': labels})
    assert module.config.num_labels == labels
    assert variables['params']['classifier']['bias'].shape == (labels,)
    # The backbone is the checkpoint's, as the bare model loads it (whose parity with
    # transformers the family's own tests check); only the new head is initialised.
    _, bare = ptm_jax.from_pretrained(str(tmp_path / name), head=None,
                                      allow_unexpected_keys=True)
    backbone = {k: v for k, v in variables.items() if k != 'params'}
    backbone['params'] = {k: v for k, v in variables['params'].items() if k != 'classifier'}
    flat_bare = dict(jax.tree_util.tree_leaves_with_path(bare))
    flat_backbone = dict(jax.tree_util.tree_leaves_with_path(backbone))
    pooler = {p for p in flat_bare if 'pooler' in jax.tree_util.keystr(p)}
    assert flat_backbone.keys() == flat_bare.keys() - (pooler if name == 'vit' else set()), name
    for path, value in flat_backbone.items():
      np.testing.assert_array_equal(value, flat_bare[path], err_msg=f'{name} {path}')
  # ... and the bare model holds the checkpoint's tensors (in the Flax layout).
  hf_state = torch_resnet.state_dict()
  np.testing.assert_array_equal(
      np.asarray(bare['params']['resnet']['stem']['conv']['kernel']),
      hf_state['resnet.embedder.embedder.convolution.weight'].numpy().transpose(2, 3, 1, 0))
  # Without a head asked for, the checkpoint's own keys must all fit, as before.
  with pytest.raises(ptm_jax.CheckpointError, match='no place'):
    ptm_jax.from_pretrained(str(tmp_path / 'bert'), head=None)
  # A key of the base model that this config has no place for stays an error.
  tensors = safetensors.numpy.load_file(str(tmp_path / 'bert' / 'model.safetensors'))
  tensors['bert.encoder.layer.1.output.dense.bias'] = np.zeros(32, np.float32)
  safetensors.numpy.save_file(tensors, str(tmp_path / 'bert' / 'model.safetensors'),
                              metadata={'format': 'pt'})
  with pytest.raises(ptm_jax.CheckpointError, match='layer.1'):
    ptm_jax.from_pretrained(str(tmp_path / 'bert'), head='sequence_classification')
