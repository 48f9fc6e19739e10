"""Images on disk to tensors: decoding, splits, loaders, the skip log, augmentation and `prepare`."""
