"""Tokenizers for checkpoint folders, built on the `tokenizers` library (no transformers needed).

A folder with tokenizer.json is loaded as is. Otherwise the tokenizer is built from the vocabulary
files of one of three kinds:
  'bert'  WordPiece from vocab.txt: BERT normalisation (lowercasing and accent stripping per
          tokenizer_config.json), [CLS] A [SEP] (B [SEP]) with token type ids 0 (1 for B).
  'gpt2'  byte-level BPE from vocab.json + merges.txt: no special tokens added.
  'clip'  BPE from vocab.json + merges.txt with '</w>' ending each word: NFC, whitespace runs
          collapsed, lowercased, CLIP's word pattern, then bytes; <|startoftext|> A <|endoftext|>.
The kind comes from tokenizer_config.json's tokenizer_class, else config.json's model_type, else
from the files themselves.

Truncation and padding stored in tokenizer.json are ignored (as transformers does); they are set
from `max_length` and `padding` instead, on the sides that tokenizer_config.json's
truncation_side and padding_side name (right by default). `encode_batch` turns texts into the
int32 arrays that module.apply takes.
"""

import json
import os
from typing import Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

KINDS = ('bert', 'gpt2', 'clip')
_CLASS_KINDS = {
    'BertTokenizer': 'bert', 'BertTokenizerFast': 'bert',
    'GPT2Tokenizer': 'gpt2', 'GPT2TokenizerFast': 'gpt2',
    'CLIPTokenizer': 'clip', 'CLIPTokenizerFast': 'clip',
}
_MODEL_TYPE_KINDS = {'bert': 'bert', 'gpt2': 'gpt2', 'clip': 'clip', 'clip_text_model': 'clip'}
_FILES = {'bert': ('vocab.txt',), 'gpt2': ('vocab.json', 'merges.txt'),
          'clip': ('vocab.json', 'merges.txt')}
# transformers writes int(1e30) as model_max_length when a checkpoint sets none.
_NO_LIMIT = 10**6
# CLIP's word pattern: the two special tokens, English contractions, letter runs, single digits,
# runs of anything else that is not whitespace.
_CLIP_WORDS = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
               r"|[^\s\p{L}\p{N}]+")


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except ValueError as e:
    raise ValueError(f'{path} is not valid JSON ({e}).') from e


def _token_text(value) -> str | None:
  """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
  if isinstance(value, dict):
    return value.get('content')
  return value


def _settings(folder: str) -> dict:
  """tokenizer_config.json with special_tokens_map.json's entries filling the gaps."""
  settings = dict(_read_json(os.path.join(folder, 'special_tokens_map.json')))
  settings.update(_read_json(os.path.join(folder, 'tokenizer_config.json')))
  return settings


def _kind(folder: str, settings: dict) -> str:
  cls = settings.get('tokenizer_class')
  if cls is not None:
    if cls not in _CLASS_KINDS:
      raise ValueError(f'{folder}: tokenizer_class {cls!r} in tokenizer_config.json is not one '
                       f'ptm_jax builds from vocabulary files (it knows {sorted(_CLASS_KINDS)}). '
                       f'Add a tokenizer.json, or pass kind= one of {KINDS}.')
    return _CLASS_KINDS[cls]
  model_type = _read_json(os.path.join(folder, 'config.json')).get('model_type')
  if model_type is not None:
    if model_type not in _MODEL_TYPE_KINDS:
      raise ValueError(f'{folder}: model_type {model_type!r} in config.json has no tokenizer '
                       f'ptm_jax builds from vocabulary files (it knows '
                       f'{sorted(_MODEL_TYPE_KINDS)}). Add a tokenizer.json, or pass kind= one '
                       f'of {KINDS}.')
    return _MODEL_TYPE_KINDS[model_type]
  if os.path.exists(os.path.join(folder, 'vocab.txt')):
    return 'bert'
  # CLIP's vocabulary marks word ends with '</w>'; GPT-2's has no such tokens.
  vocab = _read_json(os.path.join(folder, 'vocab.json'))
  return 'clip' if any(t.endswith('</w>') for t in vocab) else 'gpt2'


def _special(settings: dict, name: str, default: str | None) -> str | None:
  return _token_text(settings[name]) if name in settings else default


