"""Reference fixture for SDXL's text side: CLIP tokenizers, CLIP text encoders, encode_prompt.

Writes, under --out:
- tokenizer/, tokenizer_2/: vocab.json + merges.txt + tokenizer_config.json + special_tokens_map.json
  laid out as in stabilityai/stable-diffusion-xl-base-1.0 (tokenizer_2 pads with "!", id 0).
- text_encoder/ (CLIPTextModel, quick_gelu, eos_token_id 49407 as transformers 5 writes it) and
  text_encoder_2/ (CLIPTextModelWithProjection, gelu, eos_token_id 2 as SDXL's config has it):
  tiny random weights, config.json + model.safetensors with the `text_model.` names real SDXL
  files carry. text_encoder/model_v5_layout.safetensors keeps the unprefixed names transformers 5
  writes for a CLIPTextModel.
- tokens.json: prompts and the ids both tokenizers give them (padded to 77, truncated), plus the
  untruncated lengths.
- encoders.safetensors: every hidden state, last_hidden_state, pooled output (and text_embeds)
  of both encoders for a few prompts and for raw id rows that tell the two pooling rules apart.
- encode_prompt.json + encode_prompt.safetensors: StableDiffusionXLPipeline.encode_prompt outputs.
"""

import common

args = common.parse_args(__doc__)
common.seed_everything(args.seed)

import torch  # noqa: E402
from diffusers import StableDiffusionXLPipeline  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

out = args.out

# --- Tokenizers, in the real SDXL folder layout -------------------------------------------------
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def added_token(content, normalized, special):
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, "special": special}


def tokenizer_folder(name, pad_token):
    folder = common.clip_vocabulary_files(out / name)
    added = {"49406": added_token(BOS, True, False), "49407": added_token(EOS, False, False)}
    if pad_token == "!":
        added = {"0": added_token("!", False, True), **added}
    common.write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [],
        "bos_token": BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    })
    common.write_json(folder / "special_tokens_map.json",
                      {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS})
    return CLIPTokenizer.from_pretrained(folder)


tokenizer = tokenizer_folder("tokenizer", EOS)
tokenizer_2 = tokenizer_folder("tokenizer_2", "!")

LONG = ("a highly detailed photograph of an old lighthouse on a rocky coast at sunset, "
        "dramatic clouds, golden light, waves crashing against the rocks, seagulls in the sky, "
        "a small fishing boat in the distance, 35mm film grain, shallow depth of field, "
        "cinematic color grading, award winning composition, trending on artstation, 8k")
PROMPTS = [
    "",
    "a photo of a cat",
    "  A  Photo\tOF a\n\nCAT!!  wow!",
    "Café naïve résumé — 東京タワー, emoji 🐱🚀 Ünïcödé ǅ İstanbul ß",
    "cafe\u0301 and e\u0301te\u0301, a\u00a0b\u2003c\u200bd",
    "it's a dog's life, isn't it? we'll see... (1234) #tag @user $5.99 100% a/b_c-d",
    "masterpiece, best quality, (ultra detailed:1.2), [cat|dog], <lora:foo:0.8>",
    f"x {EOS} y {BOS} z <|STARTOFTEXT|>!",
    "1990s 35mm f/1.8 1/250s ISO-400 3840x2160",
    LONG,
    LONG + " " + LONG,
    "a " * 75,  # exactly 77 ids with BOS and EOS
    "a " * 76 + "cat",  # two content tokens too many
]

tokens = {"prompts": PROMPTS, "tokenizer": [], "tokenizer_2": [], "untruncated_tokenizer": [],
          "untruncated_tokenizer_2": []}
for prompt in PROMPTS:
    for key, tok in [("tokenizer", tokenizer), ("tokenizer_2", tokenizer_2)]:
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        assert len(ids) == 77
        tokens[key].append(ids)
        tokens["untruncated_" + key].append(tok(prompt).input_ids)
common.write_json(out / "tokens.json", tokens)

# --- Text encoders ------------------------------------------------------------------------------


def randomize(model):
    # transformers' init leaves layer norms at (1, 0) and biases at 0: perturb them so a wrong
    # affine or a missing bias shows in the outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


common_config = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, pad_token_id=1)
text_encoder = randomize(CLIPTextModel(CLIPTextConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, projection_dim=32,
    hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, **common_config)))
text_encoder_2 = randomize(CLIPTextModelWithProjection(CLIPTextConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4, projection_dim=48,
    hidden_act="gelu", bos_token_id=0, eos_token_id=2, **common_config)))

