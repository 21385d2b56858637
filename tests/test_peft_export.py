"""PEFT export: adapters that huggingface peft loads onto the transformers model with our logits,
merged exports that transformers loads with the same logits, adapter-only checkpoints, and the
refusal of what an export would get wrong or drop."""

import dataclasses
import json

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import peft
import pytest
import safetensors.numpy
import torch
import transformers

import ptm_jax
from experiments import train
from ptm_jax.adapt import methods, peft_export
from ptm_jax.adapt import rules as adapt_rules
from ptm_jax.models import layers
from ptm_jax.train.config import base_config
from tests import parity

BYTE_VOCAB = 257  # the byte tokenizer's 256 bytes + end of text
RANK, ALPHA = 4, 8.0


def gpt2_folder(path, vocab=BYTE_VOCAB, layers_n=2, seed=0):
  torch.manual_seed(seed)
  config = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers_n, n_head=4,
                                   n_inner=48, n_positions=32, bos_token_id=vocab - 1,
                                   eos_token_id=vocab - 1)
  parity.perturb(transformers.GPT2LMHeadModel(config).eval(), seed=seed).save_pretrained(path)
  return str(path)


def torch_logits(model, **inputs):
  with torch.no_grad():
    return model.eval()(**{k: torch.tensor(np.asarray(v, np.int64) if v.dtype.kind == 'i' else v)
                           for k, v in inputs.items()}).logits.numpy()


def peft_model(base, adapter_dir):
  return peft.PeftModel.from_pretrained(base.eval(), adapter_dir).eval()


def adapted(module, base_params, adapt, inputs, seed=0, noise=0.3):
  """The adapted tree over `base_params` with every added leaf perturbed (B non-zero)."""
  with methods.applied(adapt):
    fresh = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.key(1), **inputs)))['params']
  rng = np.random.default_rng(seed)
  added = {k: (noise * rng.normal(size=v.shape)).astype(np.float32)
           for k, v in adapt_rules.flatten(fresh).items() if k.rsplit('/', 1)[-1] in
           ('lora_a', 'lora_b')}
  params = methods.prepare(adapt_rules.unflatten({**adapt_rules.flatten(base_params), **added}),
                           adapt)
  flat = adapt_rules.flatten(params)
  for k in [k for k in flat if k.endswith('dora_magnitude')]:  # m away from ||W0||
    flat[k] = flat[k] * np.exp(0.2 * rng.normal(size=flat[k].shape)).astype(np.float32)
  return adapt_rules.unflatten(flat)


def ours(module, params, adapt, inputs):
  with methods.applied(adapt):
    return np.asarray(jax.jit(lambda p: module.apply({'params': p}, **inputs).logits)(params))


# ------------------------------------------------------------------------------------------------
# The acceptance test: a LoRA run of the trainer from a transformers GPT-2 folder.


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('peft_run')
  folder = gpt2_folder(root / 'gpt2')
  text = root / 'play.txt'
  text.write_text(''.join(f'KING {i}: speak of {i * 7 % 31}, and be gone.\n' for i in range(300)))
  c = base_config()
  c.total_steps, c.batch_size, c.log_every, c.eval_every, c.eval_steps = 6, 8, 1, 0, 1
  c.checkpoint_every = 0
  c.init.from_pretrained = folder
  c.data.task, c.data.text_file, c.data.tokenizer, c.data.seq_len = 'causal_lm', str(text), \
      'byte', 16
  c.optimizer.learning_rate = 3e-2
  c.adapt.method = 'lora'
  c.adapt.lora.rank, c.adapt.lora.alpha = RANK, ALPHA
  workdir = root / 'run'
  summary = train.train_and_evaluate(c, str(workdir))
  return folder, workdir, summary, c


def restored_state(workdir, step):
  path = (workdir / 'checkpoints' / str(step) / 'state').absolute()
  return ocp.PyTreeCheckpointer().restore(path)


