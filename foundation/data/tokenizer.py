"""Train and load the report tokenizer (Hugging Face `tokenizers`, saved in transformers format).

Choices, and why:
- Trained on the *scrubbed* reports only, on the hospital side; the vocabulary then holds no
  name that scrubbing removed.
- WordPiece (BERT) by default, byte-level BPE as an option.
- Lowercase, but accents kept: in French they carry meaning ("côte"/"cote", "pâle"/"pale",
  "âgé") and NFC normalisation first makes composed and decomposed accents one form.
- The scrubber's placeholders ("[NOM]", "[DATE]", ...) are single special tokens, matched before
  normalisation, so the model sees "a name was here" as one symbol and never splits it.
- Special tokens come first: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4 (``TextConfig``
  assumes ``pad_token_id=0``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from foundation.privacy.scrub import PLACEHOLDERS

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# The placeholders the report scrubber writes in place of identifiers, in its order, once each.
SCRUB_PLACEHOLDERS: tuple[str, ...] = tuple(dict.fromkeys(PLACEHOLDERS.values()))


def _build(kind: str, vocab_size: int, specials: list[str]) -> tuple[Tokenizer, trainers.Trainer]:
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.Sequence(
            [
                normalizers.NFC(),
                normalizers.BertNormalizer(
                    clean_text=True, handle_chinese_chars=False, strip_accents=False, lowercase=True
                ),
            ]
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose 'wordpiece' or 'bpe'")
    return tok, trainer


def train_tokenizer(
    texts: Iterable[str],
    out_dir: Path,
    vocab_size: int = 8000,
    kind: str = "wordpiece",
    placeholders: Sequence[str] = SCRUB_PLACEHOLDERS,
    model_max_length: int = 512,
) -> PreTrainedTokenizerFast:
    """Train a tokenizer on scrubbed report ``texts`` and save it to ``out_dir``.

    The directory loads with ``AutoTokenizer.from_pretrained(out_dir, local_files_only=True)``
    (or :func:`load_tokenizer`). Encodings are ``[CLS] ... [SEP]``.
    """
    placeholders = [p for p in placeholders if p not in SPECIAL_TOKENS]
    specials = [*SPECIAL_TOKENS, *placeholders]
    tok, trainer = _build(kind, vocab_size, specials)
    tok.train_from_iterator((t for t in texts if t), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        additional_special_tokens=placeholders,
        model_max_length=model_max_length,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`train_tokenizer` from a local directory (no hub)."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{directory}: no tokenizer.json (train one with train_tokenizer)")
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
