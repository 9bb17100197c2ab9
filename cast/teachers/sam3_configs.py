"""Architectures of the SAM 3 teacher, buildable with random weights (no download), and a CLIP-like
tokenizer over a handful of words.

"paper": facebook/sam3 as transformers' `Sam3Config()` defaults describe it, 840.4 M parameters:
    vision encoder 454.0 M (Perception-Encoder ViT-L+ 446.2 M: 1024 wide, 32 blocks, patch 14 on
    a 1008 x 1008 input, windows of 24 with global attention in blocks 7/15/23/31; FPN neck 7.8 M),
    CLIP text encoder 353.5 M (+ 0.3 M projection), geometry encoder 8.1 M, DETR encoder 9.5 M,
    DETR decoder 11.6 M (200 queries, presence token, box head), mask decoder 2.3 M, dot-product
    scoring 1.2 M. (Meta gives 848 M for the whole SAM 3 including its video tracker.)
"tiny": the same modules at about 0.3 M parameters on a 112 x 112 input, for tests and smoke runs.

`clip_like_tokenizer` is to SAM 3 what `cast.teachers.vfm_configs.bert_like_tokenizer` is to
Grounding-DINO: a byte-level BPE tokenizer (transformers' CLIPTokenizer) whose merges spell each
given word as one token, so a randomly initialised SAM 3 is prompted exactly as the real one is
(lower-cased, <|startoftext|> ... <|endoftext|>, padded to 32 tokens).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from transformers import CLIPTokenizer, Sam3Config
from transformers.convert_slow_tokenizer import bytes_to_unicode

SIZES = ("paper", "tiny")
CLIP_VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def sam3_config(size: str, vocab_size: int = CLIP_VOCAB_SIZE) -> Sam3Config:
    """SAM 3's configuration at `size`; the tiny one reads a text vocabulary of `vocab_size`
    tokens whose last two are <|startoftext|> and <|endoftext|> (as `clip_like_vocab` lays out)."""
    if size == "paper":
        return Sam3Config()
    if size != "tiny":
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    # 112 = 8 patches of 14: FPN levels of 32, 16, 8 (and 4) cells, windows of 4 with one global block.
    return Sam3Config(
        vision_config=dict(
            backbone_config=dict(model_type="sam3_vit_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, image_size=112, patch_size=14, window_size=4,
                                 global_attn_indexes=[1], pretrain_image_size=56),
            fpn_hidden_size=32, backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]]),
        text_config=dict(model_type="clip_text_model", vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, projection_dim=32, max_position_embeddings=32,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
        geometry_encoder_config=dict(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_encoder_config=dict(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_decoder_config=dict(hidden_size=32, num_layers=2, num_attention_heads=2, intermediate_size=64,
                                 num_queries=20),
        mask_decoder_config=dict(hidden_size=32, num_attention_heads=2))


def clip_like_vocab(words: Sequence[str], size: int | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """(vocabulary, merges) of a byte-level BPE in CLIP's format: every printable ASCII character
    alone and word-final ("</w>"), the merges that build each lower-cased word of `words` from
    its characters, [unusedN] filling up to `size` tokens, <|startoftext|> and <|endoftext|> last."""
    byte_chars = bytes_to_unicode()
    chars = [byte_chars[b] for b in range(33, 127)]
    vocab = [*chars, *(c + "</w>" for c in chars)]
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(w for text in words for w in re.findall(r"[a-z]+", text.lower())):
        pieces = [*word[:-1], word[-1] + "</w>"]
        for piece in pieces[1:]:
            merged = pieces[0] + piece
            if (pieces[0], piece) not in merges:
                merges.append((pieces[0], piece))
            if merged not in vocab:
                vocab.append(merged)
            pieces = [merged, *pieces[2:]]
    if size is not None:
        if size < len(vocab) + 2:
            raise ValueError(f"a vocabulary of {size} tokens cannot hold the {len(vocab) + 2} needed")
        vocab += [f"[unused{i}]" for i in range(size - len(vocab) - 2)]
    return vocab + [BOS, EOS], merges


def clip_like_tokenizer(words: Sequence[str], size: int | None = None) -> CLIPTokenizer:
    """A CLIPTokenizer over `clip_like_vocab(words, size)`; padding with <|endoftext|>."""
    vocab, merges = clip_like_vocab(words, size)
    return CLIPTokenizer(vocab={token: index for index, token in enumerate(vocab)}, merges=merges)
