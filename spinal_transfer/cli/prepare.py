"""`spinal-transfer prepare` (the datasets themselves are defined in spinal_transfer.data.prepare)."""
from __future__ import annotations

import argparse

from ..config import check_flags
from ..data.prepare import DATASETS, prepare

EXAMPLES = """\
  # a real folder out of the box, from images installed packages ship (no download)
  spinal-transfer prepare digits --root data           # data/digits: sklearn's 1,797 digits, 10 classes
  spinal-transfer prepare photos --root data           # data/photos: 1,000 crops of 10 photographs

  # CIFAR-10 via torchvision, downloading into data/raw/ and writing data/cifar10/{train,val,test}/<class>/
  spinal-transfer prepare cifar10 --root data --download

  # Kaggle datasets cannot be downloaded: put the zip in the source folder first
  #   data/raw/fruits.zip  (kaggle datasets download -d moltean/fruits)
  spinal-transfer prepare fruits360 --root data

  # Flowers-102 as the paper's scripts used it (Kaggle oxford-102-flower-pytorch: 6,552 train / 818 valid);
  # `flowers102` is the official split (1,020 / 1,020 / 6,149)
  #   data/raw/flower_data.zip  (https://www.kaggle.com/c/oxford-102-flower-pytorch/data)
  spinal-transfer prepare flowers102_kaggle --root data

  # raw archives elsewhere, a 20% val split with another seed
  spinal-transfer prepare stanford_cars --root data --source /mnt/raw --val-fraction 0.2 --split-seed 1

  # a subset or another version: warn instead of failing on the official image counts
  spinal-transfer prepare bird225 --root data --no-check-counts

Running the same command again does nothing once the output is complete. Missing source files are
listed with their exact paths and download pages; see data/README.md for every dataset."""


def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `spinal-transfer prepare`."""
    parser.add_argument("dataset", choices=list(DATASETS), help="dataset to prepare")
    parser.add_argument("--root", required=True, help="output root: writes ROOT/<dataset>/")
    parser.add_argument("--source", default=None, help="folder with the raw archives/folders (default: ROOT/raw)")
    parser.add_argument("--download", action="store_true",
                        help="fetch missing raw files (torchvision datasets and CINIC-10 only)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of each class held out of train for val, where there is no official val "
                             "(default: 0.1)")
    parser.add_argument("--split-seed", "--seed", dest="split_seed", type=int, default=0, metavar="N",
                        help="seed of the stratified splits, as train's --split-seed (default: 0; --seed is its "
                             "old name)")
    parser.add_argument("--no-check-counts", dest="check_counts", action="store_false",
                        help="warn instead of failing when image counts differ from the official split sizes")


def main(args: argparse.Namespace) -> int:
    """0 once ROOT/<dataset>/ is complete; a PrepareError (a UserError) becomes cli.main's one error line, exit 2."""
    seed = check_flags({"split_seed": args.split_seed})["split_seed"]       # >= 0, as train's
    prepare(args.dataset, args.root, download=args.download, source=args.source,
            val_fraction=args.val_fraction, seed=seed, check_counts=args.check_counts)
    return 0