def test_lora_run_adapter_loads_in_peft_with_the_merged_logits(lora_run):
  folder, workdir, summary, config = lora_run
  assert summary['exports'] == {'adapter': str(workdir / 'adapter'),
                                'merged': str(workdir / 'merged')}
  adapter_config = json.loads((workdir / 'adapter' / 'adapter_config.json').read_text())
  # Every field is one peft's LoraConfig knows; the fused c_attn holds q, k and v at rank 3r.
  assert set(adapter_config) <= {f.name for f in dataclasses.fields(peft.LoraConfig)}
  assert adapter_config['base_model_name_or_path'] == folder
  assert adapter_config['task_type'] == 'CAUSAL_LM' and adapter_config['fan_in_fan_out']
  assert adapter_config['target_modules'] == [
      f'transformer.h.{i}.{m}' for i in range(2)
      for m in ('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj')]
  assert adapter_config['rank_pattern'] == {f'transformer.h.{i}.attn.c_attn': 3 * RANK
                                            for i in range(2)}
  assert adapter_config['alpha_pattern'] == {f'transformer.h.{i}.attn.c_attn': 3 * ALPHA
                                             for i in range(2)}

  # Our adapted model: the checkpoint's trained LoRA leaves over the base checkpoint.
  state = restored_state(workdir, config.total_steps)
  lora_b = [v for k, v in adapt_rules.flatten(state['params']).items() if k.endswith('lora_b')]
  assert min(float(np.abs(b).max()) for b in lora_b) > 1e-2, 'the run did not move lora_b'
  module, variables = ptm_jax.from_pretrained(folder)
  params = adapt_rules.combine(state['params'], variables['params'])
  ids, mask = parity.token_batch(BYTE_VOCAB, length=13)
  inputs = {'input_ids': ids.astype(np.int32), 'attention_mask': mask.astype(np.int32)}
  expected = ours(module, params, config.adapt, inputs)

  base = transformers.GPT2LMHeadModel.from_pretrained(folder)
  base_logits = torch_logits(base, input_ids=ids, attention_mask=mask)
  with_adapter = torch_logits(peft_model(base, str(workdir / 'adapter')), input_ids=ids,
                              attention_mask=mask)
  merged = torch_logits(transformers.GPT2LMHeadModel.from_pretrained(workdir / 'merged'),
                        input_ids=ids, attention_mask=mask)
  real = mask.astype(bool)  # padded positions are not compared
  peft_vs_merged = parity.max_abs_diff(with_adapter[real], merged[real])
  peft_vs_ours = parity.max_abs_diff(with_adapter[real], expected[real])
  adapter_effect = parity.max_abs_diff(with_adapter[real], base_logits[real])
  print(f'GPT-2 LoRA run: peft vs merged {peft_vs_merged:.2e}, peft vs ours {peft_vs_ours:.2e}, '
        f'adapter vs base {adapter_effect:.3f}')
  assert peft_vs_merged <= 1e-5 and peft_vs_ours <= 1e-5
  assert adapter_effect > 1e-2, 'the adapter does not change the model: nothing was tested'


def test_lora_run_checkpoints_hold_the_adapter_not_the_backbone(lora_run):
  _, workdir, summary, config = lora_run
  state = restored_state(workdir, config.total_steps)
  params = adapt_rules.flatten(state['params'])
  assert params and all(p.rsplit('/', 1)[-1] in ('lora_a', 'lora_b') for p in params), \
      sorted(params)
  assert sum(v.size for v in params.values()) == summary['trainable_params']
  leaves = {jax.tree_util.keystr(path, simple=True, separator='/'): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(state)}
  assert not [p for p in leaves if p.endswith(('/kernel', '/bias', '/embedding', '/scale'))], \
      'a base weight (or its optimizer moments) is in the checkpoint'
  # The adapted params and AdamW's two moments of each, nothing else but counters and the rng.
  counters = [p for p in leaves if p in ('step', 'rng') or p.endswith('/count')]
  assert sum(np.size(v) for p, v in leaves.items() if p not in counters) == \
      3 * summary['trainable_params']


# ------------------------------------------------------------------------------------------------
# Other layouts, built directly (no trainer).


def bert_folder(path, seed=0):
  torch.manual_seed(seed)
  config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=37,
                                   max_position_embeddings=40, type_vocab_size=2, num_labels=3)
  parity.perturb(transformers.BertForSequenceClassification(config).eval(),
                 seed=seed).save_pretrained(path)
  return str(path)


