"""The input pipeline: file sources (sources.py), tokenizers (tokenizers.py), grain pipeline (pipeline.py)."""
