# The fixtures shared by every package's tests come from peft-core's pytest plugin (entry point pytest11).
