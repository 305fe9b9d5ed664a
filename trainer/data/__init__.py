"""The input pipeline: file sources, tokenizers and chat templates, fine-tuning examples, the grain pipeline."""