@pytest.mark.parametrize('method,targets', [
    ('lora', r'attention/(query|key|value|out)$|mlp/(fc_in|fc_out)$|word_embeddings$'),
    ('dora', r'attention/(query|value)$|mlp/(fc_in|fc_out)$'),
])
def test_bert_adapter_and_head_load_in_peft(method, targets, tmp_path):
  folder = bert_folder(tmp_path / 'bert')
  module, variables = ptm_jax.from_pretrained(folder)
  ids, mask = parity.token_batch(99, length=12)
  types = (np.arange(12) >= 5).astype(np.int64)[None].repeat(3, 0)
  inputs = {'input_ids': ids.astype(np.int32), 'attention_mask': mask.astype(np.int32),
            'token_type_ids': types.astype(np.int32)}
  adapt = ml_collections.ConfigDict({'method': method, 'lora': {'rank': RANK, 'alpha': ALPHA,
                                                                'targets': targets}})
  params = adapted(module, variables['params'], adapt, inputs)
  # The trained head (trained by every method): the adapter carries it (modules_to_save).
  params['classifier'] = jax.tree.map(lambda x: x + 0.5, params['classifier'])
  expected = ours(module, params, adapt, inputs)
  peft_export.save_adapter(module, params, adapt, str(tmp_path / 'adapter'))
  peft_export.save_merged(module, params, adapt, str(tmp_path / 'merged'))

  adapter_config = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
  assert adapter_config['modules_to_save'] == ['classifier']
  assert adapter_config['use_dora'] == (method == 'dora') and not adapter_config['fan_in_fan_out']
  assert adapter_config['rank_pattern'] == {}  # separate q/k/v Linear layers: no fusion
  tensors = safetensors.numpy.load_file(tmp_path / 'adapter' / 'adapter_model.safetensors')
  key = 'base_model.model.bert.encoder.layer.1.attention.self.query'
  assert tensors[f'{key}.lora_A.weight'].shape == (RANK, 32)
  assert tensors[f'{key}.lora_B.weight'].shape == (32, RANK)
  assert (f'{key}.lora_magnitude_vector' in tensors) == (method == 'dora')

  torch_inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
  base = transformers.BertForSequenceClassification.from_pretrained(folder)
  base_logits = torch_logits(base, **torch_inputs)
  with_adapter = torch_logits(peft_model(base, str(tmp_path / 'adapter')), **torch_inputs)
  merged = torch_logits(transformers.BertForSequenceClassification.from_pretrained(
      tmp_path / 'merged'), **torch_inputs)
  peft_vs_ours = parity.max_abs_diff(with_adapter, expected)
  merged_vs_ours = parity.max_abs_diff(merged, expected)
  print(f'BERT {method}: peft vs ours {peft_vs_ours:.2e}, merged vs ours {merged_vs_ours:.2e}')
  assert peft_vs_ours <= 1e-5 and merged_vs_ours <= 1e-5
  assert parity.max_abs_diff(with_adapter, base_logits) > 1e-2


