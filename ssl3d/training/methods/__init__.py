"""SSL methods, one module each, registered by name (``build_method``/``available_methods``)."""
from ssl3d.training.methods.base import SSLMethod, available_methods, build_method, register_method

__all__ = ["SSLMethod", "available_methods", "build_method", "register_method"]