text_encoder.save_pretrained(out / "text_encoder")
text_encoder_2.save_pretrained(out / "text_encoder_2")
# transformers 5 writes a CLIPTextModel without the `text_model.` prefix real SDXL files carry
# (and which it strips again on load): store the real layout, keep the v5 one beside it.
weights = out / "text_encoder" / "model.safetensors"
v5 = load_file(str(weights))
assert not any(k.startswith("text_model.") for k in v5)
(out / "text_encoder" / "model_v5_layout.safetensors").write_bytes(weights.read_bytes())
save_file({f"text_model.{k}": v.contiguous() for k, v in v5.items()}, str(weights), metadata={"format": "pt"})
reloaded = CLIPTextModel.from_pretrained(out / "text_encoder").eval()
assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), text_encoder.state_dict().values()))
text_encoder = reloaded
v2 = load_file(str(out / "text_encoder_2" / "model.safetensors"))
assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in v2)

ENCODED_PROMPTS = [1, 3, 9, 0]
encoders = {}
with torch.no_grad():
    rows = {f"prompt{i}": torch.tensor([tokens["tokenizer"][i]]) for i in ENCODED_PROMPTS}
    rows_2 = {f"prompt{i}": torch.tensor([tokens["tokenizer_2"][i]]) for i in ENCODED_PROMPTS}
    # Rows without the EOS id: the rule `ids == eos_token_id` (text_encoder) finds no match and
    # pools position 0; the legacy rule for eos_token_id == 2 (text_encoder_2) pools the largest id.
    raw = torch.tensor([[320, 1125, 49406, 5, 7, 2, 0, 0], [49406, 320, 49407, 2368, 49407, 0, 0, 0]])
    rows["raw"] = raw
    rows_2["raw"] = raw.clone()
    for key, ids in rows.items():
        o = text_encoder(ids, output_hidden_states=True)
        encoders[f"te1.{key}.input_ids"] = ids
        for i, h in enumerate(o.hidden_states):
            encoders[f"te1.{key}.hidden_states.{i}"] = h
        encoders[f"te1.{key}.last_hidden_state"] = o.last_hidden_state
        encoders[f"te1.{key}.pooler_output"] = o.pooler_output
    for key, ids in rows_2.items():
        o = text_encoder_2(ids, output_hidden_states=True)
        encoders[f"te2.{key}.input_ids"] = ids
        for i, h in enumerate(o.hidden_states):
            encoders[f"te2.{key}.hidden_states.{i}"] = h
        encoders[f"te2.{key}.last_hidden_state"] = o.last_hidden_state
        encoders[f"te2.{key}.text_embeds"] = o.text_embeds
        encoders[f"te2.{key}.pooler_output"] = text_encoder_2.text_model(ids).pooler_output
common.save_tensors(out / "encoders.safetensors", encoders)

# --- StableDiffusionXLPipeline.encode_prompt ----------------------------------------------------
CASES = [
    # name, force_zeros_for_empty_prompt, kwargs
    ("no_negative", True, dict(prompt="a photo of a cat")),
    ("negative", True, dict(prompt="a photo of a cat", negative_prompt="blurry, low quality")),
    ("long_prompt_2_empty_negative", True,
     dict(prompt=LONG + " " + LONG, prompt_2="an oil painting!", negative_prompt="", negative_prompt_2="ugly!!")),
    ("no_negative_without_force_zeros", False, dict(prompt="Café naïve, 東京")),
    ("empty_prompt_2_falls_back", True, dict(prompt="a red bicycle", prompt_2="", negative_prompt="dark",
                                              negative_prompt_2="")),
    ("clip_skip", True, dict(prompt="a photo of a cat", negative_prompt="blurry", clip_skip=1)),
    ("no_guidance", True, dict(prompt="a photo of a dog", do_classifier_free_guidance=False)),
]
results = {}
cases = []
with torch.no_grad():
    for name, force_zeros, kwargs in CASES:
        pipe = StableDiffusionXLPipeline(
            vae=None, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=None, scheduler=None, force_zeros_for_empty_prompt=force_zeros,
            add_watermarker=False)
        pe, npe, pooled, npooled = pipe.encode_prompt(device=torch.device("cpu"), num_images_per_prompt=1,
                                                      **{"do_classifier_free_guidance": True, **kwargs})
        results[f"{name}.prompt_embeds"] = pe
        results[f"{name}.pooled_prompt_embeds"] = pooled
        if npe is not None:
            results[f"{name}.negative_prompt_embeds"] = npe
            results[f"{name}.negative_pooled_prompt_embeds"] = npooled
        cases.append({"name": name, "force_zeros_for_empty_prompt": force_zeros, **kwargs})
common.save_tensors(out / "encode_prompt.safetensors", results)
common.write_json(out / "encode_prompt.json", cases)
