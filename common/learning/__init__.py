"""Learning: models, losses, augmentations (per image and batched), objectives, training and
evaluation (kNN, linear probes), BatchNorm re-estimation. Free of Flower."""
