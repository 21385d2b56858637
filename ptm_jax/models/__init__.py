"""Pure-functional Flax (linen) models: ResNet, ViT, BERT, GPT-2, CLIP."""
