"""Fine-tuning and evaluation on labelled downstream tasks, from pretrained weights."""
