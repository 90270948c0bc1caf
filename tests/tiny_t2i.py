"""Tiny, random, offline stand-ins for the text-to-image parts, written to disk as the hub lays them out.

`write_tiny_pipeline(folder)` writes a diffusers pipeline folder (transformer/, vae/, text_encoder/,
tokenizer/, scheduler/, model_index.json) with the same classes as PixArt-alpha/PixArt-LCM-XL-2-1024-MS
but a few thousand parameters each, so `train_t2i.py --pretrained folder` loads it exactly as it loads
the real checkpoint. `write_image_folder` and `write_webdataset_tar` write image–caption data in the
two formats the script reads, with known bad samples; `write_tiny_clip` a CLIP for the CLIP score.
Used by tests/test_t2i.py; run it directly to get a folder to try the script on:

    python tests/tiny_t2i.py /tmp/tiny    # writes /tmp/tiny/{pipeline, images, shard-000000.tar, clip}
"""

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

WORDS = ("a photo of the red green blue small large cat dog bird tree house car boat sky sea "
         "mountain flower river city road bridge sun moon star cloud field forest garden window door "
         "table chair cup book lamp clock apple orange banana cake pizza train plane bike horse cow sheep "
         "fish lake snow rain night day old new bright dark painting drawing sketch portrait landscape "
         "in on under over with and near by at two three many one").split()
RESOLUTION = 64  # pixels; the 8x VAE makes 8x8 latents, the tiny transformer's sample_size


# PixArt-delta's scheduler (PixArt-alpha/PixArt-LCM-XL-2-1024-MS, scheduler/scheduler_config.json, hub commit
# 885fcb2): an LCMScheduler on PixArt's own training schedule, linear 1e-4 .. 0.02 (as DiT / ADM), epsilon
# prediction, 50 original steps; the fields it does not set are diffusers' defaults.
PIXART_DELTA_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon",
                              num_train_timesteps=1000, original_inference_steps=50)
# diffusers' LCMScheduler defaults, Stable Diffusion's schedule (LCM-LoRA, LCM-Dreamshaper): scaled_linear
SD_LCM_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
                        num_train_timesteps=1000, original_inference_steps=50)


def write_tiny_pipeline(folder, scheduler=PIXART_DELTA_SCHEDULER, multi_scale=False):
    """Write tiny random PixArt transformer + 8x AutoencoderKL + T5 encoder + word-level tokenizer + LCM scheduler.

    :param scheduler: the LCMScheduler's settings: PixArt-delta's, or e.g. SD_LCM_SCHEDULER.
    :param multi_scale: the transformer's sample_size is 128, as in the 1024-MS models: it then takes the
        image's resolution and aspect ratio as extra conditions (use_additional_conditions), and
        PixArtAlphaPipeline passes them. It still runs on 8x8 latents (64 px images).
    """
    import torch
    from diffusers import AutoencoderKL, LCMScheduler, PixArtTransformer2DModel
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    torch.manual_seed(0)
    text_dim = 32  # the T5 d_model, which PixArt's caption_channels must equal
    transformer = PixArtTransformer2DModel(
        sample_size=128 if multi_scale else RESOLUTION // 8, num_layers=2, patch_size=2, attention_head_dim=8,
        num_attention_heads=3, caption_channels=text_dim, in_channels=4, cross_attention_dim=24, out_channels=8,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6)  # out_channels = 2*in_channels: a learned variance, as PixArt
    vae = AutoencoderKL(
        block_out_channels=[8, 8, 8, 8], norm_num_groups=2, latent_channels=4, sample_size=RESOLUTION,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)  # 3 downsamples: 8x
    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + list(WORDS))}
    text_encoder = T5EncoderModel(T5Config(d_model=text_dim, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                           vocab_size=max(128, len(vocab)), pad_token_id=0, eos_token_id=1))
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=16)
    scheduler = LCMScheduler(**scheduler)

    transformer.save_pretrained(os.path.join(folder, "transformer"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "T5EncoderModel"],
                   "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
                   "scheduler": ["diffusers", "LCMScheduler"]}, f)
    return folder


def write_tiny_clip(folder):
    """A tiny random CLIPModel + CLIPProcessor (word-level BPE vocabulary), for the CLIP-score path."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({word + "</w>": i + 2 for i, word in enumerate(WORDS)})
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")  # no merges: every known word is one token
    tokenizer = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _image_bytes(rng, size=(80, 72)):
    """A random RGB JPEG, deliberately not square and not at the training resolution."""
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _caption(rng):
    return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 8))))


def write_image_folder(folder, num_good=10, seed=0):
    """HF imagefolder: images + metadata.jsonl. Adds one corrupt image and one image with no caption.

    Returns the number of good samples.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(num_good):
        name = f"{i:04d}.jpg"
        with open(os.path.join(folder, name), "wb") as f:
            f.write(_image_bytes(rng))
        rows.append({"file_name": name, "text": _caption(rng)})
    with open(os.path.join(folder, "corrupt.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")  # a JPEG header, then garbage
    rows.insert(3, {"file_name": "corrupt.jpg", "text": "a cat on a table"})
    with open(os.path.join(folder, "nocaption.jpg"), "wb") as f:
        f.write(_image_bytes(rng))
    rows.insert(6, {"file_name": "nocaption.jpg"})  # no "text" key: a missing caption
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return num_good


def write_webdataset_tar(path, num_good=8, seed=1, start=0):
    """One img2dataset-style shard: NNNNNNNNN.jpg + .txt + .json per sample, plus one empty caption.

    Returns the number of good samples.
    """
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i in range(num_good + 1):
            key = f"{start + i:09d}"
            add(key + ".jpg", _image_bytes(rng))
            add(key + ".txt", b"   " if i == 2 else _caption(rng).encode())  # sample 2: an empty caption
            add(key + ".json", json.dumps({"key": key, "status": "success"}).encode())
    return num_good


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default="tiny_t2i", help="where to write them (default: ./tiny_t2i)")
    root = parser.parse_args().folder
    write_tiny_pipeline(os.path.join(root, "pipeline"))
    write_image_folder(os.path.join(root, "images"))
    write_webdataset_tar(os.path.join(root, "shard-000000.tar"))
    write_tiny_clip(os.path.join(root, "clip"))
    print(f"wrote {root}/pipeline, {root}/images, {root}/shard-000000.tar, {root}/clip")
