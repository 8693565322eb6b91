"""Shared helpers of the reference-fixture scripts.

Every script in this folder builds small random-weight models with diffusers/transformers,
saves them in the layout real models use, and records reference outputs next to them, so the
Rust engine can be checked against the reference on the same weights. Scripts are run by the
tests (see tests/common/mod.rs), fully offline, and write only under the `--out` folder.
"""

import argparse
import gzip
import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, type=Path, help="folder to write into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def save_tensors(path: Path, tensors: dict) -> None:
    """Saves float tensors as contiguous f32 safetensors (the Rust side reads them with tch)."""
    save_file(
        {k: v.detach().to(torch.float32).contiguous() if v.is_floating_point() else v.contiguous()
         for k, v in tensors.items()},
        str(path),
    )


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def clip_vocabulary_files(folder: Path) -> Path:
    """Writes vocab.json and merges.txt, as SDXL's tokenizer folders hold them, generated from
    the CLIP BPE vocabulary shipped in the open-clip-torch wheel (identical to OpenAI's)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open-clip-torch is not installed: run local-dev/install")
    bpe = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")
    # The file's first line is a version header; CLIP uses the first 49152 - 256 - 2 merges.
    merges = merges[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    byte_unicode = _bytes_to_unicode()
    vocab = list(byte_unicode.values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(m) for m in merges)
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "vocab.json", {token: i for i, token in enumerate(vocab)})
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    return folder


def _bytes_to_unicode() -> dict:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))