def _add_special_tokens(tok: tokenizers.Tokenizer, settings: dict, names: Sequence[str | None],
                        folder: str):
  """Special tokens are matched whole in the text, before normalisation.

  tokenizer_config.json's added_tokens_decoder ({id: token}) is added in id order, so tokens
  beyond the vocabulary get the ids it names.
  """
  tok.add_special_tokens(sorted({n for n in names if n is not None}))
  entries = (settings.get('added_tokens_decoder') or {}).items()
  for token_id, entry in sorted(entries, key=lambda kv: int(kv[0])):
    content = _token_text(entry)
    if content is None:
      continue
    added = tokenizers.AddedToken(
        content, single_word=entry.get('single_word', False), lstrip=entry.get('lstrip', False),
        rstrip=entry.get('rstrip', False), normalized=entry.get('normalized', True),
        special=entry.get('special', False))
    if added.special:
      tok.add_special_tokens([added])
    else:
      tok.add_tokens([added])
    if tok.token_to_id(content) != int(token_id):
      raise ValueError(f'{folder}: tokenizer_config.json gives {content!r} id {token_id} but the '
                       f'vocabulary gives it {tok.token_to_id(content)}.')


def _token_id(tok: tokenizers.Tokenizer, token: str, folder: str, what: str) -> int:
  token_id = tok.token_to_id(token)
  if token_id is None:
    raise ValueError(f'{folder}: the {what} token {token!r} is not in the vocabulary.')
  return token_id


def _bert(folder: str, settings: dict) -> tokenizers.Tokenizer:
  unk = _special(settings, 'unk_token', '[UNK]')
  cls, sep = _special(settings, 'cls_token', '[CLS]'), _special(settings, 'sep_token', '[SEP]')
  vocab = {}
  with open(os.path.join(folder, 'vocab.txt'), encoding='utf-8') as f:
    for i, line in enumerate(f):  # One token per line; the line number is its id.
      vocab[line.rstrip('\n')] = i
  tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=unk))
  lowercase = settings.get('do_lower_case', True)
  tok.normalizer = normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=settings.get('tokenize_chinese_chars', True),
      strip_accents=settings.get('strip_accents'), lowercase=lowercase)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix='##')
  _add_special_tokens(tok, settings, [unk, cls, sep, _special(settings, 'pad_token', '[PAD]'),
                                      _special(settings, 'mask_token', '[MASK]')], folder)
  ids = [(cls, _token_id(tok, cls, folder, 'cls')), (sep, _token_id(tok, sep, folder, 'sep'))]
  tok.post_processor = processors.TemplateProcessing(
      single=f'{cls}:0 $A:0 {sep}:0', pair=f'{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1',
      special_tokens=ids)
  return tok


def _read_merges(path: str) -> list[tuple[str, str]]:
  merges = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      line = line.rstrip('\r\n')
      if not line or line.startswith('#version'):
        continue
      parts = line.split(' ')
      if len(parts) != 2:
        raise ValueError(f'{path}: merge line {line!r} is not two space-separated symbols.')
      merges.append((parts[0], parts[1]))
  return merges


def _bpe_files(folder: str):
  vocab = _read_json(os.path.join(folder, 'vocab.json'))
  return vocab, _read_merges(os.path.join(folder, 'merges.txt'))


def _gpt2(folder: str, settings: dict) -> tokenizers.Tokenizer:
  vocab, merges = _bpe_files(folder)
  tok = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
  prefix_space = settings.get('add_prefix_space', False)
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
  tok.decoder = decoders.ByteLevel()
  bos = _special(settings, 'bos_token', '<|endoftext|>')
  eos = _special(settings, 'eos_token', '<|endoftext|>')
  _add_special_tokens(tok, settings, [bos, eos, _special(settings, 'unk_token', '<|endoftext|>'),
                                      _special(settings, 'pad_token', None)], folder)
  if settings.get('add_bos_token', False):
    bos_id = _token_id(tok, bos, folder, 'bos')
    tok.post_processor = processors.TemplateProcessing(
        single=f'{bos}:0 $A:0', pair=f'{bos}:0 $A:0 {bos}:1 $B:1', special_tokens=[(bos, bos_id)])
  else:
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  return tok


def _clip(folder: str, settings: dict) -> tokenizers.Tokenizer:
  vocab, merges = _bpe_files(folder)
  unk = _special(settings, 'unk_token', '<|endoftext|>')
  tok = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token=unk, end_of_word_suffix='</w>',
                                        continuing_subword_prefix='', fuse_unk=False))
  tok.normalizer = normalizers.Sequence([
      normalizers.NFC(), normalizers.Replace(tokenizers.Regex(r'\s+'), ' '),
      normalizers.Lowercase()])
  # Whatever the word pattern does not match (whitespace) is dropped; words are then bytes.
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(_CLIP_WORDS), behavior='removed', invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  _decode_word_ends(tok)
  bos = _special(settings, 'bos_token', '<|startoftext|>')
  eos = _special(settings, 'eos_token', '<|endoftext|>')
  _add_special_tokens(tok, settings, [bos, eos, unk, _special(settings, 'pad_token', eos)], folder)
  ids = [(bos, _token_id(tok, bos, folder, 'bos')), (eos, _token_id(tok, eos, folder, 'eos'))]
  tok.post_processor = processors.TemplateProcessing(
      single=f'{bos} $A {eos}', pair=f'{bos} $A {eos} {eos} $B {eos}', special_tokens=ids)
  return tok