def test_gpt2_scanned_partly_fused_dora_rslora_and_qlora(tmp_path):
  """Only q and v of the fused c_attn adapted (a zero block in lora_B), scanned layers, rsLoRA
  scales kept by alpha_pattern, DoRA's magnitude for the unadapted k part; QLoRA exports LoRA's
  tensors."""
  folder = gpt2_folder(tmp_path / 'gpt2', vocab=101)
  module, variables = ptm_jax.from_pretrained(folder)
  scanned = module.clone(layer_stack=layers.LayerStack(scan=True))
  ids, mask = parity.token_batch(101, length=13)
  inputs = {'input_ids': ids.astype(np.int32), 'attention_mask': mask.astype(np.int32)}
  lora_keys = {'rank': RANK, 'alpha': ALPHA, 'rslora': True,
               'targets': r'attention/(query|value)$|mlp/fc_in$'}
  adapt = ml_collections.ConfigDict({'method': 'dora', 'lora': lora_keys})
  params = adapted(scanned, layers.stack_layers(variables['params']), adapt, inputs)
  assert 'layers' in params['transformer']
  expected = ours(scanned, params, adapt, inputs)
  peft_export.save_adapter(scanned, params, adapt, str(tmp_path / 'adapter'))

  adapter_config = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
  assert adapter_config['use_rslora'] and adapter_config['use_dora']
  assert adapter_config['rank_pattern'] == {f'transformer.h.{i}.attn.c_attn': 2 * RANK
                                            for i in range(2)}
  assert adapter_config['alpha_pattern'] == {
      f'transformer.h.{i}.attn.c_attn': pytest.approx(np.sqrt(2) * ALPHA) for i in range(2)}
  tensors = safetensors.numpy.load_file(tmp_path / 'adapter' / 'adapter_model.safetensors')
  b = tensors['base_model.model.transformer.h.1.attn.c_attn.lora_B.weight']  # (3D, 2r)
  assert b.shape == (96, 2 * RANK)
  assert not b[32:64].any() and b[:32, RANK:].sum() == 0 and b[64:, :RANK].sum() == 0
  assert b[:32, :RANK].any() and b[64:, RANK:].any()

  base = transformers.GPT2LMHeadModel.from_pretrained(folder)
  with_adapter = torch_logits(peft_model(base, str(tmp_path / 'adapter')), input_ids=ids,
                              attention_mask=mask)
  real = mask.astype(bool)
  peft_vs_ours = parity.max_abs_diff(with_adapter[real], expected[real])
  print(f'GPT-2 scanned DoRA + rsLoRA, q/v of c_attn: peft vs ours {peft_vs_ours:.2e}')
  assert peft_vs_ours <= 1e-5

  # QLoRA: the same A and B (over an NF4 base) export exactly as LoRA's.
  exports = {}
  for method in ('lora', 'qlora'):
    config = ml_collections.ConfigDict({'method': method, 'lora': lora_keys})
    flat = {k: v for k, v in adapt_rules.flatten(params).items()
            if not k.endswith('dora_magnitude')}
    tree = methods.prepare(adapt_rules.unflatten(flat), config)
    exports[method] = peft_export.adapter_tensors(scanned, tree, config)
  assert any(k.endswith('nf4_codes') for k in adapt_rules.flatten(tree))
  assert exports['qlora'][1] == exports['lora'][1]
  assert exports['qlora'][0].keys() == exports['lora'][0].keys()
  for k, v in exports['lora'][0].items():
    np.testing.assert_array_equal(exports['qlora'][0][k], v)


def test_vit_conv_lora_and_transformers_5_module_names(tmp_path):
  """A Conv2d LoRA (the patch embedding), ViT's modules as transformers 5 names them
  (layers.N.attention.q_proj, mlp.fc2), the classifier in modules_to_save."""
  torch.manual_seed(0)
  config = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=16,
                                  num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=20, num_labels=3)
  parity.perturb(transformers.ViTForImageClassification(config).eval()).save_pretrained(
      tmp_path / 'vit')
  module, variables = ptm_jax.from_pretrained(str(tmp_path / 'vit'))
  pixels = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  adapt = ml_collections.ConfigDict({'method': 'lora', 'lora': {
      'rank': 2, 'alpha': 3.0, 'targets': r'attention/(query|value)$|mlp/fc_out$|projection$'}})
  params = adapted(module, variables['params'], adapt, {'pixel_values': pixels})
  params['classifier'] = jax.tree.map(lambda x: x + 0.5, params['classifier'])
  expected = ours(module, params, adapt, {'pixel_values': pixels})
  peft_export.save_adapter(module, params, adapt, str(tmp_path / 'adapter'))
  peft_export.save_merged(module, params, adapt, str(tmp_path / 'merged'))
  adapter_config = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
  assert 'vit.layers.1.attention.q_proj' in adapter_config['target_modules']
  assert 'vit.embeddings.patch_embeddings.projection' in adapter_config['target_modules']

  nchw = torch.tensor(pixels.transpose(0, 3, 1, 2))
  base = transformers.ViTForImageClassification.from_pretrained(tmp_path / 'vit')
  model = peft_model(base, str(tmp_path / 'adapter'))
  assert sum(1 for n, _ in model.named_modules() if n.endswith('.lora_A')) == 7
  with torch.no_grad():
    with_adapter = model(pixel_values=nchw).logits.numpy()
    merged = transformers.ViTForImageClassification.from_pretrained(
        tmp_path / 'merged').eval()(pixel_values=nchw).logits.numpy()
  peft_vs_ours = parity.max_abs_diff(with_adapter, expected)
  merged_vs_ours = parity.max_abs_diff(merged, expected)
  print(f'ViT conv + q/v LoRA: peft vs ours {peft_vs_ours:.2e}, merged vs ours '
        f'{merged_vs_ours:.2e}')
  assert peft_vs_ours <= 1e-5 and merged_vs_ours <= 1e-5


