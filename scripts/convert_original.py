"""Convert a save_pretrained folder of the original GRAPE repository into a folder of this one.

    python -m scripts.convert_original /path/to/out_llama-mha-grape-m-ctx_... grape-m-ctx-hf
    python -m scripts.convert_original /path/to/renamed-rope-run rope-hf --model_type llama-mha-rope

The original's folder name (out_<model_type>_...), its config.json and its parameters say what
model it is; ``--model_type`` is needed only for a renamed RoPE or ALiBi folder, and one that
contradicts the folder is refused.

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
                        help="the original's model_type, e.g. llama-mha-rope (needed only for a RoPE or ALiBi "
                             "folder whose name is no longer the original's out_<model_type>_...)")
    args = parser.parse_args(argv)
    try:
        converted = load_original(args.folder, args.model_type)
    except (ValueError, OSError) as e:         # a wrong or missing model_type, an unreadable folder: one line
        raise SystemExit(f"convert_original: {e}") from None
    converted.save_pretrained(args.out)
    print(f"{args.folder} ({converted.config.pos_encoding}, KV-shift {converted.config.use_k_shift}) "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
