"""The parts of `make gpu-check`, one module each, every one run in a process of its own by the runner
(gpu_check.py) as `python3 -m gpu_parts NAME`: these import the project, the runner only torch and the standard
library. Each part is a function from a `Context` to the result rows it yields as it goes."""