def test_what_peft_cannot_hold_is_refused(tmp_path):
  folder = gpt2_folder(tmp_path / 'gpt2', vocab=101, layers_n=1)
  module, variables = ptm_jax.from_pretrained(folder)
  inputs = module.example_inputs()
  adapt = ml_collections.ConfigDict({'method': 'lora', 'rules': ((r'attention/query/bias$',
                                                                   'train'),)})
  params = adapted(module, variables['params'], adapt, inputs)
  with pytest.raises(ValueError, match='both a LoRA branch and base weights of '
                                       r'transformer\.h\.0\.attn\.c_attn'):
    peft_export.save_adapter(module, params, adapt, str(tmp_path / 'a'))
  with pytest.raises(ValueError, match='LoRA family'):
    peft_export.save_adapter(module, params, {'method': 'full'}, str(tmp_path / 'b'))
  no_bias = module.clone(config=dataclasses.replace(module.config, use_bias=False))
  assert 'use_bias' in peft_export.unsupported(no_bias)
  with pytest.raises(ValueError, match='use_bias'):
    peft_export.save_merged(no_bias, params, adapt, str(tmp_path / 'c'))


def test_exports_refuse_a_config_that_does_not_fit_the_parameters(tmp_path):
  """Another run's config.adapt is refused, not applied: at another rank the merge would scale
  the branches by the wrong alpha / r, and DoRA magnitudes, LoRA branches under a non-LoRA
  method, or Houlsby adapters would be left out of the checkpoint without a word."""
  folder = gpt2_folder(tmp_path / 'gpt2', vocab=101, layers_n=1)
  module, variables = ptm_jax.from_pretrained(folder)
  inputs = module.example_inputs()
  lora_keys = {'rank': RANK, 'alpha': ALPHA}
  lora_config = ml_collections.ConfigDict({'method': 'lora', 'lora': lora_keys})
  params = adapted(module, variables['params'], lora_config, inputs)
  default_rank = ml_collections.ConfigDict({'method': 'lora', 'lora': {'alpha': ALPHA}})  # r 8
  for save in (peft_export.save_adapter, peft_export.save_merged):
    with pytest.raises(ValueError, match=f'rank {RANK} but config.adapt.lora.rank is 8'):
      save(module, params, default_rank, str(tmp_path / 'out'))
  with pytest.raises(ValueError, match=r"no tensor in a gpt2 transformers checkpoint.*lora_a"
                                       r".*here 'full'"):
    peft_export.save_merged(module, params, {'method': 'full'}, str(tmp_path / 'out'))

  dora_config = ml_collections.ConfigDict({'method': 'dora', 'lora': lora_keys})
  dora_params = adapted(module, variables['params'], dora_config, inputs)
  for save in (peft_export.save_adapter, peft_export.save_merged):
    with pytest.raises(ValueError, match="'lora' but the parameters hold DoRA magnitudes"):
      save(module, dora_params, lora_config, str(tmp_path / 'out'))
    with pytest.raises(ValueError, match="'dora' but the parameters lack DoRA magnitudes"):
      save(module, params, dora_config, str(tmp_path / 'out'))

  houlsby = ml_collections.ConfigDict({'method': 'adapter', 'adapter': {'bottleneck': 4}})
  with methods.applied(houlsby):
    fresh = nn.unbox(module.init(jax.random.key(1), **inputs))['params']
  houlsby_params = adapt_rules.unflatten({**adapt_rules.flatten(fresh),
                                          **adapt_rules.flatten(variables['params'])})
  with pytest.raises(ValueError, match=r"adapter_down_kernel.*here 'adapter'"):
    peft_export.save_merged(module, houlsby_params, houlsby, str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()   # nothing written by a refused export
