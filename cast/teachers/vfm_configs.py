"""Architectures of the foundation-model teacher, buildable with random weights (no download).

"paper": Grounding-DINO-L (Swin-L backbone, BERT-base text encoder) + SAM2-L (Hiera-L), the
teacher of the CAST paper. Parameter counts of these transformers models, checked against the
paper's 568 M:
    Grounding-DINO-L  342.0 M  (Swin-L 195.2 M, BERT-base 108.9 M, the rest 37.9 M)
    SAM2-L            216.9 M  (Hiera-L + FPN neck 212.7 M, mask decoder 4.2 M); the SAM2 paper's
                               224.4 M also counts the video memory modules, unused for images
    together          559.0 M  (+ 0.1 M projection head), i.e. 568 M within 2 %.
Cost of `cast.teachers.vfm.random_teacher(classes, size="paper")`, measured with cast.efficiency
(forward FLOPs, multiply-add = 2 FLOPs, batch 1; 2 shared CPU cores, torch 2.13):
    Grounding-DINO-L at 800 x 1333        2188 GFLOPs
    SAM2-L image encoder at 1024 x 1024   1622 GFLOPs (every image is resized to SAM's 1024 square)
    SAM2-L mask decoder                    3.6 GFLOPs per box
    profile_model(teacher, (512, 1024)): 2794 GFLOPs (Grounding-DINO at 512 x 1024, SAM2 at 1024,
    the forward's 20 sampler boxes), 77 s; the cast-s student there: 50.9 M, 356 GFLOPs, 7.8 s
    (benchmarks/results/models.json). The paper's 880 -> 200 GFLOPs states neither resolution nor
    FLOP convention; ours give 11x the parameters and 7.8x the FLOPs of the student.
"tiny": the same classes at a few hundred thousand parameters, for tests and smoke runs on
64 x 64 images.

Grounding-DINO reads BERT's uncased vocabulary: the ids of [CLS], [SEP], "." and "?" are fixed in
its code (transformers' SPECIAL_TOKENS). `bert_like_vocab` writes a vocabulary with those ids
in place, so a tokenizer made from a handful of words drives a randomly initialised teacher
exactly as the real one would.
"""
from __future__ import annotations

from collections.abc import Sequence

from transformers import BertTokenizer, GroundingDinoConfig, PreTrainedConfig, Sam2Config, SamConfig

SIZES = ("paper", "tiny")
SAM_KINDS = ("sam2", "sam")
# Ids of bert-base-uncased that Grounding-DINO's code relies on.
BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}
BERT_BASE_VOCAB_SIZE = 30522


def bert_like_vocab(words: Sequence[str], size: int | None = None) -> list[str]:
    """A WordPiece vocabulary (one token per line of vocab.txt) with BERT's special ids in place,
    the lower-cased whitespace-separated pieces of `words` after them, [unusedN] filling the
    gaps and, when `size` is given, the tail up to `size` tokens."""
    vocab = [""] * (max(BERT_SPECIAL_IDS.values()) + 1)
    for token, index in BERT_SPECIAL_IDS.items():
        vocab[index] = token
    free = iter(range(10**9))
    vocab = [token or f"[unused{next(free)}]" for token in vocab]
    for word in dict.fromkeys(piece for w in words for piece in w.lower().split()):
        if word not in vocab:
            vocab.append(word)
    if size is not None:
        if size < len(vocab):
            raise ValueError(f"a vocabulary of {size} tokens cannot hold the {len(vocab)} needed")
        vocab += [f"[unused{next(free)}]" for _ in range(size - len(vocab))]
    return vocab


def bert_like_tokenizer(words: Sequence[str], size: int | None = None) -> BertTokenizer:
    """An uncased BertTokenizer over `bert_like_vocab(words, size)`."""
    return BertTokenizer(vocab={token: index for index, token in enumerate(bert_like_vocab(words, size))})


def grounding_dino_config(size: str, vocab_size: int = BERT_BASE_VOCAB_SIZE) -> GroundingDinoConfig:
    if size == "paper":
        # Swin-L (window 12, 384 pre-training), stages 2-4 (strides 8, 16, 32) feed the encoder;
        # BERT-base; 6 + 6 deformable layers, 900 queries, 4 levels (transformers' defaults).
        return GroundingDinoConfig(
            backbone_config=dict(model_type="swin", embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48],
                                 window_size=12, image_size=384, out_indices=[2, 3, 4]),
            text_config=dict(model_type="bert", vocab_size=vocab_size))
    _check_size(size)
    # decoder_layers >= 2: transformers ties decoder box heads 1.. to head 0 and needs one to tie.
    # d_model 64: its GroupNorm(32) must see 2+ values per group on the 1 x 1 stride-64 level of a
    # single 64 x 64 image.
    return GroundingDinoConfig(
        backbone_config=dict(model_type="swin", embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                             window_size=4, image_size=64, out_indices=[2, 3, 4]),
        text_config=dict(model_type="bert", vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32, max_position_embeddings=64),
        d_model=64, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=16, encoder_n_points=1,
        decoder_n_points=1, max_text_len=64)


def sam_config(size: str, sam_kind: str = "sam2") -> PreTrainedConfig:
    if sam_kind not in SAM_KINDS:
        raise ValueError(f"sam_kind must be one of {SAM_KINDS}, got {sam_kind!r}")
    _check_size(size)
    if sam_kind == "sam2":
        if size == "paper":
            # Hiera-L: 144 wide, 2 heads, stages [2, 6, 36, 4], global attention in blocks 23/33/43.
            return Sam2Config(vision_config=dict(
                model_type="sam2_vision_model",
                backbone_config=dict(model_type="sam2_hiera_det_model", hidden_size=144, num_attention_heads=2,
                                     blocks_per_stage=[2, 6, 36, 4], embed_dim_per_stage=[144, 288, 576, 1152],
                                     num_attention_heads_per_stage=[2, 4, 8, 16], window_size_per_stage=[8, 4, 16, 8],
                                     global_attention_blocks=[23, 33, 43],
                                     window_positional_embedding_background_size=[7, 7]),
                backbone_channel_list=[1152, 576, 288, 144]))
        # A 64 x 64 input: features at 16, 8, 4 (strides 4, 8, 16) like 1024 -> 256, 128, 64.
        return Sam2Config(
            vision_config=dict(
                model_type="sam2_vision_model",
                backbone_config=dict(model_type="sam2_hiera_det_model", hidden_size=8, num_attention_heads=1,
                                     image_size=[64, 64], blocks_per_stage=[1, 1, 2, 1],
                                     embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[1, 1, 1, 1],
                                     window_size_per_stage=[4, 4, 4, 2], global_attention_blocks=[3],
                                     window_positional_embedding_background_size=[4, 4]),
                backbone_channel_list=[64, 32, 16, 8], backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]],
                fpn_hidden_size=32),
            prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=16, mask_input_channels=4),
            mask_decoder_config=dict(hidden_size=32, mlp_dim=32, num_attention_heads=2, iou_head_hidden_dim=16))
    if size == "paper":
        # SAM ViT-H, the largest SAM 1 (the paper's teacher is SAM2-L; this is the sam_kind="sam" variant).
        return SamConfig(vision_config=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                                            global_attn_indexes=[7, 15, 23, 31]))
    return SamConfig(
        vision_config=dict(hidden_size=16, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16, window_size=2, global_attn_indexes=[1], num_pos_feats=16,
                           mlp_dim=32),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=32, num_attention_heads=2, iou_head_hidden_dim=16))


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
