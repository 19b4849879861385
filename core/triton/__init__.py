"""Serving core models with NVIDIA Triton: the python-backend model, the repository, the server command.

`core.triton.model` imports triton_python_backend_utils, which exists only inside Triton's stub;
import it from there, not from here.
"""
