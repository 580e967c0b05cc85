# Fixtures shared by the tests of every package (tiny saved models, inputs).
pytest_plugins = ["peft_core.testing.fixtures"]
