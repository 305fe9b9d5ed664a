"""Hugging Face model folders in and out: their config.json and safetensors weights."""
