"""lightllm-nb: a Jupyter-native LLM serving engine in the spirit of LightLLM."""
