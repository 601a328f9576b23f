"""Image reading, datasets and augmentation."""
