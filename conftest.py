# peft-core's fixtures (llama, gpt2, input_ids, llama_dir, tiny_model_dir) are opt-in; every package's tests
# in this repository use them. A top-level conftest is where pytest accepts pytest_plugins.
pytest_plugins = ["peft_core.testing.fixtures"]
