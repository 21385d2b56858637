"""Tokenizers built from vocabulary files give the ids of transformers' tokenizers, and of small
reference implementations of the original algorithms written here."""

import collections
import json
import unicodedata

import numpy as np
import pytest
import regex
import transformers
from transformers.models.bert import tokenization_bert_legacy

import ptm_jax
from ptm_jax.hub import tokenizers as tk

SENTENCES = [
    'Hello, world!',
    "It's a dog's life; isn't it? We'll see, they've said, I'm sure you'd agree.",
    'The  quick   brown fox\tjumps\nover the lazy dog.',
    'Café naïve résumé, déjà vu at the Crème Brûlée façade.',
    'ÀÉÎÕÜ Çà Ñandú ØRESUND straße',
    'Unicode: 你好，世界！ 日本語のテキスト and 한국어 text.',
    'emoji 🙂👍🏽 and symbols ©®™ ∑∫√ ≠ ±',
    'numbers 1234567 3.14159 1,000,000 and the 42nd 2024-06-01',
    'MixedCASE WoRdS and ALLCAPS and camelCaseWords',
    'x',
    '',
    '   leading and trailing spaces   ',
    'hyphen-ated words & under_scores / slashes \\ back|pipes',
    'quotes “curly” ‘single’ «guillemets» and "straight" \'ones\'',
    'Ελληνικά κείμενα και русский текст',
    'ﬁ ligature, ＦＵＬＬＷＩＤＴＨ letters, \u00c5 vs A\u030a (composed vs decomposed)',
    'a' * 60 + ' supercalifragilisticexpialidocious',
    "won't they've we'll I'm you'd it's ''s '''",
    'control\x07char, zero\u200bwidth, nbsp\u00a0space',
    '[MASK] is a special token, so is <|endoftext|> elsewhere',
]
CORPUS = SENTENCES + [
    'the quick brown fox jumps over the lazy dog while the dogs and foxes sleep in the sun',
    'tokenizers split words into pieces; the pieces are learned from a corpus of text',
    'this is a test of the emergency broadcast system, this is only a test, testing testing',
    'Hello there, general Kenobi. Hello again, world. Worldwide words of the world.',
    'Numbers like 12, 123 and 1234 are common; so are dates like 2024 and 1999.',
] * 3


# ------------------------------------------------------------------------------------------------
# Reference implementations of the original algorithms (BPE on bytes, merge by rank).

def byte_chars() -> dict[int, str]:
  """Each byte -> a printable character: printable Latin-1 bytes are themselves, the rest are
  numbered upwards from chr(256) in byte order (GPT-2's mapping)."""
  keep = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
          + list(range(ord('®'), ord('ÿ') + 1)))
  out, extra = {}, 0
  for b in range(256):
    if b in keep:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + extra)
      extra += 1
  return out


BYTE_CHARS = byte_chars()
GPT2_WORDS = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
CLIP_WORDS = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+"
                           r"|[\p{N}]|[^\s\p{L}\p{N}]+")


def to_symbols(word: str, end_suffix: str = '') -> tuple[str, ...]:
  chars = [BYTE_CHARS[b] for b in word.encode('utf-8')]
  return tuple(chars[:-1] + [chars[-1] + end_suffix])


def merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
  out, i = [], 0
  while i < len(symbols):
    if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
      out.append(symbols[i] + symbols[i + 1])
      i += 2
    else:
      out.append(symbols[i])
      i += 1
  return tuple(out)


def learn_merges(words: list[tuple[str, ...]], n: int) -> list[tuple[str, str]]:
  """The n most frequent adjacent pairs, merged one after another (ties: the larger pair)."""
  counts = collections.Counter(words)
  merges = []
  for _ in range(n):
    pairs = collections.Counter()
    for word, c in counts.items():
      for pair in zip(word, word[1:]):
        pairs[pair] += c
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    counts = collections.Counter({merge_pair(w, best): c for w, c in counts.items()})
  return merges


