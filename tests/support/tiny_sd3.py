"""A whole tiny random SD3 pipeline built from configs, offline (no downloads), in about a second: what every test of
the GPU path runs on."""

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from tokenizers import pre_tokenizers
from transformers import (
    ByT5Tokenizer,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from flowopd.models.sd3 import SD3Bundle

RESOLUTION, TEXT_LEN = 32, 32


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE with no merges: one token per byte (plus its end-of-word form); built in memory."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_clip(vocab_size: int, seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=16,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_sd3_bundle() -> SD3Bundle:
    clip_tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(0)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=384, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=4, decoder_start_token_id=0
        )
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(4, 4, 4, 4),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=1,
        sample_size=RESOLUTION,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    ).eval()
    # CLIP-L and CLIG-G (16 + 16) are concatenated and padded to T5's width (32) = joint_attention_dim
    transformer = SD3Transformer2DModel(
        sample_size=RESOLUTION // 8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
    )
    return SD3Bundle.from_components(
        transformer=transformer,
        vae=vae,
        text_encoder=tiny_clip(len(clip_tokenizer), 1),
        tokenizer=clip_tokenizer,
        text_encoder_2=tiny_clip(len(clip_tokenizer), 2),
        tokenizer_2=clip_tokenizer,
        text_encoder_3=t5,
        tokenizer_3=ByT5Tokenizer(),
        resolution=RESOLUTION,
        max_sequence_length=TEXT_LEN,
    )
