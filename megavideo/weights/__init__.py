"""Weights in and out: the official InternVideo2 checkpoints (:mod:`.internvideo2`) and Hugging
Face Mistral-shaped LLMs (:mod:`.hf_llm`)."""
