"""SSL methods, one module each, declared in the registry (``register_method`` / ``method_specs``)."""
from ssl3d.training.methods.base import SSLMethod
from ssl3d.training.methods.registry import (MethodSpec, OptimDefaults, available_methods, build_method,
                                             get_method_spec, method_specs, register_method, spec_for_network,
                                             unregister_method)

__all__ = ["MethodSpec", "OptimDefaults", "SSLMethod", "available_methods", "build_method", "get_method_spec",
           "method_specs", "register_method", "spec_for_network", "unregister_method"]