def _decode_word_ends(tok: tokenizers.Tokenizer):
  """Decoding turns CLIP's '</w>' word ends into spaces, but none after the last word, as
  transformers' CLIPTokenizer does to its decoded text (a ByteLevel decoder alone keeps them:
  'a</w>photo</w>')."""
  suffix = getattr(tok.model, 'end_of_word_suffix', None)
  if not suffix:
    return
  if tok.decoder is None:
    tok.decoder = decoders.BPEDecoder(suffix)
  elif isinstance(tok.decoder, decoders.ByteLevel):
    # BPEDecoder writes the spaces; the byte-level alphabet spells a space 'Ġ' (U+0120), so
    # they are respelled before the bytes are decoded. (A Strip decoder after ByteLevel would
    # drop the trailing space, but panics on an empty text.)
    tok.decoder = decoders.Sequence([decoders.BPEDecoder(suffix), decoders.Replace(' ', '\u0120'),
                                     tok.decoder])


_BUILDERS = {'bert': _bert, 'gpt2': _gpt2, 'clip': _clip}
_PAD_DEFAULTS = {'bert': '[PAD]', 'gpt2': None, 'clip': '<|endoftext|>'}


def _default_max_length(folder: str, settings: dict) -> int | None:
  """sentence_bert_config.json's max_seq_length, else tokenizer_config.json's model_max_length."""
  length = _sentence_transformers_config(folder).get('max_seq_length')
  if length is None:
    length = settings.get('model_max_length')
  return int(length) if length is not None and length < _NO_LIMIT else None


def _sentence_transformers_config(folder: str) -> dict:
  return _read_json(os.path.join(folder, 'sentence_bert_config.json'))


def _pad_token(tok: tokenizers.Tokenizer, settings: dict, kind: str | None) -> str | None:
  """The pad token; GPT-2 has none, so its end-of-text token pads (the mask hides it)."""
  pad = _token_text(settings.get('pad_token'))
  if pad is None and kind is not None:
    pad = _PAD_DEFAULTS[kind]
  for candidate in (pad, '[PAD]', '<pad>', _token_text(settings.get('eos_token')),
                    '<|endoftext|>'):
    if candidate is not None and tok.token_to_id(candidate) is not None:
      return candidate
  return None


def load_tokenizer(path: str, max_length: int | None = None, padding: bool | str = True, *,
                   kind: str | None = None, revision: str | None = None) -> tokenizers.Tokenizer:
  """A `tokenizers.Tokenizer` for a checkpoint folder (or hub id).

  A sentence_bert_config.json whose do_lower_case is true lowercases every text first, as
  sentence-transformers does (a special token written in a text, '[MASK]', stays special).

  Args:
    path: a folder with tokenizer.json, or with vocab.txt (BERT) or vocab.json + merges.txt
      (GPT-2, CLIP) and optionally tokenizer_config.json / special_tokens_map.json; or a hub id.
    max_length: truncate to this many tokens, special tokens included, on
      tokenizer_config.json's truncation_side (right). None takes sentence_bert_config.json's
      max_seq_length, else tokenizer_config.json's model_max_length, else no truncation.
    padding: True or 'longest' pads each batch to its longest member; 'max_length' pads to
      max_length; False pads nothing. The side is tokenizer_config.json's padding_side (right).
    kind: build from vocabulary files as this kind (one of KINDS) whatever the configs say.
    revision: hub revision, for a hub id.
  """
  from ptm_jax.hub import pretrained  # Imported here: it pulls in jax and flax.
  folder = pretrained.resolve(path, revision)
  if not os.path.isdir(folder):
    raise NotADirectoryError(f'{folder} is not a folder; load_tokenizer needs a checkpoint folder.')
  if kind is not None and kind not in KINDS:
    raise ValueError(f'Unknown tokenizer kind {kind!r}; choose one of {KINDS}.')
  if padding not in (True, False, 'longest', 'max_length'):
    raise ValueError(f"padding must be True, False, 'longest' or 'max_length', not {padding!r}.")
  settings = _settings(folder)

  tokenizer_json = os.path.join(folder, 'tokenizer.json')
  if kind is None and os.path.exists(tokenizer_json):
    tok = tokenizers.Tokenizer.from_file(tokenizer_json)
    if _CLASS_KINDS.get(settings.get('tokenizer_class')) == 'clip':
      _decode_word_ends(tok)  # CLIP's tokenizer.json has a ByteLevel decoder only
  else:
    has = lambda k: all(os.path.exists(os.path.join(folder, f)) for f in _FILES[k])
    if kind is None and not (has('bert') or has('gpt2')):
      raise FileNotFoundError(
          f'{folder} has no tokenizer files: looked for tokenizer.json, vocab.txt (BERT), and '
          'vocab.json + merges.txt (GPT-2, CLIP). Pass the folder the tokenizer was saved in.')
    kind = kind or _kind(folder, settings)
    if not has(kind):
      raise FileNotFoundError(f'{folder} is a {kind} tokenizer but lacks '
                              f'{" + ".join(_FILES[kind])}.')
    tok = _BUILDERS[kind](folder, settings)

  if _sentence_transformers_config(folder).get('do_lower_case'):
    # sentence-transformers lowercases the texts before its tokenizer sees them.
    steps = [] if tok.normalizer is None else [tok.normalizer]
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase()] + steps)
  tok.no_truncation()
  tok.no_padding()
  if max_length is None:
    max_length = _default_max_length(folder, settings)
  if max_length is not None:
    _check_max_length(tok, max_length)
    tok.enable_truncation(max_length, direction=_side(settings, 'truncation_side', folder))
  if padding == 'max_length' and max_length is None:
    raise ValueError(f"padding='max_length' needs max_length: {folder} sets no length.")
  if padding:
    pad = _pad_token(tok, settings, kind)
    if pad is None:
      raise ValueError(f'{folder}: no pad token found in the vocabulary; set pad_token in '
                       'tokenizer_config.json or pass padding=False.')
    tok.enable_padding(direction=_side(settings, 'padding_side', folder),
                       pad_id=tok.token_to_id(pad), pad_token=pad,
                       length=max_length if padding == 'max_length' else None)
  return tok


