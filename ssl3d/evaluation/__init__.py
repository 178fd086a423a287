"""The last pipeline stage: label-efficiency benchmarks (pretrain once, fine-tune per label count and seed,
predict a held-out test set, score with nnU-Net's evaluation) and their statistics and plots."""
