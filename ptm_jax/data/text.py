"""Text for the input pipeline: tokenizers behind one interface, and per-example transforms.

Everything here is host-side numpy (no JAX), so that the grain pipeline can run it in its worker
processes. Transforms that draw random numbers take a `np.random.Generator`: given the same
generator state they give the same example, which keeps the pipeline deterministic and resumable.

Tokenizers (all `TextTokenizer`):
  CharTokenizer  one id per character of the training text (nanoGPT's shakespeare_char); the
                 vocabulary is saved beside a run as JSON, since generation needs it again.
  ByteTokenizer  UTF-8 bytes 0..255 and an end-of-text id 256; needs no vocabulary at all.
  HFTokenizer    a `tokenizers.Tokenizer` of a checkpoint folder (BERT WordPiece, GPT-2 byte BPE,
                 CLIP BPE), with its special ids found by their token text.
`get_tokenizer` picks one from config.data.tokenizer.

Sequence helpers: `pad_or_truncate`, `pack_documents` (GPT-style packing) and `lm_example`.

BERT pre-training: `mask_tokens` (masked LM: 15% of the tokens are selected, of those 80% become
[MASK], 10% a random token, 10% stay), `nsp_example` (next sentence prediction pairs),
`segment_example` (one segment, for masked LM alone) and `mlm_nsp_example` (masking on either),
following the data generator of the original BERT release.
"""

import abc
import json
import os
import re
from typing import Collection, Iterable, Sequence

import numpy as np
import tokenizers

from ptm_jax.hub import tokenizers as hub_tokenizers

# transformers' ignore index: positions with this label add nothing to the loss.
IGNORE_INDEX = -100
_CHAR_VOCAB_TYPE = 'ptm_jax.CharTokenizer'


