"""Evaluation: log-likelihoods of continuations and multiple-choice scoring."""
