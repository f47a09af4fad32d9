"""The recipe of the embedded default bundle (`server/default_model/`), served by `cotap serve` when
no model is named. It is an UNTRAINED PLACEHOLDER (random `cotap_micro8` weights, seed 0) until
the evaluation work replaces it with a trained small model.

Regenerate: `python -m cotap.server.backends.placeholder [OUT_DIR]`.
(It lives under `backends/` because it builds a torch model, which only backends may import.)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from cotap.core.bundle import MODEL_CARD, Bundle, add_files
from cotap.core.preprocess import PreprocessConfig
from cotap.server.settings import DEFAULT_MODEL_DIR
from cotap.training.bundles import write_model_bundle
from cotap.training.models import build_model

ARCH = "cotap_micro8"
SEED = 0
SIZE = (64, 64)

CARD = """# cotap default model: UNTRAINED PLACEHOLDER

**This model is not trained.** Its weights are a random initialisation of `{arch}` (torch seed
{seed}); its features carry no meaning. It exists so that `cotap serve` works out of the box, for
wiring, load tests and the API. Serve a real bundle with `cotap serve --model NAME=PATH`.

| field | value |
|---|---|
| architecture | `{arch}` (ViT, patch 8, width 96, depth 4, 2 heads, 64 prototypes; outputs 192-d) |
| input | fixed {h}×{w}, ImageNet mean/std |
| weights | random, `torch.manual_seed({seed})` |
| weights sha256 | `{weights_sha}` |
| regenerate | `python -m cotap.server.backends.placeholder` |

The evaluation work will replace this bundle with a trained small model.
"""


def make_placeholder_default(out: str | Path = DEFAULT_MODEL_DIR) -> Bundle:
    """Write the placeholder default bundle to `out` (replacing it). Deterministic weights."""
    torch.manual_seed(SEED)
    model = build_model(ARCH).eval()
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "b"
        bundle = write_model_bundle(
            model,
            ARCH,
            staged,
            name="default",
            preprocess=PreprocessConfig(size=SIZE, patch_size=8),
            prototypes_initialized=False,
            source={"checkpoint": None, "layout": "random-init", "seed": SEED, "trained": False},
            build={
                "command": "python -m cotap.server.backends.placeholder",
                "arch": ARCH,
                "size": list(SIZE),
            },
        )
        card = CARD.format(
            arch=ARCH,
            seed=SEED,
            h=SIZE[0],
            w=SIZE[1],
            weights_sha=bundle.files["model.safetensors"]["sha256"],
        )
        add_files(staged, {MODEL_CARD: card.encode()})
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(staged, out)
        out.chmod(0o755)
    from cotap.core.bundle import read_bundle

    return read_bundle(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out", nargs="?", default=str(DEFAULT_MODEL_DIR))
    b = make_placeholder_default(parser.parse_args().out)
    print(f"{b.path}: sha256 {b.sha256}")


if __name__ == "__main__":
    main()