class TextTokenizer(abc.ABC):
  """The interface the pipeline uses: text <-> int32 ids, and the ids of the special tokens.

  Attributes:
    vocab_size: the number of ids; every id is in [0, vocab_size).
    pad_id, eos_id, bos_id, cls_id, sep_id, mask_id, unk_id: special ids, None where the
      tokenizer has no such token.
    special_ids: every special id; masked-LM never selects or writes these.
  """
  vocab_size: int
  pad_id: int | None = None
  eos_id: int | None = None
  bos_id: int | None = None
  cls_id: int | None = None
  sep_id: int | None = None
  mask_id: int | None = None
  unk_id: int | None = None
  special_ids: frozenset[int] = frozenset()

  @abc.abstractmethod
  def encode(self, text: str) -> np.ndarray:
    """text -> int32 (T,) ids, no special tokens added."""

  @abc.abstractmethod
  def decode(self, ids) -> str:
    """ids (any 1-D integer sequence) -> text."""

  def encode_special(self, text: str, pair: str | None = None, *,
                     max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, type_ids) of A [end] (B [end]), [end] the eos id where there is one.

    The built-in char and byte tokenizers have no [CLS]; this gives classification and CLIP
    models trained from scratch on them a text end to pool at. The longer text is cut first to
    fit max_length.
    """
    end = [] if self.eos_id is None else [self.eos_id]
    a = self.encode(as_text(text))
    b = None if pair is None else self.encode(as_text(pair))
    if max_length is not None:
      room = max_length - len(end) * (1 if b is None else 2)
      if room < (1 if b is None else 2):
        raise ValueError(f'max_length {max_length} leaves no room for the text(s); raise it.')
      if b is None:
        a = a[:room]
      else:
        while len(a) + len(b) > room:
          if len(a) >= len(b):
            a = a[:-1]
          else:
            b = b[:-1]
    parts = [a, end] + ([] if b is None else [b, end])
    types = [np.zeros(len(a) + len(end))] + ([] if b is None else [np.ones(len(b) + len(end))])
    return (np.concatenate(parts).astype(np.int32), np.concatenate(types).astype(np.int32))


def as_text(value) -> str:
  """A str, whether a source gave str or UTF-8 bytes (TFDS text features are bytes)."""
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _ids_1d(ids) -> np.ndarray:
  ids = np.asarray(ids)
  if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
    raise TypeError(f'ids must be a 1-D sequence of integers, got shape {ids.shape} of '
                    f'{ids.dtype}.')
  return ids.astype(np.int64)


def _code_points(text: str) -> np.ndarray:
  """str -> uint32 (T,) Unicode code points, without a python loop over the characters."""
  return np.frombuffer(text.encode('utf-32-le'), dtype='<u4')


class CharTokenizer(TextTokenizer):
  """Character level: the vocabulary is the sorted characters of the training text, id = index.

  Encoding looks the code points up in the sorted vocabulary (np.searchsorted), so a megabyte of
  text takes milliseconds. It has no special tokens; documents are simply concatenated.
  """

  def __init__(self, chars: Sequence[str]):
    chars = list(chars)
    if not chars:
      raise ValueError('CharTokenizer needs at least one character in its vocabulary.')
    if any(not isinstance(c, str) or len(c) != 1 for c in chars):
      raise ValueError('CharTokenizer vocabulary entries must be single characters.')
    if chars != sorted(set(chars)):
      raise ValueError('CharTokenizer vocabulary must be sorted and without repeats (as '
                       'CharTokenizer.from_text builds it).')
    self.chars = chars
    self.vocab_size = len(chars)
    self._points = _code_points(''.join(chars))  # Sorted, as the characters are.

  @classmethod
  def from_text(cls, text: str) -> 'CharTokenizer':
    """The vocabulary of a training text: its distinct characters in code point order."""
    if not text:
      raise ValueError('CharTokenizer.from_text needs a non-empty training text.')
    return cls(sorted(set(text)))

  def encode(self, text: str) -> np.ndarray:
    points = _code_points(text)
    ids = np.searchsorted(self._points, points)
    known = self._points[np.minimum(ids, self.vocab_size - 1)] == points
    if not known.all():
      unknown = sorted(set(text[i] for i in np.flatnonzero(~known)[:10_000]))
      shown = ', '.join(repr(c) for c in unknown[:20]) + (' ...' if len(unknown) > 20 else '')
      raise ValueError(f'{np.count_nonzero(~known)} character(s) of the text are not in the '
                       f'character vocabulary: {shown}. Build the vocabulary from text that '
                       'contains them (CharTokenizer.from_text over all splits).')
    return ids.astype(np.int32)

  def decode(self, ids) -> str:
    ids = _ids_1d(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f'ids must be in [0, {self.vocab_size}) for this character vocabulary; '
                       f'got values from {ids.min()} to {ids.max()}.')
    return self._points[ids].astype('<u4').tobytes().decode('utf-32-le')

  def to_json(self) -> str:
    return json.dumps({'type': _CHAR_VOCAB_TYPE, 'chars': self.chars}, ensure_ascii=False)

  @classmethod
  def from_json(cls, text: str) -> 'CharTokenizer':
    try:
      stored = json.loads(text)
    except ValueError as e:
      raise ValueError(f'Not a character vocabulary: invalid JSON ({e}).') from e
    if not isinstance(stored, dict) or stored.get('type') != _CHAR_VOCAB_TYPE:
      raise ValueError('Not a character vocabulary: expected a JSON object with '
                       f'"type": "{_CHAR_VOCAB_TYPE}" (as CharTokenizer.save writes).')
    return cls(stored['chars'])

  def save(self, path: str):
    """Writes the vocabulary as a JSON file (e.g. beside a run's checkpoints)."""
    with open(path, 'w', encoding='utf-8') as f:
      f.write(self.to_json())

  @classmethod
  def load(cls, path: str) -> 'CharTokenizer':
    with open(path, encoding='utf-8') as f:
      text = f.read()
    try:
      return cls.from_json(text)
    except ValueError as e:
      raise ValueError(f'{path}: {e}') from e


class ByteTokenizer(TextTokenizer):
  """UTF-8 bytes as ids 0..255, and 256 as end of text (also used to pad).

  Any text can be encoded, so there is no vocabulary to store. Decoding drops ids >= 256 and
  replaces byte sequences that are not valid UTF-8 (a model may cut a character in half).
  """
  vocab_size = 257
  eos_id = 256
  pad_id = 256
  special_ids = frozenset({256})

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids = _ids_1d(ids)
    if ids.size and ids.min() < 0:
      raise ValueError(f'Byte ids must be non-negative; got {ids.min()}.')
    return ids[ids < 256].astype(np.uint8).tobytes().decode('utf-8', errors='replace')


# Token texts that name each special id, in order of preference. A checkpoint's tokenizer has
# at most a few of these; the first one in its vocabulary wins.
_SPECIAL_TEXTS = {
    # GPT-2 has no pad token; its end-of-text pads (the attention mask hides it). CLIP pads with
    # <|endoftext|> too.
    'pad_id': ('[PAD]', '<pad>', '<|endoftext|>'),
    'cls_id': ('[CLS]',),
    'sep_id': ('[SEP]',),
    'mask_id': ('[MASK]', '<mask>'),
    # CLIP starts a text with <|startoftext|>; GPT-2 uses <|endoftext|> as its start-of-text too.
    'bos_id': ('<|startoftext|>', '<|endoftext|>'),
    # BERT has no end-of-text token; [SEP] ends its segments, so it separates packed documents.
    'eos_id': ('<|endoftext|>', '[SEP]'),
}


class HFTokenizer(TextTokenizer):
  """A `tokenizers.Tokenizer` behind the pipeline's interface.

  The special ids are found by token text (see _SPECIAL_TEXTS): BERT gets pad/cls/sep/mask/unk =
  [PAD]/[CLS]/[SEP]/[MASK]/[UNK] and eos = [SEP]; GPT-2 gets pad = bos = eos = <|endoftext|>;
  CLIP gets bos = <|startoftext|>, pad = eos = <|endoftext|>. unk is the model's own unknown
  token. special_ids holds every token the tokenizer marks special, plus the ids found here.

  The wrapper works on a copy of `tok` with truncation and padding turned off: `encode` keeps the
  whole text, and lengths are the pipeline's business (pad_or_truncate, pack_documents, or
  `encode_special`'s max_length).
  """

  def __init__(self, tok: tokenizers.Tokenizer):
    if not isinstance(tok, tokenizers.Tokenizer):
      raise TypeError(f'HFTokenizer wraps a tokenizers.Tokenizer, not {type(tok).__name__}.')
    self.tokenizer = tokenizers.Tokenizer.from_str(tok.to_str())
    self.tokenizer.no_truncation()
    self.tokenizer.no_padding()
    self._truncating_copies: dict[int, tokenizers.Tokenizer] = {}
    self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
    for name, texts in _SPECIAL_TEXTS.items():
      setattr(self, name, self._first_id(texts))
    model_unk = getattr(self.tokenizer.model, 'unk_token', None)
    self.unk_id = self._first_id((model_unk, '[UNK]', '<unk>'))
    marked = {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
    found = {self.pad_id, self.eos_id, self.bos_id, self.cls_id, self.sep_id, self.mask_id,
             self.unk_id}
    self.special_ids = frozenset(marked | (found - {None}))

  def _first_id(self, texts: Iterable[str | None]) -> int | None:
    for text in texts:
      if text is not None and (token_id := self.tokenizer.token_to_id(text)) is not None:
        return token_id
    return None

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(_ids_1d(ids).tolist(), skip_special_tokens=skip_special_tokens)

  def encode_special(self, text: str, pair: str | None = None, *,
                     max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """text (and pair) with the tokenizer's own special tokens -> (ids, type_ids), int32 (T,).

    BERT gives [CLS] A [SEP] (B [SEP]) with type ids 0 (1 for B and its [SEP]); CLIP gives
    <|startoftext|> A <|endoftext|>; GPT-2 adds nothing. max_length limits T, special tokens
    included, with the `tokenizers` library's own 'longest_first' truncation (what transformers'
    fast tokenizers give a model fine-tuned elsewhere).
    """
    tok = self.tokenizer
    if max_length is not None:
      room = max_length - tok.num_special_tokens_to_add(pair is not None)
      if room < (1 if pair is None else 2):
        raise ValueError(f'max_length {max_length} leaves no room for the text(s) beside the '
                         'special tokens; raise it.')
      tok = self._truncating(max_length)
    out = tok.encode(text, pair, add_special_tokens=True)
    return np.asarray(out.ids, np.int32), np.asarray(out.type_ids, np.int32)

  def _truncating(self, max_length: int) -> tokenizers.Tokenizer:
    """A copy that truncates to max_length; copies are never changed after they are made, so
    threads may share them (enabling truncation on the one tokenizer would be a race)."""
    tok = self._truncating_copies.get(max_length)
    if tok is None:
      tok = tokenizers.Tokenizer.from_str(self.tokenizer.to_str())
      tok.enable_truncation(max_length, strategy='longest_first')
      self._truncating_copies[max_length] = tok
    return tok


def get_tokenizer(spec: str, *, checkpoint: str | None = None,
                  text: str | None = None) -> TextTokenizer:
  """The tokenizer that config.data.tokenizer names.

  Args:
    spec: 'char' (vocabulary from `text`), 'byte', a saved character vocabulary (the JSON file
      CharTokenizer.save writes), a tokenizer folder or hub id, or '' for the tokenizer files of
      the pretrained checkpoint `checkpoint`.
    checkpoint: the folder (or hub id) of init.from_pretrained; used when spec is ''.
    text: the training text; needed for 'char'.
  """
  if spec == 'char':
    if not text:
      raise ValueError("The 'char' tokenizer builds its vocabulary from the training text, but "
                       'no text was given; pass text= (the whole training corpus).')
    return CharTokenizer.from_text(text)
  if spec == 'byte':
    return ByteTokenizer()
  if not spec:
    if not checkpoint:
      raise ValueError("No tokenizer: config.data.tokenizer is '' (use the pretrained "
                       "checkpoint's) but there is no checkpoint. Set config.data.tokenizer to "
                       "'char', 'byte' or a tokenizer folder, or set init.from_pretrained.")
    spec = checkpoint
  if os.path.isfile(spec):
    try:
      return CharTokenizer.load(spec)
    except ValueError as e:
      raise ValueError(f'{e} A checkpoint tokenizer is given by its folder, not a file.') from e
  return HFTokenizer(hub_tokenizers.load_tokenizer(spec, padding=False))


# ------------------------------------------------------------------------------------------------
# Sequences.

def pad_or_truncate(ids, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """ids (T,) -> (ids, mask), int32 (length,): the first `length` ids, then pad_id; mask 1 on ids.
  """
  ids = _ids_1d(ids)[:length]
  out = np.full(length, pad_id, np.int32)
  out[:len(ids)] = ids
  mask = np.zeros(length, np.int32)
  mask[:len(ids)] = 1
  return out, mask


def pack_documents(docs: Iterable[np.ndarray], seq_len: int, eos_id: int | None) -> np.ndarray:
  """Documents -> int32 (N, seq_len) rows of one token stream (GPT-style packing).

  The stream is every document followed by eos_id (nothing when eos_id is None, as for
  characters), so a row may hold the end of one document and the start of the next, and the
  model learns where documents end. The stream is cut into N = len(stream) // seq_len rows; the
  ragged tail is dropped. For language modelling, pack to seq_len + 1 and take `lm_example` of
  each row.
  """
  if seq_len < 1:
    raise ValueError(f'seq_len must be positive, not {seq_len}.')
  parts = []
  end = np.array([] if eos_id is None else [eos_id], np.int32)
  for doc in docs:
    parts += [np.asarray(doc, np.int32).reshape(-1), end]
  stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
  rows = len(stream) // seq_len
  return stream[:rows * seq_len].reshape(rows, seq_len)


def lm_example(window) -> dict[str, np.ndarray]:
  """A window of seq_len + 1 tokens -> next-token inputs and labels, int32 (seq_len,) each."""
  window = _ids_1d(window).astype(np.int32)
  if len(window) < 2:
    raise ValueError(f'A language-model window needs at least 2 tokens, got {len(window)}.')
  return {'input_ids': window[:-1], 'labels': window[1:]}


# ------------------------------------------------------------------------------------------------
# BERT pre-training: masked LM and next sentence prediction.

def _kth_non_special(k: np.ndarray, specials: np.ndarray) -> np.ndarray:
  """The k-th (0-based) id that is not in `specials` (sorted, unique), for each k.

  Below specials[j] lie specials[j] - j non-special ids, so the k-th non-special id is k plus the
  number of specials j with specials[j] - j <= k.
  """
  return k + np.searchsorted(specials - np.arange(len(specials)), k, side='right')


def mask_tokens(ids, rng: np.random.Generator, *, mask_id: int, vocab_size: int,
                special_ids: Collection[int], mask_prob: float = 0.15,
                mask_token_frac: float = 0.8, random_token_frac: float = 0.1,
                max_predictions: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """BERT's masked-LM corruption of one sequence.

  The candidates are the positions whose id is not special (padding must be among special_ids;
  HFTokenizer.special_ids includes it). Exactly round(mask_prob * candidates) of them (at least
  one, at most max_predictions) are selected uniformly without replacement, as the original BERT
  data generator does. Each selected token independently becomes mask_id with probability
  mask_token_frac, a random token with probability random_token_frac, and stays otherwise.
  Random tokens are drawn uniformly from the ids in [0, vocab_size) that are not special, so the
  model is never shown a stray [CLS] or [PAD] (and mask_id only where it was written as a mask).

  Args:
    ids: int (T,) token ids.
  Returns:
    (masked_ids, labels), int32 (T,): labels hold the original id at the selected positions and
    IGNORE_INDEX (-100) elsewhere.
  """
  if not 0 <= mask_prob <= 1:
    raise ValueError(f'mask_prob must be in [0, 1], not {mask_prob}.')
  if mask_token_frac < 0 or random_token_frac < 0 or mask_token_frac + random_token_frac > 1:
    raise ValueError(f'mask_token_frac ({mask_token_frac}) and random_token_frac '
                     f'({random_token_frac}) must be non-negative and sum to at most 1.')
  ids = _ids_1d(ids)
  specials = np.unique(np.fromiter(special_ids, np.int64, len(special_ids)))
  if mask_id not in specials:
    specials = np.union1d(specials, [mask_id])
  candidates = np.flatnonzero(~np.isin(ids, specials))
  n_select = 0
  if len(candidates) and mask_prob > 0:
    n_select = max(1, int(round(mask_prob * len(candidates))))
    if max_predictions is not None:
      n_select = min(n_select, max_predictions)
  selected = rng.choice(candidates, n_select, replace=False) if n_select else candidates[:0]

  labels = np.full(len(ids), IGNORE_INDEX, np.int32)
  labels[selected] = ids[selected]
  masked = ids.astype(np.int32)
  draw = rng.random(n_select)
  masked[selected[draw < mask_token_frac]] = mask_id
  to_random = selected[(draw >= mask_token_frac) & (draw < mask_token_frac + random_token_frac)]
  if len(to_random):
    in_vocab = specials[(specials >= 0) & (specials < vocab_size)]
    n_ordinary = vocab_size - len(in_vocab)
    if n_ordinary < 1:
      raise ValueError(f'Every id below vocab_size {vocab_size} is special; there is no token to '
                       'draw a random replacement from.')
    masked[to_random] = _kth_non_special(rng.integers(0, n_ordinary, len(to_random)), in_vocab)
  return masked, labels


def _longest_first(len_a: int, len_b: int, room: int) -> tuple[int, int]:
  """The lengths left after removing tokens one at a time from the longer segment (B on ties)
  until len_a + len_b <= room."""
  excess = len_a + len_b - room
  if excess <= 0:
    return len_a, len_b
  if abs(len_a - len_b) >= excess:
    return (len_a - excess, len_b) if len_a > len_b else (len_a, len_b - excess)
  left = excess - abs(len_a - len_b)  # After both reach the shorter length, they alternate.
  short = min(len_a, len_b)
  return short - left // 2, short - (left - left // 2)


def _truncate_pair(a: np.ndarray, b: np.ndarray, room: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """BERT's truncation: each removed token comes off the front or the back of its segment with
  equal probability (drawn at once as a binomial count per segment)."""
  len_a, len_b = _longest_first(len(a), len(b), room)
  out = []
  for seg, keep in ((a, len_a), (b, len_b)):
    front = rng.binomial(len(seg) - keep, 0.5)
    out.append(seg[front:front + keep])
  return out[0], out[1]


def _sentences(documents: Sequence[Sequence[np.ndarray]], index: int) -> list[np.ndarray]:
  """The non-empty sentences of one document, as int64 arrays."""
  sentences = [s for s in (np.asarray(s, np.int64).reshape(-1) for s in documents[index])
               if len(s)]
  if not sentences:
    raise ValueError(f'Document {index} has no tokens; drop empty documents before building '
                     'next-sentence examples.')
  return sentences


def _span(sentences: list[np.ndarray], start: int, target: int, min_sentences: int) -> list:
  """Sentences from `start` until they hold >= target tokens (and >= min_sentences of them)."""
  end, total = start, 0
  while end < len(sentences) and (total < target or end - start < min_sentences):
    total += len(sentences[end])
    end += 1
  return sentences[start:end]


def nsp_example(documents: Sequence[Sequence[np.ndarray]], doc_index: int,
                rng: np.random.Generator, *, max_len: int, cls_id: int, sep_id: int, pad_id: int,
                short_seq_prob: float = 0.1) -> dict[str, np.ndarray]:
  """A next-sentence-prediction pair from document `doc_index`, as the original BERT builds it.

  A target length is max_len - 3, or with probability short_seq_prob a random length in
  [2, max_len - 3] (so the model also sees short inputs). From a random sentence of the document
  consecutive sentences (at least two where the document has them) are gathered until they reach
  the target; segment A is the first 1..n-1 of them. With probability 0.5, segment B is the rest
  (label 0: B follows A, transformers' convention), else sentences from a random start in a
  random other document, enough for the target (label 1). A one-sentence document is split at a
  random token into two pseudo-sentences; one whose only sentence is a single token always gets
  a random B. The pair is then cut to max_len - 3 tokens by removing tokens from the longer
  segment, each from its front or back at random.

  A corpus of one document has no other document for a random B; that is an error rather than
  silently only positive pairs (split the text into several documents).

  Args:
    documents: documents as lists of tokenised sentences (1-D integer arrays); documents other
      than doc_index are only read when picked for a random B.
    doc_index: the document segment A comes from.
  Returns:
    {'input_ids', 'token_type_ids', 'attention_mask'}: int32 (max_len,) holding
    [CLS] A [SEP] B [SEP] then pad_id; token types 0 up to the first [SEP], 1 for B and its
    [SEP], 0 on padding. 'next_sentence_label': int32 scalar, 0 if B follows A, 1 if random.
  """
  if max_len < 5:
    raise ValueError(f'max_len must be at least 5 ([CLS] A [SEP] B [SEP]), not {max_len}.')
  if len(documents) < 2:
    raise ValueError('Next sentence prediction needs at least two documents to draw random '
                     f'second segments from; got {len(documents)}. Split the corpus into '
                     'documents (for example at blank lines).')
  if not 0 <= doc_index < len(documents):
    raise IndexError(f'doc_index {doc_index} is out of range for {len(documents)} documents.')
  room = max_len - 3
  target = room if rng.random() >= short_seq_prob else int(rng.integers(2, room + 1))

  sentences = _sentences(documents, doc_index)
  if len(sentences) == 1 and len(sentences[0]) > 1:
    cut = int(rng.integers(1, len(sentences[0])))
    sentences = [sentences[0][:cut], sentences[0][cut:]]
  start = int(rng.integers(0, max(1, len(sentences) - 1)))  # Leave a sentence to follow.
  chunk = _span(sentences, start, target, min_sentences=2)
  a_end = int(rng.integers(1, len(chunk))) if len(chunk) > 1 else 1
  seg_a = np.concatenate(chunk[:a_end])

  is_random = len(chunk) == 1 or rng.random() < 0.5
  if is_random:
    other = int(rng.integers(0, len(documents) - 1))
    if other >= doc_index:  # Skips doc_index: uniform over the other documents.
      other += 1
    other_sentences = _sentences(documents, other)
    b_start = int(rng.integers(0, len(other_sentences)))
    seg_b = np.concatenate(_span(other_sentences, b_start, max(1, target - len(seg_a)),
                                 min_sentences=1))
  else:
    seg_b = np.concatenate(chunk[a_end:])
  seg_a, seg_b = _truncate_pair(seg_a, seg_b, room, rng)

  tokens = np.concatenate([[cls_id], seg_a, [sep_id], seg_b, [sep_id]])
  input_ids, attention_mask = pad_or_truncate(tokens, max_len, pad_id)
  token_type_ids = np.zeros(max_len, np.int32)
  token_type_ids[len(seg_a) + 2:len(tokens)] = 1
  return {'input_ids': input_ids, 'token_type_ids': token_type_ids,
          'attention_mask': attention_mask,
          'next_sentence_label': np.int32(1 if is_random else 0)}


def segment_example(documents: Sequence[Sequence[np.ndarray]], doc_index: int,
                    rng: np.random.Generator, *, max_len: int, cls_id: int, sep_id: int,
                    pad_id: int, short_seq_prob: float = 0.1) -> dict[str, np.ndarray]:
  """One segment [CLS] A [SEP] from document `doc_index`, for masked LM without NSP.

  A is consecutive sentences from a random sentence of the document, gathered until they reach
  the target length (max_len - 2, or with probability short_seq_prob a random length in
  [1, max_len - 2]) and cut to max_len - 2 tokens at the end. A single document is a corpus.

  Returns:
    {'input_ids', 'token_type_ids' (all 0), 'attention_mask'}: int32 (max_len,), padded with
    pad_id.
  """
  if max_len < 3:
    raise ValueError(f'max_len must be at least 3 ([CLS] A [SEP]), not {max_len}.')
  if not 0 <= doc_index < len(documents):
    raise IndexError(f'doc_index {doc_index} is out of range for {len(documents)} documents.')
  room = max_len - 2
  target = room if rng.random() >= short_seq_prob else int(rng.integers(1, room + 1))
  sentences = _sentences(documents, doc_index)
  start = int(rng.integers(0, len(sentences)))
  segment = np.concatenate(_span(sentences, start, target, min_sentences=1))[:target]
  tokens = np.concatenate([[cls_id], segment, [sep_id]])
  input_ids, attention_mask = pad_or_truncate(tokens, max_len, pad_id)
  return {'input_ids': input_ids, 'token_type_ids': np.zeros(max_len, np.int32),
          'attention_mask': attention_mask}


def mlm_nsp_example(documents: Sequence[Sequence[np.ndarray]], doc_index: int,
                    rng: np.random.Generator, *, max_len: int, cls_id: int, sep_id: int,
                    pad_id: int, mask_id: int, vocab_size: int, special_ids: Collection[int],
                    short_seq_prob: float = 0.1, mask_prob: float = 0.15,
                    max_predictions: int | None = None, nsp: bool = True) -> dict[str, np.ndarray]:
  """`nsp_example` (or `segment_example` when nsp is False), then `mask_tokens` on its input_ids:
  BERT's pre-training example.

  [CLS], [SEP] and padding are never masked (they are added to special_ids). Returns the
  example's dict with 'input_ids' masked and 'mlm_labels' int32 (max_len,): the original id at
  the selected positions, -100 elsewhere. Without NSP there is no 'next_sentence_label', which
  makes the objective masked LM alone.
  """
  make = nsp_example if nsp else segment_example
  example = make(documents, doc_index, rng, max_len=max_len, cls_id=cls_id, sep_id=sep_id,
                 pad_id=pad_id, short_seq_prob=short_seq_prob)
  example['input_ids'], example['mlm_labels'] = mask_tokens(
      example['input_ids'], rng, mask_id=mask_id, vocab_size=vocab_size,
      special_ids=set(special_ids) | {cls_id, sep_id, pad_id}, mask_prob=mask_prob,
      max_predictions=max_predictions)
  return example


_SENTENCE_END = re.compile(r'(?:(?<=[.!?])|(?<=[.!?]["\')\]]))\s+')


def split_sentences(text: str) -> list[str]:
  """A document's sentences: its non-empty lines, or, for a single line, its sentences.

  The rule: if the text has two or more non-empty lines, each (stripped) line is a sentence (the
  one-sentence-per-line format of BERT's pre-training corpora). Otherwise the line is split after
  '.', '!' or '?' (optionally followed by a closing quote or bracket) and whitespace. Abbreviations
  such as 'e.g. this' are split too; the rule is simple by design.
  """
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if len(lines) != 1:
    return lines
  return [s for s in _SENTENCE_END.split(lines[0]) if s]
