"""Speed of BLIP Lab's model against Hugging Face's BlipForConditionalGeneration of the same size.

Both models are built from random weights (nothing is downloaded) with the same widths, depths,
heads, image size and vocabulary, and trained on the image-grounded LM loss only (HF's captioning
model has no ITC/ITM). Timings alternate between the two models step by step, so background load
hits both alike; the result is printed as ratios (ours / HF), never as absolute targets.

    python benchmarks/bench_vs_hf_blip.py                 # demo size, batch 32, CPU
    python benchmarks/bench_vs_hf_blip.py --preset seed --batch-size 8 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import blipcore._torchvision  # noqa: F401 - HF's BLIP imports torchvision, which needs the CPU shim
from blipcore import BLIP, BlipConfig
from blipcore.decoding import generate
from blipcore.tokenizer import special_ids, tokenize_captions

CAPTION = "two small red circles to the left of a large blue square on a gray background"


def hf_peer(cfg: BlipConfig):
    from transformers import BlipConfig as HFBlipConfig
    from transformers import BlipForConditionalGeneration

    m = cfg.model
    vision = {"hidden_size": m.vision_width, "intermediate_size": int(m.vision_width * m.mlp_ratio),
              "num_hidden_layers": m.vision_depth, "num_attention_heads": m.vision_heads,
              "image_size": m.image_size, "patch_size": m.patch_size}
    text = {"vocab_size": m.vocab_size, "hidden_size": m.text_width,
            "intermediate_size": int(m.text_width * m.mlp_ratio),
            "num_hidden_layers": m.text_decoder_depth, "num_attention_heads": m.text_heads,
            "max_position_embeddings": m.max_text_len, "encoder_hidden_size": m.vision_width,
            "bos_token_id": special_ids()["dec"], "sep_token_id": special_ids()["sep"], "pad_token_id": 0}
    return BlipForConditionalGeneration(HFBlipConfig(text_config=text, vision_config=vision))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model (after 2 warm-up steps)")
    parser.add_argument("--new-tokens", type=int, default=20, help="tokens generated per caption")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = BlipConfig.preset(args.preset).override({"model.itc_weight": 0.0, "model.lm_weight": 1.0})
    device = torch.device(args.device)
    ours, theirs = BLIP(cfg).to(device), hf_peer(cfg).to(device)
    size = cfg.model.image_size
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    tokens = tokenize_captions([CAPTION] * args.batch_size, cfg.model.max_text_len)
    ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    hf_ids = ids.clone()
    hf_ids[:, 0] = special_ids()["dec"]
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4)

    def step_ours() -> None:
        ours(images, ids, mask)["loss"].backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs() -> None:
        theirs(pixel_values=images, input_ids=hf_ids, attention_mask=mask, labels=hf_ids).loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    def decode_ours() -> None:
        generate(ours, images, "greedy", max_length=args.new_tokens, min_length=args.new_tokens, use_prompt=False)

    def decode_theirs() -> None:
        with torch.no_grad():
            theirs.generate(pixel_values=images, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                            do_sample=False, num_beams=1)

    print(f"{args.preset} size, batch {args.batch_size}, {args.device}; "
          f"ours {ours.num_parameters():,} parameters, HF {sum(p.numel() for p in theirs.parameters()):,}")
    measurements = (("train step (LM)", step_ours, step_theirs),
                    (f"greedy decode ({args.new_tokens} tokens)", decode_ours, decode_theirs))
    for name, a, b in measurements:
        for _ in range(2):
            a(), b()
        times_a, times_b = [], []
        for _ in range(args.steps):
            times_a.append(timed(a))
            times_b.append(timed(b))
        ma, mb = statistics.median(times_a), statistics.median(times_b)
        print(f"{name:32s} ours {ma * 1000:8.1f} ms   HF {mb * 1000:8.1f} ms   ours/HF time ratio {ma / mb:5.2f}")


if __name__ == "__main__":
    main()
