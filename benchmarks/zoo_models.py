"""The architectures of benchmarks/zoo.py: name -> factory returning ``(model, make_inputs)``.

``make_inputs(batch)`` returns the model's inputs at that batch size (a tuple of positional
tensors, or a dict of keyword tensors for Hugging Face models), the same shapes otherwise.
Random init (no downloads): torchvision ``weights=None``, timm ``pretrained=False``, Hugging Face
tiny configs built from the config classes.

torchvision: one row per architecture at its smallest width (all 20 families of
``torchvision.models.list_models``); ``--all-torchvision`` adds every other width/depth variant.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Factory = Callable[[], tuple[nn.Module, Callable[[int], Any]]]

# torchvision: name -> (kwargs, image size). 64x64 where the architecture takes it.
TORCHVISION: dict[str, tuple[dict, int]] = {
    "alexnet": ({}, 64),
    "convnext_tiny": ({}, 64),
    "densenet121": ({}, 64),
    "efficientnet_b0": ({}, 64),
    "efficientnet_v2_s": ({}, 64),
    "googlenet": ({"aux_logits": False, "init_weights": True}, 75),
    "inception_v3": ({"aux_logits": False, "init_weights": True}, 75),
    "maxvit_t": ({}, 224),  # window partition 7x7 at every stage: 224 only
    "mnasnet0_5": ({}, 64),
    "mobilenet_v2": ({}, 64),
    "mobilenet_v3_small": ({}, 64),
    "mobilenet_v3_large": ({}, 64),
    "regnet_x_400mf": ({}, 64),
    "regnet_y_400mf": ({}, 64),
    "resnet18": ({}, 64),
    "resnet50": ({}, 64),
    "resnext50_32x4d": ({}, 64),
    "shufflenet_v2_x0_5": ({}, 64),
    "squeezenet1_1": ({}, 64),
    "swin_t": ({}, 64),
    "swin_v2_t": ({}, 64),
    "vgg11_bn": ({}, 64),
    "vit_b_32": ({"image_size": 64}, 64),
    "wide_resnet50_2": ({}, 64),
}

# timm: name -> (create_model kwargs, image size)
TIMM: dict[str, tuple[dict, int]] = {
    "resnet18d": ({}, 64),
    "resnet10t": ({}, 64),
    "efficientnet_b0": ({}, 64),
    "mobilenetv3_small_050": ({}, 64),
    "regnetx_002": ({}, 64),
    "convnext_atto": ({}, 64),
    "ghostnet_050": ({}, 64),
    "mobilevit_xxs": ({}, 64),
    "mobilevitv2_050": ({}, 64),
    "fastvit_t8": ({}, 64),
    "levit_128s": ({"img_size": 64}, 64),
    "deit_tiny_patch16_224": ({"img_size": 64}, 64),
    "vit_tiny_patch16_224": ({"img_size": 64}, 64),
    "swin_tiny_patch4_window7_224": ({"img_size": 64, "window_size": 4}, 64),
    "coat_lite_tiny": ({"img_size": 64}, 64),
    "poolformer_s12": ({}, 64),
    "efficientformer_l1": ({}, 224),  # attention biases fixed at 7x7 tokens
    "efficientvit_b0": ({}, 64),
    "repvgg_a0": ({}, 64),
    "rexnet_100": ({}, 64),
    "hrnet_w18_small": ({}, 64),
    "dla46_c": ({}, 64),
    "cspresnet50": ({}, 64),
    "edgenext_xx_small": ({}, 64),
    "mobileone_s0": ({}, 64),
    "pvt_v2_b0": ({}, 64),
    "lcnet_050": ({}, 64),
    "mixnet_s": ({}, 64),
    "tiny_vit_5m_224": ({}, 224),  # no img_size argument
    "hgnetv2_b0": ({}, 64),
}


def _image(size: int) -> Callable[[int], Any]:
    def make(batch: int) -> tuple[torch.Tensor]:
        return (torch.randn(batch, 3, size, size),)

    return make


def _torchvision(name: str, kwargs: dict, size: int) -> Factory:
    def build() -> tuple[nn.Module, Callable[[int], Any]]:
        import torchvision.models as tvm

        return getattr(tvm, name)(weights=None, **kwargs), _image(size)

    return build


def _timm(name: str, kwargs: dict, size: int) -> Factory:
    def build() -> tuple[nn.Module, Callable[[int], Any]]:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs), _image(size)

    return build


_TEXT = {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 64, "max_position_embeddings": 64}


def _text_inputs(seq: int = 8, mask: bool = True) -> Callable[[int], Any]:
    def make(batch: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 128, (batch, seq))
        return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)} if mask else {
            "input_ids": ids}

    return make


def _hf(build_model: Callable[[Any], nn.Module], make_inputs: Callable[[int], Any]) -> Factory:
    def build() -> tuple[nn.Module, Callable[[int], Any]]:
        import transformers

        return build_model(transformers), make_inputs

    return build


def _pixels(size: int, channels: int = 3) -> Callable[[int], Any]:
    return lambda batch: {"pixel_values": torch.randn(batch, channels, size, size)}


HF: dict[str, Factory] = {
    "hf_bert": _hf(lambda t: t.BertModel(t.BertConfig(**_TEXT)), _text_inputs()),
    "hf_distilbert": _hf(lambda t: t.DistilBertModel(t.DistilBertConfig(
        vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)), _text_inputs()),
    "hf_roberta": _hf(lambda t: t.RobertaModel(t.RobertaConfig(**{**_TEXT, "max_position_embeddings": 72})),
                      _text_inputs()),
    "hf_gpt2": _hf(lambda t: t.GPT2Model(t.GPT2Config(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False)),
                   _text_inputs(mask=False)),
    "hf_t5_encoder": _hf(lambda t: t.T5EncoderModel(t.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)), _text_inputs()),
    "hf_vit": _hf(lambda t: t.ViTModel(t.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=8)), _pixels(32)),
    "hf_whisper_encoder": _hf(lambda t: t.WhisperModel(t.WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16,
        vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)).get_encoder(), lambda batch: {"input_features": torch.randn(batch, 16, 32)}),
    "hf_wav2vec2": _hf(lambda t: t.Wav2Vec2Model(t.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, mask_time_prob=0.0, layerdrop=0.0)),
        lambda batch: {"input_values": torch.randn(batch, 400)}),
    "hf_clip_vision": _hf(lambda t: t.CLIPVisionModel(t.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8)), _pixels(32)),
    "hf_llama": _hf(lambda t: t.LlamaForCausalLM(t.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False)), _text_inputs()),
}


def all_models(all_torchvision: bool = False) -> dict[str, Factory]:
    """Every zoo row, in table order: Hugging Face, timm, torchvision (the largest last)."""
    rows: dict[str, Factory] = dict(HF)
    tv = dict(TORCHVISION)
    if all_torchvision:
        import torchvision.models as tvm

        for name in tvm.list_models(module=tvm):
            tv.setdefault(name, ({"image_size": 64} if name.startswith("vit_") and name != "vit_h_14" else {},
                                 75 if name == "inception_v3" else 64))
    for name, (kw, size) in TIMM.items():
        rows[f"timm_{name}"] = _timm(name, kw, size)
    for name, (kw, size) in sorted(tv.items(), key=lambda item: item[0] in _LARGE_TV):
        rows[f"tv_{name}"] = _torchvision(name, kw, size)
    return rows


_LARGE_TV = {"alexnet", "vgg11_bn", "wide_resnet50_2", "resnext50_32x4d", "resnet50", "efficientnet_v2_s",
             "convnext_tiny", "maxvit_t", "swin_v2_t", "vit_b_32", "inception_v3"}


QUICK = ("tv_resnet18", "tv_mobilenet_v3_small", "timm_deit_tiny_patch16_224", "hf_bert")
