"""OpenWebText -> GPT-2 token shards.

    python data/openwebtext/prepare.py                # writes data/openwebtext/{train,val}_*.bin

Streams Skylion007/openwebtext from the Hugging Face hub (about 9B tokens); offline clusters
pass --local_dir with the downloaded files. As in nanoGPT, 0.05% of the documents (chosen by
a hash of their text, so the split is deterministic) form the validation shards.
Rerunning resumes after the last finished shard. If the hub copy still has its old loading
script (which datasets>=4 refuses), pass --revision refs/convert/parquet or use --local_dir.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/, for prepare_common
import prepare_common  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prepare_common.add_source_args(p, dataset="Skylion007/openwebtext", name=None)
    prepare_common.add_common_args(p, out_dir=HERE, val_fraction=0.0005)
    return prepare_common.run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    main()
