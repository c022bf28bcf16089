"""Model references, layer stacks and heads of Hugging Face models."""
