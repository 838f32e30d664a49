"""FineWeb-Edu -> GPT-2 token shards (the paper's pretraining data).

    cd data/fineweb-edu && python prepare.py          # or: python fineweb-edu.py (same script)
    mv fineweb-edu100B ..                             # training reads data/fineweb-edu100B

Streams HuggingFaceFW/fineweb-edu, config "sample-100BT" (a 100B-token sample), from the hub,
so nothing is downloaded up front. Offline clusters: download the parquet files elsewhere and
pass --local_dir. As in llm.c, the first 100M tokens form the validation shard val_000000.bin
and the rest goes to 100M-token train shards. Rerunning resumes after the last finished shard.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/, for prepare_common
import prepare_common  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prepare_common.add_source_args(p, dataset="HuggingFaceFW/fineweb-edu", name="sample-100BT")
    prepare_common.add_common_args(p, out_dir=os.path.join(HERE, "fineweb-edu100B"), val_tokens=100_000_000)
    return prepare_common.run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    main()
