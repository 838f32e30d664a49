"""Convert a save_pretrained folder of the original GRAPE repository into a folder of this one.

    python -m scripts.convert_original /path/to/out_llama-mha-grape-m-ctx_... grape-m-ctx-hf
    python -m scripts.convert_original /path/to/out_llama-mha-rope_... rope-hf --model_type llama-mha-rope

What the conversion does is written in ``training/original_checkpoint.py``.
"""
import argparse

from training.original_checkpoint import load_original


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Convert a save_pretrained folder of the original GRAPE "
                                                 "repository into one of this repository.")
    parser.add_argument("folder", help="the original's folder (config.json + pytorch_model.bin)")
    parser.add_argument("out", help="where to write the converted folder")
    parser.add_argument("--model_type", default=None,
                        help="the original's model_type, e.g. llama-mha-rope (needed for RoPE, ALiBi and "
                             "tied GRAPE-AP, whose parameters do not say it)")
    args = parser.parse_args(argv)
    converted = load_original(args.folder, args.model_type)
    converted.save_pretrained(args.out)
    print(f"{args.folder} ({converted.config.pos_encoding}, KV-shift {converted.config.use_k_shift}) "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
