"""One trial in plain torch: the training loop, augmentation, the frozen-feature cache, memory estimates."""
