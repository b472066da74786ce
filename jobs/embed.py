"""Embed a data set into the embedding store on a Ray cluster.

    ray job submit --working-dir . -- python jobs/embed.py configs/places_lt.yaml \
        data.root=/shared/places365 data.split_dir=/shared/places_lt store.root=/shared/raylt/store

Under `ray job submit` the job's working directory is a temporary copy: give data and store
paths as absolute paths on storage every node can read (the store is written by the driver).
"""

import sys

from raylt.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