def apply_bpe(symbols: tuple[str, ...], ranks: dict) -> tuple[str, ...]:
  """Repeatedly merges the adjacent pair of lowest rank, every occurrence at once."""
  while len(symbols) > 1:
    rank, pair = min((ranks.get(p, float('inf')), p) for p in zip(symbols, symbols[1:]))
    if rank == float('inf'):
      break
    symbols = merge_pair(symbols, pair)
  return symbols


def with_specials(encode, text: str, vocab: dict, specials: list[str]) -> list[int]:
  """Special tokens are found in the raw text first; the text between is encoded alone."""
  pieces = regex.split('(' + '|'.join(regex.escape(s) for s in specials) + ')', text)
  return [i for p in pieces for i in ([vocab[p]] if p in specials else encode(p))]


def gpt2_reference(text: str, vocab: dict, merges: list) -> list[int]:
  ranks = {m: i for i, m in enumerate(merges)}
  encode = lambda t: [vocab[s] for w in GPT2_WORDS.findall(t)
                      for s in apply_bpe(to_symbols(w), ranks)]
  return with_specials(encode, text, vocab, ['<|endoftext|>'])


def clip_clean(text: str) -> str:
  text = regex.sub(r'\s+', ' ', unicodedata.normalize('NFC', text))
  return ''.join(c.lower() for c in text)  # Character by character, as the Rust normaliser.


def clip_reference(text: str, vocab: dict, merges: list) -> list[int]:
  ranks = {m: i for i, m in enumerate(merges)}
  encode = lambda t: [vocab[s] for w in CLIP_WORDS.findall(clip_clean(t))
                      for s in apply_bpe(to_symbols(w, '</w>'), ranks)]
  ids = with_specials(encode, text, vocab, ['<|startoftext|>', '<|endoftext|>'])
  return [vocab['<|startoftext|>']] + ids + [vocab['<|endoftext|>']]


# ------------------------------------------------------------------------------------------------
# Tiny vocabulary folders (no tokenizer.json).

def write_json(path, obj):
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(obj, f, ensure_ascii=False)


