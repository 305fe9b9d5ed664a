"""Serving: the continuous-batching engine and the OpenAI API's requests and responses."""
