"""ResNet: parity with transformers (both layer types, both heads, both directions, eval and train
mode) and loading torchvision-format state dicts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import ptm_jax
from ptm_jax.hub import resnet as resnet_hub
from ptm_jax.models import resnet
from tests import parity

HEADS = {None: transformers.ResNetModel,
         'classification': transformers.ResNetForImageClassification}

# Small and deliberately non-default: odd widths, 7 labels. 'bottleneck_v1' moves the stride to
# the first 1x1, downsamples in stage 0, has 4 input channels and a GELU after each residual sum
# (the inner activations stay ReLU in transformers).
CONFIGS = {
    'basic': dict(embedding_size=16, hidden_sizes=[16, 24, 32, 40], depths=[1, 2, 1, 1],
                  layer_type='basic'),
    'bottleneck': dict(embedding_size=16, hidden_sizes=[32, 48, 64, 80], depths=[1, 1, 2, 1],
                       layer_type='bottleneck'),
    'bottleneck_v1': dict(num_channels=4, embedding_size=12, hidden_sizes=[32, 48, 64],
                          depths=[2, 1, 1], layer_type='bottleneck', hidden_act='gelu',
                          downsample_in_first_stage=True, downsample_in_bottleneck=True),
}


def hf_config(name):
  return transformers.ResNetConfig(num_labels=7, **CONFIGS[name])


def images(num_channels=3, batch=2, size=45, seed=0):
  """NCHW for torch and the same images NHWC for us; 45 is odd, so every padding matters."""
  nchw = np.random.default_rng(seed).normal(size=(batch, num_channels, size, size))
  nchw = nchw.astype(np.float32)
  return nchw, nchw.transpose(0, 2, 3, 1)


def nhwc(t):
  return t.detach().permute(0, 2, 3, 1).numpy()


def close(ours, theirs):
  """The acceptance bound: max abs difference <= 1e-4 (BatchNorm statistics are calibrated, so
  the outputs are O(1); see parity.calibrate_batch_norm)."""
  return parity.max_abs_diff(ours, theirs) <= 1e-4


def compare(ours, theirs, head):
  if head is None:
    assert close(ours.last_hidden_state, nhwc(theirs.last_hidden_state))
    # transformers pools to (B, C, 1, 1); ours is (B, C).
    assert close(ours.pooler_output, theirs.pooler_output[:, :, 0, 0])
  else:
    assert close(ours.logits, theirs.logits)


@pytest.mark.parametrize('name', list(CONFIGS))
@pytest.mark.parametrize('head', list(HEADS), ids=str)
def test_parity_both_directions(name, head, tmp_path):
  torch.manual_seed(0)
  reference = parity.perturb(HEADS[head](hf_config(name)).eval())
  x_nchw, x_nhwc = images(reference.config.num_channels)
  parity.calibrate_batch_norm(reference, torch.tensor(images(reference.config.num_channels,
                                                             batch=4, seed=9)[0]))
  reference.save_pretrained(tmp_path / 'hf')
  with torch.no_grad():
    expected = reference(torch.tensor(x_nchw))

  module, variables = ptm_jax.from_pretrained(str(tmp_path / 'hf'))
  assert module.head == head
  assert module.config.hidden_sizes == tuple(CONFIGS[name]['hidden_sizes'])
  assert set(variables) == {'params', 'batch_stats'}
  assert ('classifier' in variables['params']) == (head is not None)
  compare(module.apply(variables, pixel_values=x_nhwc), expected, head)

  ptm_jax.save_pretrained(module, variables, str(tmp_path / 'ours'))
  reloaded = HEADS[head].from_pretrained(tmp_path / 'ours').eval()
  parity.assert_same_weights(reloaded, reference)  # every parameter and BatchNorm buffer
  with torch.no_grad():
    again = reloaded(torch.tensor(x_nchw))
  compare(module.apply(variables, pixel_values=x_nhwc), again, head)


@pytest.mark.parametrize('name', ['basic', 'bottleneck_v1'])
def test_train_step_matches_torch_batch_norm(name, tmp_path):
  """train=True normalises with batch statistics and updates the running ones as torch does."""
  torch.manual_seed(1)
  reference = parity.perturb(transformers.ResNetForImageClassification(hf_config(name)), seed=1)
  reference.save_pretrained(tmp_path / 'hf')
  module, variables = ptm_jax.from_pretrained(str(tmp_path / 'hf'))
  x_nchw, x_nhwc = images(reference.config.num_channels, batch=3, size=40, seed=1)
  reference.train()
  with torch.no_grad():
    expected = reference(torch.tensor(x_nchw)).logits

  with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]"):
    module.apply(variables, pixel_values=x_nhwc, train=True)
  out, updates = module.apply(variables, pixel_values=x_nhwc, train=True,
                              mutable=['batch_stats'])
  assert close(out.logits, expected)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables['batch_stats'],
                         updates['batch_stats'])
  assert all(jax.tree.leaves(changed))

  # The updated running statistics, written out, are torch's after its training step.
  ptm_jax.save_pretrained(module, {**variables, **updates}, str(tmp_path / 'ours'))
  reloaded = transformers.ResNetForImageClassification.from_pretrained(tmp_path / 'ours')
  ours_state = reloaded.state_dict()
  for key, value in reference.state_dict().items():
    if key.endswith(('running_mean', 'running_var')):
      assert close(ours_state[key].numpy(), value), key


# A ResNet with torchvision's module names (written here: there is no CPU torchvision wheel).
class TorchvisionBlock(torch.nn.Module):

  def __init__(self, kind, inplanes, planes, stride):
    super().__init__()
    conv = lambda i, o, k, s=1: torch.nn.Conv2d(i, o, k, s, padding=k // 2, bias=False)
    self.kind = kind
    out = planes if kind == 'basic' else 4 * planes
    if kind == 'basic':
      self.conv1, self.conv2 = conv(inplanes, planes, 3, stride), conv(planes, planes, 3)
    else:  # v1.5: the stride is on the 3x3.
      self.conv1, self.conv2 = conv(inplanes, planes, 1), conv(planes, planes, 3, stride)
      self.conv3, self.bn3 = conv(planes, out, 1), torch.nn.BatchNorm2d(out)
    self.bn1, self.bn2 = torch.nn.BatchNorm2d(planes), torch.nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or inplanes != out:
      self.downsample = torch.nn.Sequential(conv(inplanes, out, 1, stride),
                                            torch.nn.BatchNorm2d(out))

  def forward(self, x):
    relu = torch.nn.functional.relu
    h = relu(self.bn1(self.conv1(x)))
    h = self.bn2(self.conv2(h))
    if self.kind != 'basic':
      h = self.bn3(self.conv3(relu(h)))
    return relu(h + (x if self.downsample is None else self.downsample(x)))


class TorchvisionResNet(torch.nn.Module):

  def __init__(self, kind, planes, depths, stem=16, num_classes=7):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(3, stem, 7, 2, padding=3, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(stem)
    self.maxpool = torch.nn.MaxPool2d(3, 2, padding=1)
    inplanes = stem
    for s, (p, depth) in enumerate(zip(planes, depths)):
      blocks = []
      for b in range(depth):
        blocks.append(TorchvisionBlock(kind, inplanes, p, 2 if s and not b else 1))
        inplanes = p if kind == 'basic' else 4 * p
      setattr(self, f'layer{s + 1}', torch.nn.Sequential(*blocks))
    self.num_stages = len(planes)
    self.fc = torch.nn.Linear(inplanes, num_classes)

  def features(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    for s in range(self.num_stages):
      x = getattr(self, f'layer{s + 1}')(x)
    return x.mean((2, 3))

  def forward(self, x):
    return self.fc(self.features(x))


@pytest.mark.parametrize('kind,planes,depths', [('basic', (16, 24, 32, 40), (1, 2, 1, 1)),
                                                ('bottleneck', (8, 12, 16, 20), (1, 1, 2, 1))])
def test_from_torchvision(kind, planes, depths, tmp_path):
  torch.manual_seed(2)
  reference = parity.perturb(TorchvisionResNet(kind, planes, depths).eval(), seed=2)
  parity.calibrate_batch_norm(reference, torch.tensor(images(batch=4, seed=9)[0]))
  state = reference.state_dict()
  torch.save(state, tmp_path / 'resnet.pth')
  safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()},
                              tmp_path / 'resnet.safetensors')
  # A DistributedDataParallel-style 'module.' prefix is unwrapped.
  safetensors.torch.save_file({f'module.{k}': v.contiguous() for k, v in state.items()},
                              tmp_path / 'ddp.safetensors')
  config = resnet.ResNetConfig(
      embedding_size=16, hidden_sizes=tuple(p * (1 if kind == 'basic' else 4) for p in planes),
      depths=depths, layer_type=kind, num_labels=7)
  x_nchw, x_nhwc = images(seed=2)
  with torch.no_grad():
    expected_logits = reference(torch.tensor(x_nchw))
    expected_features = reference.features(torch.tensor(x_nchw))

  with pytest.raises(ptm_jax.CheckpointError, match='pickle checkpoint.*allow_pickle=True'):
    resnet_hub.from_torchvision(str(tmp_path / 'resnet.pth'), config)
  for file, kwargs in [('resnet.pth', {'allow_pickle': True}), ('resnet.safetensors', {}),
                       ('ddp.safetensors', {})]:
    module, variables = resnet_hub.from_torchvision(str(tmp_path / file), config, **kwargs)
    out = module.apply(variables, pixel_values=x_nhwc)
    assert close(out.logits, expected_logits), file

  module, variables = resnet_hub.from_torchvision(str(tmp_path / 'resnet.safetensors'), config,
                                                  head=None)
  assert 'classifier' not in variables['params']
  out = module.apply(variables, pixel_values=x_nhwc)
  assert close(out.pooler_output, expected_features)


def test_from_torchvision_preset_takes_num_labels_from_fc(tmp_path):
  torch.manual_seed(3)
  reference = parity.perturb(
      TorchvisionResNet('basic', (64, 128, 256, 512), (2, 2, 2, 2), stem=64, num_classes=5).eval(),
      seed=3)
  parity.calibrate_batch_norm(reference, torch.tensor(images(batch=4, size=33, seed=9)[0]))
  safetensors.torch.save_file(reference.state_dict(), tmp_path / 'resnet18.safetensors')
  module, variables = resnet_hub.from_torchvision(str(tmp_path / 'resnet18.safetensors'),
                                                  'resnet18')
  assert module.config.num_labels == 5
  x_nchw, x_nhwc = images(batch=1, size=33, seed=3)
  with torch.no_grad():
    expected = reference(torch.tensor(x_nchw))
  assert close(module.apply(variables, pixel_values=x_nhwc).logits, expected)
  # A checkpoint of another depth does not fit the preset.
  with pytest.raises(ptm_jax.CheckpointError, match='missing'):
    resnet_hub.from_torchvision(str(tmp_path / 'resnet18.safetensors'), 'resnet34')


def test_bad_inputs():
  config = resnet.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                               layer_type='basic', num_labels=3)
  assert config.hidden_sizes == (8, 16) and hash(config)
  module = resnet.ResNet(config, head='classification')
  out, _ = jax.eval_shape(lambda rng: module.init_with_output(
      rng, **module.example_inputs(batch_size=2)), jax.random.key(0))
  assert out.logits.shape == (2, 3) and out.last_hidden_state.shape == (2, 8, 8, 16)
  with pytest.raises(ValueError, match=r'NHWC.*transpose'):
    module.init(jax.random.key(0), pixel_values=np.zeros((1, 3, 32, 32), np.float32))
  with pytest.raises(ValueError, match='dtype uint8.*NORMALIZATION'):
    module.init(jax.random.key(0), pixel_values=np.zeros((1, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match='layer_type'):
    resnet.ResNetConfig(layer_type='wide')
  with pytest.raises(ValueError, match='same'):
    resnet.ResNetConfig(hidden_sizes=(8, 16), depths=(1,))
  with pytest.raises(ValueError, match='Unknown ResNet preset'):
    resnet_hub.from_torchvision('x.safetensors', 'resnet19')


def test_batch_norm_gradients_equal_those_of_the_plain_formula():
  # Training-mode BatchNorm has a hand-written backward pass (its sums over the rows are dots):
  # it must give autodiff's gradients of the textbook formula, mean and variance outputs included.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(1.0, 3.0, (4, 5, 5, 6)), jnp.float32)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, 6), jnp.float32)
  bias = jnp.asarray(rng.normal(size=6), jnp.float32)

  def rows(normalize):  # (N, H, W, C) images as the (N*H*W, C) rows BatchNorm normalises
    def apply(x, scale, bias):
      y, mean, var = normalize(x.reshape(-1, 6), scale, bias, 1e-5)
      return y.reshape(x.shape), mean, var
    return apply

  # The plain formula, which other platforms run and autodiff differentiates.
  plain, ours = rows(resnet._normalize_with_reductions), rows(resnet._normalize_with_dots)

  weights = [jnp.asarray(rng.normal(size=o.shape), jnp.float32) for o in plain(x, scale, bias)]
  loss = lambda f: lambda *a: sum(jnp.sum(o * w) for o, w in zip(f(*a), weights))
  with jax.default_matmul_precision('highest'):
    for got, want in zip(ours(x, scale, bias), plain(x, scale, bias)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.grad(loss(ours), (0, 1, 2))(x, scale, bias),
                         jax.grad(loss(plain), (0, 1, 2))(x, scale, bias)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['basic', 'bottleneck'])
def test_zero_init_residual_starts_every_block_at_its_shortcut(name):
  """Goyal et al.'s init: each block's last BatchNorm scale is 0 (the others 1), so at init an
  identity block (no projection) maps x to act(x), in train and in eval mode."""
  config = resnet.ResNetConfig(num_labels=3, **CONFIGS[name])
  last = 'conv_1' if name == 'basic' else 'conv_2'
  _, x = images()
  for zero in (False, True):
    module = resnet.ResNet(config, head='classification', zero_init_residual=zero)
    params = nn.unbox(module.init(jax.random.key(0), pixel_values=x))['params']['resnet']
    blocks = {k: v for k, v in params.items() if k.startswith('stage_')}
    assert len(blocks) == sum(config.depths)
    for block in blocks.values():
      for conv, conv_params in block.items():
        want = 0.0 if zero and conv == last else 1.0
        np.testing.assert_array_equal(conv_params['norm']['scale'], want)

  spec = next(s for s in resnet.block_specs(config) if not s[-1])  # a block without projection
  _, _, channels, features, stride, _ = spec
  block = resnet.ResidualBlock(config, features, stride, False, zero_init_residual=True)
  h = np.random.default_rng(1).normal(size=(2, 9, 9, channels)).astype(np.float32)
  variables = nn.unbox(block.init(jax.random.key(1), h))
  np.testing.assert_array_equal(block.apply(variables, h), np.maximum(h, 0))
  out, _ = block.apply(variables, h, train=True, mutable=['batch_stats'])
  np.testing.assert_array_equal(out, np.maximum(h, 0))


def test_zero_init_residual_from_the_config():
  """config.model.zero_init_residual reaches the module (the ImageNet recipe sets it) and is
  refused for a family without residual blocks to start at the identity."""
  from ptm_jax.data import pipeline
  from ptm_jax.models import registry
  from ptm_jax.train.config import base_config
  config = base_config()
  config.model.name = 'resnet50'
  config.model.zero_init_residual = True
  info = pipeline.DatasetInfo('image_classification', 'train', 4, num_classes=2)
  module, _ = registry.build_model(config.model, 'image_classification', info, config.data)
  assert module.zero_init_residual and module.config.num_labels == 2
  config.model.name = 'vit-ti/16'
  with pytest.raises(ValueError, match='zero_init_residual.*vit'):
    registry.build_model(config.model, 'image_classification', info, config.data)
