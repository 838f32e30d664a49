"""The offline corpus: Python's own documentation and standard library -> GPT-2 token shards.

    python data/pydoc/prepare.py                      # writes data/pydoc/{train,val}_000000.bin

Needs no download: every CPython ships the text of its reference topics (``pydoc_data.topics``,
what ``help('with')`` prints) and the source of its standard library, docstrings included.
Documents, in a fixed order: the topics sorted by name, then the stdlib ``.py`` files sorted by
path (tests and site-packages left out), capped at --max_tokens (default 4M, a few minutes of
CPU training). 5% of the documents, chosen by a hash of their text, form the validation shard.
Runs in seconds; rerunning with the same Python and settings does nothing.
"""
import argparse
import os
import sys
import sysconfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/, for prepare_common
import prepare_common  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# tests are noisy, encodings/ is mostly codec tables, pydoc_data/ repeats the topics above
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings", "pydoc_data"}


def stdlib_files(stdlib: str) -> list[str]:
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        files += [os.path.join(root, n) for n in names if n.endswith(".py")]
    return sorted(files, key=lambda f: os.path.relpath(f, stdlib))  # walk order is filesystem-dependent


def documents(stdlib: str):
    from pydoc_data.topics import topics
    for name in sorted(topics):
        yield topics[name]
    for path in stdlib_files(stdlib):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if text.strip():
            yield text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prepare_common.add_common_args(p, out_dir=HERE, val_fraction=0.05, max_tokens=4_000_000)
    args = p.parse_args(argv)
    val_tokens, val_fraction = args.val_tokens or 0, args.val_fraction
    if val_fraction is None:
        val_fraction = 0.0 if val_tokens else 0.05
    stdlib = sysconfig.get_paths()["stdlib"]
    return prepare_common.prepare(
        documents(stdlib), args.out_dir, source=f"pydoc+stdlib:python{sys.version.split()[0]}",
        shard_size=args.shard_size, val_tokens=val_tokens, val_fraction=val_fraction,
        max_tokens=args.max_tokens, num_proc=args.num_proc, overwrite=args.overwrite,
        rebuild_if_changed=True, progress=not args.no_progress)


if __name__ == "__main__":
    main()
