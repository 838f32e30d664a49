"""The dry run's memory estimate next to peaks measured while training on this machine.

    python -m scripts.check_sizing              # eager, CPU (about a minute)
    python -m scripts.check_sizing --compiled   # torch.compile (minutes on CPU)
    python -m scripts.check_sizing --device cuda

Size a real training config with ``python train_adam_finewebedu.py CONFIG --dry_run=True``
(the memory model is written out in ``training/sizing.py``).
"""
import argparse

from training.sizing import check


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compiled", action="store_true", help="with torch.compile (minutes on CPU)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args(argv)
    print(f"estimate vs measured peak, {'compiled' if args.compiled else 'eager'}, {args.device}")
    check(args.compiled, args.device)


if __name__ == "__main__":
    main()