def _side(settings: dict, key: str, folder: str) -> str:
  """tokenizer_config.json's padding_side or truncation_side: 'right' (the default) or 'left'."""
  side = settings.get(key) or 'right'
  if side not in ('right', 'left'):
    raise ValueError(f"{folder}: {key} {side!r} in tokenizer_config.json is not 'right' or "
                     "'left'.")
  return side


def _check_max_length(tok: tokenizers.Tokenizer, max_length: int, pair: bool = False):
  """max_length must leave room for one token of each text beside the special tokens: below
  the special tokens' count the `tokenizers` library silently truncates nothing at all."""
  special = tok.num_special_tokens_to_add(pair)
  least = special + (2 if pair else 1)
  if max_length < least:
    texts = 'each text of a pair' if pair else 'the text'
    beside = f' beside the {special} special tokens' if special else ''
    raise ValueError(f'max_length must be at least {least} (one token for {texts}{beside}), '
                     f'not {max_length}.')


def encode_batch(tokenizer: tokenizers.Tokenizer, texts: Sequence[str | tuple[str, str]],
                 max_length: int | None = None, *,
                 pad_to_multiple_of: int | None = None) -> dict[str, np.ndarray]:
  """Texts (or (text, text) pairs) -> int32 (B, T) arrays for module.apply.

  Returns {'input_ids', 'attention_mask', 'token_type_ids'}, each (B, T), T the longest encoding
  rounded up to `pad_to_multiple_of` (fixed lengths mean fewer jit recompiles). `max_length`
  truncates for this call only (on the tokenizer's truncation side). Padding uses the
  tokenizer's pad token, else id 0; the attention mask is 0 there either way. Only BERT takes
  token_type_ids: GPT-2 and CLIP take input_ids and attention_mask (drop the third key).
  """
  if isinstance(texts, str):
    raise TypeError('encode_batch takes a list of texts; wrap a single text in a list.')
  texts = list(texts)
  truncation = tokenizer.truncation
  length = max_length if max_length is not None else (truncation or {}).get('max_length')
  if length is not None:
    _check_max_length(tokenizer, length, pair=any(not isinstance(t, str) for t in texts))
  if max_length is not None:
    # Only the length changes: the side and strategy stay the tokenizer's.
    tokenizer.enable_truncation(**{**(truncation or {}), 'max_length': max_length})
  try:
    encodings = tokenizer.encode_batch(texts)
  finally:
    if max_length is not None:
      if truncation is None:
        tokenizer.no_truncation()
      else:
        tokenizer.enable_truncation(**truncation)
  padding = tokenizer.padding or {}
  t = max((len(e.ids) for e in encodings), default=0)
  if pad_to_multiple_of:
    t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
  out = {'input_ids': np.full((len(encodings), t), padding.get('pad_id', 0), np.int32),
         'attention_mask': np.zeros((len(encodings), t), np.int32),
         'token_type_ids': np.full((len(encodings), t), padding.get('pad_type_id', 0), np.int32)}
  left = padding.get('direction') == 'left'
  for i, e in enumerate(encodings):
    n = len(e.ids)
    span = slice(t - n, t) if left else slice(0, n)
    out['input_ids'][i, span] = e.ids
    out['attention_mask'][i, span] = e.attention_mask
    out['token_type_ids'][i, span] = e.type_ids
  return out

