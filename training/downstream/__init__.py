"""Does synthetic data help a segmentation model? The downstream study with nnU-Net v2 (``python -m
training.downstream``; docs/downstream.md): three training sets from the same label maps (real only, real +
synthetic, synthetic only), one nnU-Net per set, Dice on held-out real CTs."""