def write_bpe_folder(folder, kind: str):
  """vocab.json + merges.txt learned on CORPUS: 400 merges over GPT-2's or CLIP's words."""
  folder.mkdir(exist_ok=True)
  if kind == 'gpt2':
    words = [to_symbols(w) for t in CORPUS for w in GPT2_WORDS.findall(t)]
    tokens = list(BYTE_CHARS.values())
  else:
    words = [to_symbols(w, '</w>') for t in CORPUS for w in CLIP_WORDS.findall(clip_clean(t))]
    tokens = list(BYTE_CHARS.values()) + [c + '</w>' for c in BYTE_CHARS.values()]
  merges = learn_merges(words, 400)
  tokens += [a + b for a, b in merges]
  tokens += ['<|endoftext|>'] if kind == 'gpt2' else ['<|startoftext|>', '<|endoftext|>']
  vocab = {t: i for i, t in enumerate(tokens)}
  write_json(folder / 'vocab.json', vocab)
  with open(folder / 'merges.txt', 'w', encoding='utf-8') as f:
    f.write('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))
  return vocab, merges


def write_bert_folder(folder, lowercase: bool):
  """vocab.txt: specials, the corpus' characters (a few left out, to get [UNK]), each as a
  '##' continuation too, frequent words and common word endings."""
  folder.mkdir(exist_ok=True)
  text = ' '.join(CORPUS)
  if lowercase:
    text = ''.join(c for c in unicodedata.normalize('NFD', text.lower())
                   if unicodedata.category(c) != 'Mn')
  chars = sorted({c for c in text if not c.isspace()} - set('🙂한ß'))
  words = collections.Counter(regex.findall(r'\p{L}+', text))
  tokens = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + chars + ['##' + c for c in chars]
  tokens += [w for w, _ in words.most_common(80) if len(w) > 1]
  tokens += ['##s', '##ing', '##ed', '##ly', '##er', '##est', '##tion', '##ord', '##ld']
  tokens += ['qu', '##ick', 'sup', '##er', '##cal', '##ifr']
  tokens = list(dict.fromkeys(tokens))
  (folder / 'vocab.txt').write_text(''.join(t + '\n' for t in tokens), encoding='utf-8')
  write_json(folder / 'tokenizer_config.json',
             {'do_lower_case': lowercase, 'tokenizer_class': 'BertTokenizer',
              'model_max_length': 512})
  return tokens


# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('lowercase', [True, False], ids=['uncased', 'cased'])
def test_bert_matches_transformers(lowercase, tmp_path):
  write_bert_folder(tmp_path, lowercase)
  ours = ptm_jax.load_tokenizer(str(tmp_path))
  slow = tokenization_bert_legacy.BertTokenizerLegacy(str(tmp_path / 'vocab.txt'),
                                                      do_lower_case=lowercase)
  fast = transformers.BertTokenizer.from_pretrained(str(tmp_path))
  unk = slow.convert_tokens_to_ids('[UNK]')
  nfc = lambda t: unicodedata.normalize('NFC', t)
  saw_unk = False
  for text in SENTENCES:
    expected = fast(text)['input_ids']
    assert ours.encode(text).ids == expected, text
    # The python tokenizer composes characters (NFC) first; the Rust one (and Google's original
    # BERT) does not, which shows for cased vocabularies on decomposed text ('A' + ring above).
    assert ours.encode(nfc(text)).ids == slow(text)['input_ids'], text
    saw_unk |= unk in expected
  assert saw_unk  # The vocabulary really is incomplete.

  # Pairs carry token type ids; a batch is padded to its longest and truncated to max_length.
  pairs = list(zip(SENTENCES[:8], SENTENCES[8:16]))
  for a, b in pairs:
    encoding = ours.encode(nfc(a), nfc(b))
    expected = slow(a, b, return_token_type_ids=True)
    assert encoding.ids == expected['input_ids'], (a, b)
    assert encoding.type_ids == expected['token_type_ids'], (a, b)
  batch = tk.encode_batch(ours, pairs)
  expected = fast([a for a, _ in pairs], [b for _, b in pairs], padding=True,
                  return_token_type_ids=True)
  for key in ('input_ids', 'attention_mask', 'token_type_ids'):
    assert batch[key].dtype == np.int32
    np.testing.assert_array_equal(batch[key], np.array(expected[key]), err_msg=key)
  short = tk.encode_batch(ours, SENTENCES, max_length=12)
  expected = fast(SENTENCES, padding=True, truncation=True, max_length=12)
  np.testing.assert_array_equal(short['input_ids'], np.array(expected['input_ids']))
  np.testing.assert_array_equal(short['attention_mask'], np.array(expected['attention_mask']))
  assert ours.truncation['max_length'] == 512  # The call's max_length did not stick.


def test_gpt2_matches_transformers_and_reference(tmp_path):
  vocab, merges = write_bpe_folder(tmp_path, 'gpt2')
  ours = ptm_jax.load_tokenizer(str(tmp_path))
  theirs = transformers.GPT2Tokenizer.from_pretrained(str(tmp_path))
  for text in SENTENCES:
    expected = gpt2_reference(text, vocab, merges)
    assert ours.encode(text).ids == expected, text
    assert theirs(text)['input_ids'] == expected, text
  assert len(ours.encode('the quick brown fox').ids) < len('the quick brown fox')  # Merges apply.
  # No pad token: end-of-text pads, behind a zero attention mask.
  batch = tk.encode_batch(ours, ['hello', 'hello world, again'])
  eot = vocab['<|endoftext|>']
  assert batch['input_ids'][0, -1] == eot and batch['attention_mask'][0, -1] == 0
  assert batch['attention_mask'][1].all()
  # add_bos_token: <|endoftext|> starts each text of a pair, and the second has type id 1.
  write_json(tmp_path / 'tokenizer_config.json', {'add_bos_token': True})
  ours = ptm_jax.load_tokenizer(str(tmp_path))
  theirs = transformers.GPT2Tokenizer.from_pretrained(str(tmp_path))
  for a, b in zip(SENTENCES[:8], SENTENCES[11:19]):  # (transformers takes a pair ('a', '') as 'a')
    encoding, expected = ours.encode(a, b), theirs(a, b, return_token_type_ids=True)
    assert encoding.ids == expected['input_ids'] and encoding.ids[0] == eot, (a, b)
    assert encoding.type_ids == expected['token_type_ids'], (a, b)


def test_clip_matches_transformers_and_reference(tmp_path):
  vocab, merges = write_bpe_folder(tmp_path, 'clip')
  ours = ptm_jax.load_tokenizer(str(tmp_path))
  theirs = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
  for text in SENTENCES:
    expected = clip_reference(text, vocab, merges)
    assert ours.encode(text).ids == expected, text
    assert theirs(text)['input_ids'] == expected, text
  # Truncation keeps the end-of-text token that CLIP pools at.
  ids = tk.encode_batch(ours, [SENTENCES[1]], max_length=8)['input_ids'][0]
  assert ids.tolist() == clip_reference(SENTENCES[1], vocab, merges)[:7] + [vocab['<|endoftext|>']]
  # Decoding turns the '</w>' word ends into spaces, as transformers does, whether the tokenizer
  # is built from the vocabulary or read from the tokenizer.json transformers writes.
  theirs.save_pretrained(str(tmp_path / 'json'))
  from_json = ptm_jax.load_tokenizer(str(tmp_path / 'json'))
  for text in SENTENCES:
    ids = ours.encode(text).ids
    expected = theirs.decode(ids, skip_special_tokens=True)
    assert '</w>' not in expected
    assert ours.decode(ids) == from_json.decode(ids) == expected, text
  assert ours.decode([]) == '' and ours.decode(ours.encode('').ids) == ''


def test_truncation_side_and_a_call_max_length(tmp_path):
  """tokenizer_config.json's truncation_side holds, also when encode_batch shortens a call."""
  write_bert_folder(tmp_path, lowercase=True)
  config = json.loads((tmp_path / 'tokenizer_config.json').read_text())
  write_json(tmp_path / 'tokenizer_config.json', {**config, 'truncation_side': 'left'})
  fast = transformers.BertTokenizer.from_pretrained(str(tmp_path))
  assert fast.truncation_side == 'left'
  expected = fast(SENTENCES, padding=True, truncation=True, max_length=12)
  loaded_short = tk.encode_batch(ptm_jax.load_tokenizer(str(tmp_path), max_length=12), SENTENCES)
  tokenizer = ptm_jax.load_tokenizer(str(tmp_path))
  call_short = tk.encode_batch(tokenizer, SENTENCES, max_length=12)
  for ours in (loaded_short, call_short):
    for key in ('input_ids', 'attention_mask', 'token_type_ids'):
      np.testing.assert_array_equal(ours[key], np.array(expected[key]), err_msg=key)
  assert tokenizer.truncation['max_length'] == 512 and tokenizer.truncation['direction'] == 'left'
  with pytest.raises(ValueError, match="truncation_side 'top'"):
    write_json(tmp_path / 'tokenizer_config.json', {**config, 'truncation_side': 'top'})
    ptm_jax.load_tokenizer(str(tmp_path))


def test_max_length_leaves_room_for_the_text(tmp_path):
  """Below the special tokens' count the tokenizers library would truncate nothing at all."""
  write_bert_folder(tmp_path, lowercase=True)
  with pytest.raises(ValueError, match=r'max_length must be at least 3 \(one token for the text '
                     r'beside the 2 special tokens\), not 1'):
    ptm_jax.load_tokenizer(str(tmp_path), max_length=1)
  tokenizer = ptm_jax.load_tokenizer(str(tmp_path))
  with pytest.raises(ValueError, match='at least 3'):
    tk.encode_batch(tokenizer, ['hello world'], max_length=2)
  with pytest.raises(ValueError, match='at least 5 .one token for each text of a pair beside'):
    tk.encode_batch(tokenizer, [('hello world', 'again')], max_length=4)
  # The least lengths truncate as asked.
  assert tk.encode_batch(tokenizer, ['hello world'], max_length=3)['input_ids'].shape == (1, 3)
  pair = tk.encode_batch(tokenizer, [('hello world', 'again and again')], max_length=5)
  assert pair['token_type_ids'].tolist() == [[0, 0, 0, 1, 1]]


def test_sentence_transformers_do_lower_case(tmp_path):
  """sentence_bert_config.json's do_lower_case: sentence-transformers lowercases the texts."""
  write_bert_folder(tmp_path, lowercase=False)  # a cased vocabulary
  cased = ptm_jax.load_tokenizer(str(tmp_path))
  write_json(tmp_path / 'sentence_bert_config.json', {'max_seq_length': 500, 'do_lower_case': True})
  lowering = ptm_jax.load_tokenizer(str(tmp_path))
  assert lowering.truncation['max_length'] == 500
  for text in SENTENCES:
    if '[MASK]' not in text:  # a special token written in the text stays special here
      assert lowering.encode(text).ids == cased.encode(text.lower()).ids, text
  assert lowering.encode(SENTENCES[8]).ids != cased.encode(SENTENCES[8]).ids


def test_kind_from_config_and_files(tmp_path):
  # No tokenizer_config.json: CLIP is told from GPT-2 by config.json or by '</w>' in the vocab.
  write_bpe_folder(tmp_path / 'clip', 'clip')
  write_bpe_folder(tmp_path / 'gpt2', 'gpt2')
  text = 'Hello World'
  clip = ptm_jax.load_tokenizer(str(tmp_path / 'clip')).encode(text)
  assert clip.tokens[0] == '<|startoftext|>' and clip.tokens[1].endswith('</w>')
  gpt2 = ptm_jax.load_tokenizer(str(tmp_path / 'gpt2')).encode(text)
  assert not any(t.endswith('</w>') for t in gpt2.tokens)
  write_json(tmp_path / 'gpt2' / 'config.json', {'model_type': 'gpt2'})
  assert ptm_jax.load_tokenizer(str(tmp_path / 'gpt2')).encode(text).ids == gpt2.ids
  # padding_side and added tokens from tokenizer_config.json.
  vocab_size = len(json.loads((tmp_path / 'gpt2' / 'vocab.json').read_text()))
  added = {str(vocab_size): {'content': '<|sep|>', 'special': True},
           str(vocab_size + 1): {'content': 'zebra', 'special': False}}
  write_json(tmp_path / 'gpt2' / 'tokenizer_config.json',
             {'padding_side': 'left', 'added_tokens_decoder': added})
  ids = ptm_jax.load_tokenizer(str(tmp_path / 'gpt2')).encode('a<|sep|>b zebra').ids
  assert ids[1] == vocab_size and ids[-1] == vocab_size + 1 and len(ids) == 5
  left = tk.encode_batch(ptm_jax.load_tokenizer(str(tmp_path / 'gpt2')), [text, text + text])
  n = len(gpt2.ids)
  assert left['attention_mask'][0].tolist() == [0] * (left['input_ids'].shape[1] - n) + [1] * n
  assert left['input_ids'][0, -n:].tolist() == gpt2.ids


def test_tokenizer_json_folder(tmp_path):
  write_bert_folder(tmp_path / 'vocab', lowercase=True)
  # transformers writes tokenizer.json; its stored padding/truncation must not leak through.
  transformers.BertTokenizer.from_pretrained(str(tmp_path / 'vocab')).save_pretrained(
      str(tmp_path / 'json'))
  data = json.loads((tmp_path / 'json' / 'tokenizer.json').read_text())
  data['padding'] = {'strategy': {'Fixed': 40}, 'direction': 'Right', 'pad_to_multiple_of': None,
                     'pad_id': 0, 'pad_type_id': 0, 'pad_token': '[PAD]'}
  data['truncation'] = {'max_length': 5, 'strategy': 'LongestFirst', 'stride': 0,
                        'direction': 'Right'}
  write_json(tmp_path / 'json' / 'tokenizer.json', data)
  (tmp_path / 'json' / 'vocab.txt').unlink(missing_ok=True)
  loaded = ptm_jax.load_tokenizer(str(tmp_path / 'json'), max_length=20)
  built = ptm_jax.load_tokenizer(str(tmp_path / 'vocab'), max_length=20)
  for text in SENTENCES:
    assert loaded.encode(text).ids == built.encode(text).ids, text
  assert max(len(loaded.encode(t).ids) for t in SENTENCES) == 20
  batch = tk.encode_batch(loaded, ['a', 'the quick brown fox'])
  assert batch['input_ids'].shape == (2, len(built.encode('the quick brown fox').ids))
  fixed = ptm_jax.load_tokenizer(str(tmp_path / 'json'), max_length=16, padding='max_length')
  assert tk.encode_batch(fixed, ['a'])['input_ids'].shape == (1, 16)
  assert tk.encode_batch(loaded, ['a'], pad_to_multiple_of=8)['input_ids'].shape == (1, 8)


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='missing does not exist: pass an existing folder'):
    ptm_jax.load_tokenizer(str(tmp_path / 'missing'))
  with pytest.raises(FileNotFoundError, match=r'tokenizer\.json.*vocab\.txt.*merges\.txt'):
    ptm_jax.load_tokenizer(str(tmp_path))
  write_bpe_folder(tmp_path / 't5', 'gpt2')
  write_json(tmp_path / 't5' / 'config.json', {'model_type': 't5'})
  with pytest.raises(ValueError, match=r"model_type 't5'.*kind="):
    ptm_jax.load_tokenizer(str(tmp_path / 't5'))
  write_json(tmp_path / 't5' / 'tokenizer_config.json', {'tokenizer_class': 'T5Tokenizer'})
  with pytest.raises(ValueError, match=r"tokenizer_class 'T5Tokenizer'"):
    ptm_jax.load_tokenizer(str(tmp_path / 't5'))
  assert ptm_jax.load_tokenizer(str(tmp_path / 't5'), kind='gpt2').encode('hi').ids
  with pytest.raises(FileNotFoundError, match=r'bert tokenizer but lacks vocab\.txt'):
    ptm_jax.load_tokenizer(str(tmp_path / 't5'), kind='bert')
  with pytest.raises(ValueError, match=r"Unknown tokenizer kind 'wordpiece'"):
    ptm_jax.load_tokenizer(str(tmp_path / 't5'), kind='wordpiece')
  with pytest.raises(ValueError, match=r"padding='max_length' needs max_length"):
    ptm_jax.load_tokenizer(str(tmp_path / 't5'), kind='gpt2', padding='max_length')
  with pytest.raises(TypeError, match='list of texts'):
    tk.encode_batch(ptm_jax.load_tokenizer(str(tmp_path / 't5'), kind='gpt2'), 'one text')
  write_json(tmp_path / 't5' / 'tokenizer_config.json',
             {'added_tokens_decoder': {'3': {'content': '<|endoftext|>', 'special': True}}})
  with pytest.raises(ValueError, match=r"gives '<\|endoftext\|>' id 3 but the vocabulary gives"):
    ptm_jax.load_tokenizer(str(tmp_path / 't5'), kind='gpt2')


def test_hub_id_fetches_sentence_transformers_max_length(tmp_path, fake_hub):
  """sentence_bert_config.json's max_seq_length must come down with a hub id's tokenizer."""
  repo = tmp_path / 'repo'
  write_bert_folder(repo, lowercase=True)  # model_max_length 512
  write_json(repo / 'sentence_bert_config.json', {'max_seq_length': 9, 'do_lower_case': False})
  fake_hub(repo)
  assert ptm_jax.load_tokenizer(str(repo)).truncation['max_length'] == 9
  assert ptm_jax.load_tokenizer('someone/sentence-model').truncation['max_length'] == 9
